"""Corpora: documents -> hash splits -> sampled token windows -> parquet shards (see docs/contracts.md).

Documents come from minigpt.sources. Every document gets a salted sha256; the hash alone decides its split (calib /
heldout / train) and its place in the order, so adding a file never moves another document to a different split.

Sampling. A split's token budget is spread over its documents: in hash order (a salted random permutation), each
document gives one window of at most `cap` tokens at a seeded random position (whole documents when shorter), until
the budget is met. `cap` starts at budget / documents (at least half a block, so a window keeps some context) and is
doubled only when the documents are too short to fill the budget, so no document dominates a sample and a budget
smaller than the split spans many documents instead of the first few. With no budget (train_tokens 0) every
document is taken whole. The windows are joined with EOS and cut into `block_size` blocks; each block carries
`n_bytes`, the UTF-8 bytes of text it covers. The number of documents a sample spans is printed and recorded in the
manifest; each split's documents.parquet holds the window text of every spanned document (what evaluation and
re-tokenization read) with its character offsets in the document.

Weighted sources. A domain's sources pool their documents, so each weighs by its document count: a corpus of 20,000
one-line definitions drowns 50 articles. When its sources carry weights, each split's budget is shared out among
them in whole blocks in proportion to the weights (`weighted_blocks`), each share is sampled from its source's own
documents of that split as above, and the shares' blocks are interleaved (`merge_streams`) so that a reader taking
the first blocks still sees every source. A source that cannot fill its share of a required split is an error
naming it; the hash still alone decides every document's split.

`n_bytes` is exact per window: every character's bytes are given to the first token whose offset span reaches the
character's end (fast tokenizers' offset mapping), so a window's tokens sum to its exact UTF-8 size. Only a
multi-byte character split by byte-level BPE across a block boundary is counted in the earlier block (at most a
few bytes). Tokenizers without offsets fall back to spreading a window's bytes evenly over its tokens.

Output of `prepare_domain`, written atomically (temporary sibling folder, then rename):
  <out_dir>/manifest.json, <out_dir>/<split>/documents.parquet, <out_dir>/<split>/shard-NNNNN.parquet
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from minigpt.config import ConfigError, DataConfig, DomainConfig
from minigpt.io import atomic_dir, atomic_write_json
from minigpt.sources import iter_documents
from minigpt.tokens import bos_id, doc_window, token_bytes, tokenize_documents, tokenize_offsets, with_bos

SPLITS = ("calib", "heldout", "valid", "train")  # preparation order: the splits that can fail come first
SPLIT_NAMES = {"calib": "calibration", "heldout": "held-out", "valid": "validation", "train": "training"}
BUDGET_KEYS = {"calib": "data.calib_tokens", "heldout": "data.heldout_tokens", "valid": "data.valid_tokens",
               "train": "data.train_tokens"}
REQUIRED_SPLITS = ("calib", "heldout")  # a budget these cannot meet is an error; valid and train take what exists
_TOKENIZE_BATCH = (8, 256)  # first and largest batch: small budgets tokenize little more than they need

# ------------------------------------------------------------------------------------------------ splits


def doc_hash(text: str, salt: str) -> str:
    return hashlib.sha256((salt + text).encode("utf-8")).hexdigest()


def assign_split(hash_hex: str, data: DataConfig) -> str:
    """calib | heldout | valid | train from the hash's leading 64 bits read as a uniform number in [0, 1).

    The ranges are laid end to end in that order, so a validation split only takes documents that would otherwise
    train: calibration and held-out documents do not move when data.valid_fraction changes.
    """
    u = int(hash_hex[:16], 16) / 2.0**64
    for split, upto in (("calib", data.calib_fraction), ("heldout", data.calib_fraction + data.heldout_fraction),
                        ("valid", data.calib_fraction + data.heldout_fraction + data.valid_fraction)):
        if u < upto:
            return split
    return "train"


def gather_documents(domain: DomainConfig, data: DataConfig) -> list[tuple[str, str]]:
    """All documents of a domain as (hash, text), deduplicated, sorted by hash."""
    return sorted(doc for docs in gather_by_source(domain, data) for doc in docs)


def gather_by_source(domain: DomainConfig, data: DataConfig) -> list[list[tuple[str, str]]]:
    """Per source of the domain, its documents as (hash, text) sorted by hash; a document that several sources
    yield belongs to the first of them."""
    seen: set[str] = set()
    out = []
    for source in domain.sources:
        docs: dict[str, str] = {}
        for text in iter_documents(source, data.max_document_chars):
            h = doc_hash(text, data.salt)
            if h not in seen:
                seen.add(h)
                docs[h] = text
        out.append(sorted(docs.items()))
    return out


def weighted_blocks(n_blocks: int, weights: Sequence[float]) -> list[int]:
    """`n_blocks` shared out in proportion to `weights` (largest remainder; ties to the earlier source)."""
    total = float(sum(weights))
    exact = [n_blocks * w / total for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: n_blocks - sum(out)]:
        out[i] += 1
    return out


# ---------------------------------------------------------------------------------------------- sampling


def min_window(block_size: int) -> int:
    """Smallest window a document gives when the budget could be spread thinner: half a block of context."""
    return max(8, block_size // 2)


def sample_windows(length: Callable[[int], int], n_docs: int, target: int | None, floor: int,
                   seeds: Sequence[int]) -> tuple[list[tuple[int, int, int]], int]:
    """Windows (document index, start, end) in token positions, in document order, and the cap they obey.

    `length(i)` is document i's token count (called only for the documents visited, so a large split is not
    tokenized whole); an EOS separator counts one token between windows. Each document gives at most `cap` tokens
    at a position drawn from `seeds[i]` alone (so a window does not depend on the other documents), until `target`
    tokens exist. `cap` starts at max(floor, target / n_docs) and doubles only while the documents cannot fill the
    target with it. `target` None: every document whole.
    """
    cap = max(1, floor, -(-(target or 0) // max(1, n_docs)))
    while True:
        windows: list[tuple[int, int, int]] = []
        total, truncated = 0, False
        for i in range(n_docs):
            n = length(i)
            if n == 0:
                continue
            take = n if target is None else min(n, cap)
            truncated |= take < n
            start = int(np.random.default_rng([seeds[i], cap]).integers(n - take + 1)) if take < n else 0
            total += len(windows) > 0  # the EOS before this window
            windows.append((i, start, start + take))
            total += take
            if target is not None and total >= target:
                return windows, cap
        if not truncated:  # every document whole: the split is as large as it gets
            return windows, cap
        cap *= 2


class _Tokens:
    """Token ids and character offsets of a split's documents, tokenized lazily in growing batches."""

    def __init__(self, tokenizer: Any, texts: Sequence[str]):
        self.tokenizer, self.texts = tokenizer, texts
        self.done: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.step = _TOKENIZE_BATCH[0]

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        while len(self.done) <= i:
            lo = len(self.done)
            self.done += tokenize_offsets(self.tokenizer, list(self.texts[lo:lo + self.step]))
            self.step = min(2 * self.step, _TOKENIZE_BATCH[1])
        return self.done[i]


@dataclass
class _SplitStream:
    ids: np.ndarray  # [n_blocks * block_size] int32
    n_bytes: np.ndarray  # [n_blocks * block_size] int64, 0 for EOS
    documents: list[tuple[str, str, int, int]]  # (hash, window text, start, end) of the documents in kept blocks
    available: int  # tokens gathered (with EOS separators) before cutting to blocks
    cap: int  # most tokens one document gave


# Bumped whenever the same settings would now give other shards (2: blocks open with BOS where the tokenizer uses one),
# so a resumed job prepares its data again instead of reusing shards of the old layout.
STREAM_FORMAT = 2


def build_stream(docs: Sequence[tuple[str, str]], tokenizer: Any, block_size: int, budget: int | None,
                 seed: int = 0) -> _SplitStream:
    """Sample windows of `docs` (see sample_windows) up to `budget` tokens rounded up to whole blocks, join them
    with EOS and cut the stream to whole blocks (each opening with BOS where the tokenizer uses one, see bos_id).
    budget None: every document whole; the short tail is dropped."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no eos token")
    bos = bos_id(tokenizer)
    body = block_size - (bos is not None)  # stream tokens per block
    target = None if budget is None else -(-budget // block_size) * body
    tokens = _Tokens(tokenizer, [t for _, t in docs])
    seeds = [int(h[:16], 16) ^ seed for h, _ in docs]
    windows, cap = sample_windows(lambda i: len(tokens.get(i)[0]), len(docs), target, min_window(block_size), seeds)
    ids_parts: list[np.ndarray] = []
    byte_parts: list[np.ndarray] = []
    spans: list[tuple[int, tuple[str, str, int, int]]] = []  # (stream position, document window)
    length = 0
    for i, start, end in windows:
        if ids_parts:
            ids_parts.append(np.array([eos], dtype=np.int32))
            byte_parts.append(np.zeros(1, dtype=np.int64))
            length += 1
        h, text = docs[i]
        ids, nb, a, b = doc_window(text, *tokens.get(i), start, end)
        spans.append((length, (h, text[a:b], a, b)))
        ids_parts.append(ids)
        byte_parts.append(nb)
        length += len(ids)
    ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    bytes_all = np.concatenate(byte_parts) if byte_parts else np.zeros(0, dtype=np.int64)
    kept = (length // body) * body if target is None else min(target, (length // body) * body)
    used = [doc for pos, doc in spans if pos < kept]
    return _SplitStream(*with_bos(ids_all[:kept], bytes_all[:kept], block_size, bos), used, length, cap)


def merge_streams(streams: Sequence[_SplitStream], block_size: int) -> _SplitStream:
    """One split of several sources' streams (whole blocks each), their blocks interleaved evenly: block j of a
    source of n blocks goes to position (j + 1/2) / n of the whole, so any leading share of the blocks (what a
    budgeted reader takes) holds every source in about its proportion. Documents stay in hash order."""
    keys, ids, n_bytes = [], [], []
    for s, stream in enumerate(streams):
        n = len(stream.ids) // block_size
        keys += [((j + 0.5) / n, s) for j in range(n)]
        ids += list(stream.ids.reshape(n, block_size))
        n_bytes += list(stream.n_bytes.reshape(n, block_size))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return _SplitStream(
        np.concatenate([ids[i] for i in order]) if order else np.zeros(0, dtype=np.int32),
        np.concatenate([n_bytes[i] for i in order]) if order else np.zeros(0, dtype=np.int64),
        sorted(doc for stream in streams for doc in stream.documents),
        sum(stream.available for stream in streams), max((stream.cap for stream in streams), default=0))


# ------------------------------------------------------------------------------------------------ output


def _write_shards(split_dir: Path, stream: _SplitStream, block_size: int, blocks_per_shard: int) -> list[str]:
    n_blocks = len(stream.ids) // block_size
    return write_block_shards(split_dir, stream.ids.reshape(n_blocks, block_size),
                              stream.n_bytes.reshape(n_blocks, block_size), blocks_per_shard)


def write_block_shards(out_dir: Path, ids: np.ndarray, n_bytes: np.ndarray, blocks_per_shard: int) -> list[str]:
    """Token blocks [n, block_size] (and the bytes of text each token covers) as shard-NNNNN.parquet files in
    `out_dir`; returns their names relative to its parent."""
    n_blocks, block_size = ids.shape
    n_bytes = n_bytes.sum(axis=1)
    names = []
    for k, lo in enumerate(range(0, n_blocks, blocks_per_shard)):
        hi = min(lo + blocks_per_shard, n_blocks)
        offsets = pa.array(np.arange(hi - lo + 1, dtype=np.int32) * block_size, type=pa.int32())
        col = pa.ListArray.from_arrays(offsets, pa.array(ids[lo:hi].reshape(-1), type=pa.int32()))
        table = pa.table({"input_ids": col, "n_bytes": pa.array(n_bytes[lo:hi], type=pa.int64())})
        name = f"shard-{k:05d}.parquet"
        pq.write_table(table, out_dir / name)
        names.append(f"{out_dir.name}/{name}")
    return names


def write_documents(path: Path, documents: Sequence[tuple[str, str, int, int]]) -> None:
    table = pa.table({"doc_hash": pa.array([d[0] for d in documents], type=pa.string()),
                      "text": pa.array([d[1] for d in documents], type=pa.string()),
                      "start": pa.array([d[2] for d in documents], type=pa.int64()),
                      "end": pa.array([d[3] for d in documents], type=pa.int64())})
    pq.write_table(table, path)


# --------------------------------------------------------------------------------------------- DomainData


@dataclass(frozen=True)
class SplitData:
    documents: int
    tokens: int
    blocks: int
    bytes: int
    shards: tuple[str, ...]  # relative to the domain folder
    available: int = 0  # documents in the split (the sample spans `documents` of them)
    window_tokens: int = 0  # most tokens one document gave to the sample


def finished_manifest(out_dir: Path, what: str) -> dict:
    """out_dir/manifest.json of a folder written atomically with `finished: true`; FileNotFoundError otherwise."""
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no {what} (manifest.json missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("finished") is not True:
        raise FileNotFoundError(f"{out_dir}: {what} unfinished (manifest.json has no finished: true)")
    return manifest


def read_documents(path: Path) -> list[tuple[str, str]]:
    """(document hash, text) rows of a documents.parquet, in file order."""
    table = pq.read_table(path, columns=["doc_hash", "text"])
    return list(zip(table.column("doc_hash").to_pylist(), table.column("text").to_pylist()))


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
        manifest = finished_manifest(out_dir, "prepared domain data")
        splits = {name: SplitData(documents=s["documents"], tokens=s["tokens"], blocks=s["blocks"],
                                  bytes=s["bytes"], shards=tuple(s["shards"]), available=s.get("available", 0),
                                  window_tokens=s.get("window_tokens", 0))
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
        """(document hash, the window of its text the split's sample holds), in stream (hash) order."""
        self._split(split)
        return read_documents(self.out_dir / split / "documents.parquet")

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
    if split == "valid":
        return data.valid_tokens or None
    return data.train_tokens or None


def _write_split(split_dir: Path, stream: _SplitStream, data: DataConfig) -> list[str]:
    split_dir.mkdir()
    write_documents(split_dir / "documents.parquet", stream.documents)
    return _write_shards(split_dir, stream, data.block_size, data.blocks_per_shard)


def prepare_domain(domain: DomainConfig, data: DataConfig, tokenizer: Any, out_dir: Path) -> DomainData:
    """Gather, split, sample, tokenize and write one domain's data to `out_dir` (atomically). See the module
    docstring."""
    out_dir = Path(out_dir)
    name = domain.name
    try:
        per_source = gather_by_source(domain, data)
    except ConfigError as e:
        raise ConfigError(f"domain {name!r}: {e}") from None
    docs = sorted(doc for source_docs in per_source for doc in source_docs)
    if not docs:
        raise ConfigError(f"domain {name!r}: its sources yield no documents")
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for h, text in docs:
        by_split[assign_split(h, data)].append((h, text))
    weighted = domain.sources[0].weight is not None  # all of a domain's sources have a weight, or none has
    by_source = {s: [[doc for doc in source_docs if assign_split(doc[0], data) == s] for source_docs in per_source]
                 for s in SPLITS} if weighted else {}
    print(f"[prepare] {name}: {len(docs):,} documents "
          f"({', '.join(f'{s} {len(by_split[s]):,}' for s in SPLITS)})", flush=True)

    with atomic_dir(out_dir) as tmp:
        manifest_splits: dict[str, Any] = {}
        for split in SPLITS:
            budget = _budget(split, data)
            if weighted:
                stream, source_blocks = _weighted_stream(domain, by_source[split], tokenizer, data, split)
            else:
                stream = build_stream(by_split[split], tokenizer, data.block_size, budget, data.seed)
            n_blocks = len(stream.ids) // data.block_size
            if split in REQUIRED_SPLITS and len(stream.ids) < (budget or 0):
                need = f"{budget:,}"
                if budget % data.block_size:
                    need += f" (rounded up to {-(-budget // data.block_size)} blocks of {data.block_size})"
                raise ConfigError(f"domain {name!r}: {SPLIT_NAMES[split]} split has {stream.available:,} tokens, "
                                  f"the job asks for {need} ({BUDGET_KEYS[split]})")
            shards = _write_split(tmp / split, stream, data)
            n_bytes = int(stream.n_bytes.sum())
            manifest_splits[split] = {"documents": len(stream.documents), "available": len(by_split[split]),
                                      "window_tokens": stream.cap, "tokens": int(len(stream.ids)),
                                      "blocks": n_blocks, "bytes": n_bytes, "shards": shards}
            short = ""
            if split not in REQUIRED_SPLITS and budget and len(stream.ids) < budget:
                short = f" (fewer than the {budget:,} asked: every {split} document is used)"
            if weighted:
                manifest_splits[split]["sources"] = [{"source": src.label, "weight": src.weight, "blocks": n}
                                                     for src, n in zip(domain.sources, source_blocks)]
                short += "; by source: " + ", ".join(f"{src.label} {n}" for src, n in zip(domain.sources,
                                                                                          source_blocks))
            print(f"[prepare] {name}/{split}: {n_blocks} blocks, {len(stream.ids):,} tokens from "
                  f"{len(stream.documents):,} of {len(by_split[split]):,} documents "
                  f"(at most {stream.cap:,} tokens each), {n_bytes:,} bytes{short}", flush=True)
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
        atomic_write_json(tmp / "manifest.json", manifest, indent=2)
    return DomainData.load(out_dir)


def _weighted_stream(domain: DomainConfig, docs_by_source: Sequence[Sequence[tuple[str, str]]], tokenizer: Any,
                     data: DataConfig, split: str) -> tuple[_SplitStream, list[int]]:
    """A split of a domain whose sources carry weights: each source's share of the budget in whole blocks sampled
    from its own documents (every document when the split has no budget), then merged. A required split's source
    that cannot fill its share is an error naming it; an optional split takes what each source has."""
    budget, bs = _budget(split, data), data.block_size
    shares = [None] * len(docs_by_source) if budget is None else \
        weighted_blocks(-(-budget // bs), [s.weight for s in domain.sources])
    parts = []
    for source, docs, n in zip(domain.sources, docs_by_source, shares):
        part = build_stream(docs, tokenizer, bs, None if n is None else n * bs, data.seed)
        if split in REQUIRED_SPLITS and len(part.ids) < n * bs:
            raise ConfigError(f"domain {domain.name!r}: source {source.label} has {part.available:,} tokens of "
                              f"{SPLIT_NAMES[split]} text, its weight's share is {n * bs:,} of the "
                              f"{budget:,} asked ({BUDGET_KEYS[split]})")
        parts.append(part)
    return merge_streams(parts, bs), [len(p.ids) // bs for p in parts]


def retokenize(documents: Sequence[tuple[str, str]], tokenizer: Any, block_size: int, blocks_per_shard: int,
               out_dir: Path, budget: int | None = None, seed: int = 0) -> list[Path]:
    """Token shards of `documents` under a tokenizer, written atomically.

    Without a budget each document is taken whole: the windows a split already holds, re-tokenized for a
    vocabulary-pruned expert, so it trains on the same text. With one, windows are spread over the documents like
    a split's sample (the general replay corpus of recovery).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        names = _write_shards(tmp, build_stream(documents, tokenizer, block_size, budget, seed), block_size,
                              blocks_per_shard)
    return [out_dir / Path(n).name for n in names]


__all__ = [
    "DomainData", "SplitData", "SPLITS", "assign_split", "bos_id", "build_stream", "doc_hash", "gather_documents",
    "min_window", "prepare_domain", "read_blocks", "read_n_bytes", "retokenize", "sample_windows", "token_bytes",
    "tokenize_documents", "write_block_shards", "write_documents", "finished_manifest", "read_documents",
]
