"""General text calibrated beside every domain: a retain set, so that an expert keeps its domain and not only the
form of its calibration files.

A domain's calibration text has one form (the demo's medical source is one-line phenotype definitions). Least
squares and OBS on those sums alone treat every channel that form does not excite as spare, and the expert then
fails on the same domain's clinical vignettes or abstracts (README, out-of-source suite). Adding general text to
the statistics, at `prune.general_weight` times the domain's token mass, keeps what ordinary language needs while
the domain's own sums still decide what it specialises in; the sums stay sums, so the mix is exact and cheap
(`stats.mix`).

Where the general text comes from (`calibrate.general_sources`): any sources, as a domain's; or, by default, text
the dense model samples itself from a document start at temperature 1 (`sample_blocks`). Self-sampled text needs
no data, exists for every model, is the model's own distribution, and cannot contain any evaluation document.
Written once per job as token shards (`prepare_general`) and calibrated like a domain (minigpt.stages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt.config import DataConfig, DomainConfig, SourceConfig
from minigpt.corpora import bos_id, build_stream, gather_documents, write_block_shards
from minigpt.evalpass import Forward, as_forward
from minigpt.io import atomic_dir, atomic_write_json

SAMPLE_BATCH = 16  # sequences sampled at once: a step costs about the same up to a few dozen sequences on CPU


def sample_blocks(model: nn.Module | Forward, tokenizer: Any, n_blocks: int, block_size: int, seed: int = 0,
                  batch: int = SAMPLE_BATCH, on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """[n_blocks, block_size] token ids the model samples itself: each block opens with the document start (BOS
    where the tokenizer uses one, else EOS) and continues with block_size - 1 tokens sampled at temperature 1 (no
    top-k / top-p: the model's own distribution), seeded. A loaded model samples with transformers' `generate`, a
    streamed one (minigpt.evalpass.Streamed, one layer resident) draws the same blocks with its own KV cache."""
    start = bos_id(tokenizer)
    start = tokenizer.eos_token_id if start is None else start
    return as_forward(model).sample(int(start), n_blocks, block_size, seed, batch, on_batch)


def prepare_general(out_dir: Path, data: DataConfig, tokens: int, sources: tuple[SourceConfig, ...], tokenizer: Any,
                    open_model, banned: Iterable[str] = ()) -> int:
    """Write the job's general text as token shards in `out_dir` (atomically) and return its blocks: windows spread
    over `sources`' documents (none of the `banned` hashes: evaluation documents), or blocks the dense model
    (`open_model()`: a loaded model or a streamed Forward) samples itself when there are no sources."""
    n_blocks = max(1, -(-tokens // data.block_size))
    with atomic_dir(out_dir) as tmp:
        if sources:
            banned = set(banned)
            docs = [d for d in gather_documents(DomainConfig("general", sources), data) if d[0] not in banned]
            stream = build_stream(docs, tokenizer, data.block_size, tokens, data.seed)
            ids, n_bytes = stream.ids.reshape(-1, data.block_size), stream.n_bytes.reshape(-1, data.block_size)
            what = f"{len(stream.documents):,} documents of {', '.join(s.label for s in sources)}"
        else:
            model = open_model()

            def progress(blocks: int, tokens: int) -> None:
                print(f"[general] sampled {blocks}/{n_blocks} blocks" + (
                    f", the next {min(SAMPLE_BATCH, n_blocks - blocks)} at token {tokens}/{data.block_size}"
                    if tokens < data.block_size else ""), flush=True)

            ids = sample_blocks(model, tokenizer, n_blocks, data.block_size, data.seed, on_batch=progress)
            ids = ids.numpy().astype(np.int32)
            n_bytes = np.zeros_like(ids, dtype=np.int64)  # calibration reads token ids only
            what = "text the dense model sampled itself"
        write_block_shards(tmp, ids, n_bytes, data.blocks_per_shard)
        atomic_write_json(tmp / "manifest.json", {"blocks": int(len(ids)), "tokens": int(ids.size),
                                                  "source": what, "finished": True})
    print(f"[general] {len(ids)} blocks of {data.block_size} tokens: {what}", flush=True)
    return int(len(ids))


def shards(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob("shard-*.parquet"))


__all__ = ["SAMPLE_BATCH", "prepare_general", "sample_blocks", "shards"]
