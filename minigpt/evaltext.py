"""Out-of-source evaluation text: each domain's `eval_sources`, kept apart from everything the job learns from.

A domain expert must keep its domain, not the style of the files it was cut on: an expert calibrated and trained
on one-line phenotype definitions can look better than dense on its own held-out split and far worse on clinical
prose. `eval_sources` name text of the domain from other sources (ideally other forms); this module turns them into
evaluation sets the job never calibrates, trains, validates, searches or selects on:

* each eval source is read on its own (a set per source, named by `SourceConfig.label`);
* a document equal to one of the domain's own documents (same salted hash), or sharing at least
  `data.eval_overlap` of its word 8-grams with them (a licence that is in both lists, a definition copied into
  another ontology), is dropped and counted: that text is not out of source; the general replay text recovery
  trains on counts as the domain's own here;
* a budget of `data.eval_tokens` tokens is spread over the remaining documents as windows, as the held-out split
  is sampled (minigpt.corpora.build_stream), and the windows' text is written with each document's hash.

Output (atomic): <out_dir>/manifest.json and <out_dir>/<label>/documents.parquet. `check_leakage` asserts, before
any model runs, that no eval document is in the domain's calibration, training or validation sample;
`banned_hashes` gives the eval documents' hashes to every stage that gathers training text from other sources
(general replay), so those cannot train on them either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.config import ConfigError, DataConfig, DomainConfig, SourceConfig
from minigpt.corpora import (DomainData, build_stream, finished_manifest, gather_documents, read_documents,
                             write_documents)
from minigpt.io import atomic_dir, atomic_write_json

NGRAM = 8
_WORD = re.compile(r"\w+")


class LeakageError(ValueError):
    """An evaluation document (held-out or out-of-source) is also in a split the job learns from."""


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """Distinct hashes of the word n-grams of `text` (lower-cased \\w+ words) as int64."""
    words = _WORD.findall(text.lower())
    grams = {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}
    return np.fromiter(grams, dtype=np.int64, count=len(grams))


def shared_fraction(grams: np.ndarray, sorted_grams: np.ndarray) -> float:
    """The fraction of `grams` that are in `sorted_grams` (sorted, as _all_ngrams returns them): a binary search per
    gram, where np.isin would sort the domain's millions of n-grams again for every document."""
    if not len(sorted_grams):
        return 0.0
    at = np.minimum(np.searchsorted(sorted_grams, grams), len(sorted_grams) - 1)
    return float((sorted_grams[at] == grams).mean())


def _all_ngrams(texts: Iterable[str]) -> np.ndarray:
    parts = [ngram_hashes(t) for t in texts]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def source_documents(source: SourceConfig, data: DataConfig) -> list[tuple[str, str]]:
    """One eval source's documents as (hash, text), deduplicated, in hash order."""
    return gather_documents(DomainConfig("eval", (source,)), data)


def banned_hashes(domains: Sequence[DomainConfig], data: DataConfig) -> set[str]:
    """Hashes of every eval-source document of `domains`: text no stage may train on."""
    return {h for d in domains for s in d.eval_sources for h, _ in source_documents(s, data)}


def clean(docs: Sequence[tuple[str, str]], own_hashes: set[str], own_grams: np.ndarray, overlap: float
          ) -> tuple[list[tuple[str, str]], int, int]:
    """(documents kept, dropped as exact copies, dropped as near copies) of an eval source against the domain's
    own documents (their hashes and word 8-gram hashes)."""
    kept, exact, near = [], 0, 0
    for h, text in docs:
        if h in own_hashes:
            exact += 1
            continue
        grams = ngram_hashes(text)
        if len(grams) and shared_fraction(grams, own_grams) >= overlap:
            near += 1
            continue
        kept.append((h, text))
    return kept, exact, near


def prepare_eval_sets(domain: DomainConfig, data: DataConfig, tokenizer: Any, out_dir: Path,
                      learned: Sequence[SourceConfig] = ()) -> EvalSets:
    """Read, clean, sample and write every eval source of `domain` (see the module docstring). `learned`: other
    sources the job trains on (general replay), whose text counts as the domain's own here."""
    out_dir = Path(out_dir)
    if not domain.eval_sources:  # nothing to clean: the domain's own text is not read (the stage runs per domain)
        with atomic_dir(out_dir) as tmp:
            atomic_write_json(tmp / "manifest.json", {"domain": domain.name, "salt": data.salt, "sets": {},
                                                      "finished": True}, indent=2)
        return EvalSets.load(out_dir)
    own = gather_documents(domain.without_eval(), data)
    if learned:
        own += gather_documents(DomainConfig("learned", tuple(learned)), data)
    own_hashes = {h for h, _ in own}
    own_grams = _all_ngrams(t for _, t in own)
    sets: dict[str, dict] = {}
    with atomic_dir(out_dir) as tmp:
        for source in domain.eval_sources:
            label = source.label
            try:
                docs = source_documents(source, data)
            except ConfigError as e:
                raise ConfigError(f"domain {domain.name!r}: eval source {label!r}: {e}") from None
            kept, exact, near = clean(docs, own_hashes, own_grams, data.eval_overlap)
            if not kept:
                raise ConfigError(f"domain {domain.name!r}: eval source {label!r} has no document left "
                                  f"({len(docs)} read, {exact} equal to and {near} overlapping the domain's own)")
            stream = build_stream(kept, tokenizer, data.block_size, data.eval_tokens, data.seed)
            (tmp / label).mkdir()
            write_documents(tmp / label / "documents.parquet", stream.documents)
            sets[label] = {"documents": len(stream.documents), "available": len(kept), "read": len(docs),
                           "dropped_exact": exact, "dropped_overlap": near, "tokens": int(len(stream.ids)),
                           "source": {k: v for k, v in vars(source).items() if v is not None}}
            dropped = f", {exact + near} dropped as the domain's own text" if exact + near else ""
            print(f"[evaltext] {domain.name}/{label}: {len(stream.ids):,} tokens from {len(stream.documents):,} of "
                  f"{len(kept):,} documents{dropped}", flush=True)
        atomic_write_json(tmp / "manifest.json", {"domain": domain.name, "salt": data.salt, "sets": sets,
                                                  "finished": True}, indent=2)
    return EvalSets.load(out_dir)


@dataclass(frozen=True)
class EvalSets:
    """A domain's prepared out-of-source sets (see prepare_eval_sets)."""

    out_dir: Path
    domain: str
    sets: dict[str, dict]

    @classmethod
    def load(cls, out_dir: str | Path) -> EvalSets:
        manifest = finished_manifest(Path(out_dir), "out-of-source evaluation sets")
        return cls(Path(out_dir), manifest["domain"], manifest["sets"])

    def documents(self, label: str) -> list[tuple[str, str]]:
        return read_documents(self.out_dir / label / "documents.parquet")

    def texts(self) -> dict[str, list[str]]:
        return {label: [t for _, t in self.documents(label)] for label in self.sets}


def check_leakage(data: DomainData, eval_sets: EvalSets | None = None) -> None:
    """Raise LeakageError if a held-out or out-of-source document of the domain is also in a split the job learns
    from: held-out against calibration and training; out-of-source against calibration, training and validation.

    A missing calib/train/valid split cannot leak and is skipped; a missing held-out split is an error.
    """
    if "heldout" not in data.splits:
        raise FileNotFoundError(f"domain {data.domain!r}: no held-out split in {data.out_dir}")
    learned = {s: data.doc_hashes(s) for s in ("calib", "train", "valid") if s in data.splits}
    checks = [("held-out", data.doc_hashes("heldout"), ("calib", "train"))]
    for label in (eval_sets.sets if eval_sets else {}):
        checks.append((f"eval source {label!r}", {h for h, _ in eval_sets.documents(label)}, ("calib", "train",
                                                                                               "valid")))
    for what, hashes, against in checks:
        where = [s for s in against if hashes & learned.get(s, set())]
        if where:
            n = len(hashes & set().union(*(learned[s] for s in where)))
            raise LeakageError(f"domain {data.domain!r}: {n} {what} document(s) also in the "
                               f"{' and '.join(where)} split(s)")


__all__ = ["EvalSets", "LeakageError", "banned_hashes", "check_leakage", "clean", "ngram_hashes", "shared_fraction",
           "prepare_eval_sets", "source_documents"]
