"""The input embedding and the output head as blocks of vocabulary rows, so ZeRO-3 never gathers either whole.

ZeRO-3 partitions every parameter across a domain's workers and gathers a module's parameters whole while that
module runs. On a large vocabulary the embedding and the head are the largest modules by far (Qwen2.5-1.5B:
151,936 x 1,536, 0.87 GiB each in fp32, as much as five decoder layers), so each worker briefly held them whole
(measured: a worker of the 1.5B expert peaked above the dense model's own fp32 size although it held half the
expert). Split into blocks of rows, each block its own module and parameter, a worker gathers one block at a time:
what the vocabulary costs a worker is one block, as the decoder costs it one layer (Megatron's vocabulary-parallel
embedding splits the same rows across ranks for the same reason).

`SplitEmbedding(ids)` equals the embedding it replaces exactly: each id's row comes from the one block that holds
it, the others add exact zeros. `SplitHead(h)` concatenates the blocks' logits: the same products, so the same
logits. `split_vocabulary` swaps them into a model built under `deepspeed.zero.Init` (their blocks are then created
partitioned), and `row_blocks` tells loading and saving (minigpt.trainsave) which checkpoint tensor and rows each
block parameter stands for, so checkpoints and experts keep the stock names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BLOCK_PARAMS = 2**24  # at most this many parameters (64 MiB in fp32) in one block


def block_starts(rows: int, width: int, max_params: int = BLOCK_PARAMS) -> list[int]:
    """First row of each block (the last one ends at `rows`): equal blocks of at most `max_params` parameters."""
    per = max(1, max_params // max(1, width))
    n = -(-rows // per)
    size = -(-rows // n)
    return list(range(0, rows, size))


def _sizes(starts: list[int], rows: int) -> list[int]:
    return [b - a for a, b in zip(starts, [*starts[1:], rows])]


class SplitEmbedding(nn.Module):
    """An embedding whose rows are held by consecutive `nn.Embedding` blocks (and an optional constant scale,
    Gemma's). The padding row, whose gradient the stock module zeroes, is the padding row of its block."""

    def __init__(self, rows: int, width: int, starts: list[int], scale: float | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.starts = rows, width, list(starts)
        self.scale, self.padding_idx = scale, padding_idx
        self.blocks = nn.ModuleList(
            nn.Embedding(n, width, padding_idx=padding_idx - a if padding_idx is not None and a <= padding_idx < a + n
                         else None)
            for a, n in zip(self.starts, _sizes(self.starts, rows)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = None
        for start, block in zip(self.starts, self.blocks):
            inside = (input_ids >= start) & (input_ids < start + block.num_embeddings)
            rows = block(torch.where(inside, input_ids - start, 0)) * inside.unsqueeze(-1)
            out = rows if out is None else out + rows
        if self.scale is not None:
            out = out * torch.tensor(self.scale, dtype=out.dtype)
        return out


class SplitHead(nn.Module):
    """A bias-free output projection whose rows (one per vocabulary entry) are held by `nn.Linear` blocks."""

    def __init__(self, width: int, rows: int, starts: list[int]):
        super().__init__()
        self.in_features, self.out_features, self.starts = width, rows, list(starts)
        self.blocks = nn.ModuleList(nn.Linear(width, n, bias=False) for n in _sizes(self.starts, rows))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(hidden) for block in self.blocks], dim=-1)


def _embedding_scale(module: nn.Module) -> float | None:
    """The constant a scaled embedding multiplies by (Gemma's `scalar_embed_scale`), or None for a plain one."""
    return getattr(module, "scalar_embed_scale", None)


def splittable(model: nn.Module) -> bool:
    """Whether the embedding is a plain (or constant-scaled) nn.Embedding and the head, if untied, a bias-free
    nn.Linear: the modules whose forward SplitEmbedding and SplitHead reproduce."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or (type(emb) is not nn.Embedding and _embedding_scale(emb) is None):
        return False
    return head is None or (type(head) is nn.Linear and head.bias is None)


_OWN = object()  # split_vocabulary's default: the stock embedding's own padding row


def split_vocabulary(model: nn.Module, max_params: int = BLOCK_PARAMS, rows: int | None = None,
                     padding_idx: int | None | object = _OWN) -> bool:
    """Replace `model`'s embedding and head by row blocks (tied ones stay tied, block for block). Returns False and
    changes nothing when the model is not `splittable` or both fit in one block. Call it where the model was built
    (inside `deepspeed.zero.Init`, so the blocks are created partitioned); the old modules' values are not copied:
    the caller fills the blocks from the checkpoint (minigpt.trainsave.fill_partitioned). `rows` and `padding_idx`
    default to the stock embedding's; give them when the model was built with a stand-in vocabulary (one row,
    never allocated whole)."""
    if not splittable(model):
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows, width = rows or emb.num_embeddings, emb.embedding_dim
    starts = block_starts(rows, width, max_params)
    if len(starts) == 1:
        return False
    tied = head is not None and head.weight is emb.weight
    padding = emb.padding_idx if padding_idx is _OWN else padding_idx
    new_emb = SplitEmbedding(rows, width, starts, _embedding_scale(emb), padding)
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = SplitHead(width, rows, starts)
        if tied:
            for h, e in zip(new_head.blocks, new_emb.blocks):
                h.weight = e.weight
        model.set_output_embeddings(new_head)
    return True


@dataclass(frozen=True)
class RowBlock:
    """A block parameter stands for rows [start, stop) of the checkpoint tensor `tensor` of `rows` rows."""

    tensor: str
    start: int
    stop: int
    rows: int


def row_blocks(model: nn.Module) -> dict[str, RowBlock]:
    """Every block parameter's name in `model` (under whatever prefix peft adds) -> the rows it holds of the stock
    tensor `<module>.weight`. Tied head blocks share the embedding's parameters and are not listed again."""
    out: dict[str, RowBlock] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        if not isinstance(module, (SplitEmbedding, SplitHead)):
            continue
        rows = module.num_embeddings if isinstance(module, SplitEmbedding) else module.out_features
        for i, (start, block) in enumerate(zip(module.starts, module.blocks)):
            if id(block.weight) in seen:
                continue
            seen.add(id(block.weight))
            stop = start + (block.num_embeddings if isinstance(block, nn.Embedding) else block.out_features)
            out[f"{path}.blocks.{i}.weight"] = RowBlock(f"{path}.weight", start, stop, rows)
    return out


def vocab_rows(model: nn.Module) -> int:
    """Rows of the input embedding, split or not (a ZeRO-3 partitioned weight's `shape` is [0]: its `ds_shape`)."""
    emb = model.get_input_embeddings()
    if isinstance(emb, SplitEmbedding):
        return emb.num_embeddings
    return int(getattr(emb.weight, "ds_shape", emb.weight.shape)[0])


__all__ = ["BLOCK_PARAMS", "RowBlock", "SplitEmbedding", "SplitHead", "block_starts", "row_blocks",
           "split_vocabulary", "splittable", "vocab_rows"]
