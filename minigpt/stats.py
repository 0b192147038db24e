"""Calibration statistics: forward hooks that accumulate fp64 sums, and pure functions that merge them.

A `Stats` is a plain dict name -> float64 tensor. Every entry is a *sum* (never a mean), and the token count is
itself an entry, so merging is element-wise addition: associative, commutative, and N workers give exactly the
profile one worker gives on the same batches. Means and scores are derived later (minigpt.scoring).

Entries (L layers, I MLP channels, H attention heads, D hidden size, V vocabulary):
  tokens          [1]     token positions seen
  mlp_abs_sum     [L, I]  sum |a| of each layer's down-projection input (the Mini-GPTs statistic)
  mlp_sq_sum      [L, I]  sum a^2 of the same (for ||X|| in wanda-sp style scores)
  head_sq_sum     [L, H]  sum of the squared norm of each head's output (the output projection's input, per head)
  hidden_sq_sum   [L, D]  sum a^2 of the residual stream entering each layer
  block_cos_sum   [L]     sum of cos(layer input, layer output) per token (block influence, for depth pruning)
  token_counts    [V]     occurrences of each token id
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from minigpt.config import ConfigError
from minigpt.models import attn_output, decoder_layers, kv_coupling, mlp_coupling, mlp_parts, widths

Stats = dict[str, torch.Tensor]

STAT_NAMES = ("tokens", "mlp_abs_sum", "mlp_sq_sum", "head_sq_sum", "hidden_sq_sum", "block_cos_sum", "token_counts")


def empty_stats(num_layers: int, intermediate: int, heads: int, hidden: int, vocab: int) -> Stats:
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    return {
        "tokens": z(1),
        "mlp_abs_sum": z(num_layers, intermediate),
        "mlp_sq_sum": z(num_layers, intermediate),
        "head_sq_sum": z(num_layers, heads),
        "hidden_sq_sum": z(num_layers, hidden),
        "block_cos_sum": z(num_layers),
        "token_counts": z(vocab),
    }


def stats_for_model(model: nn.Module) -> Stats:
    w = widths(model)
    return empty_stats(w["layers"], w["intermediate"], w["heads"], w["hidden"], w["vocab"])


def merge(parts: Iterable[Mapping[str, torch.Tensor]]) -> Stats:
    """Sum statistics. Keys must agree; the result is a fresh dict of float64 tensors."""
    out: Stats | None = None
    for part in parts:
        if out is None:
            out = {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in part.items()}
            continue
        if set(part) != set(out):
            raise ValueError(f"cannot merge statistics with different entries: {sorted(set(part) ^ set(out))}")
        for k, v in part.items():
            out[k] += torch.as_tensor(v, dtype=torch.float64)
    if out is None:
        raise ValueError("merge() needs at least one statistics dict")
    return out


def to_numpy(stats: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """For shipping through Ray: CPU numpy, never CUDA tensors."""
    return {k: v.detach().cpu().numpy() for k, v in stats.items()}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> Stats:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)).clone() for k, v in arrays.items()}


def _first_tensor(x):
    return x[0] if isinstance(x, tuple | list) else x


@contextmanager
def collecting(model: nn.Module, stats: Stats):
    """Register hooks that add one forward pass's statistics into `stats` (in place); removed on exit."""
    heads = widths(model)["heads"]
    handles = []

    def add_rows(name: str, layer: int, a: torch.Tensor, fn) -> None:
        flat = a.reshape(-1, a.shape[-1])
        stats[name][layer] += fn(flat).sum(0, dtype=torch.float64) if fn else flat.sum(0, dtype=torch.float64)

    for i, layer in enumerate(decoder_layers(model)):
        _, down = mlp_parts(layer)

        def mlp_hook(_m, args, i=i):
            a = args[0].detach()
            add_rows("mlp_abs_sum", i, a, torch.abs)
            add_rows("mlp_sq_sum", i, a, torch.square)

        def head_hook(_m, args, i=i):
            a = args[0].detach()
            per_head = a.reshape(*a.shape[:-1], heads, a.shape[-1] // heads).float()
            add_rows("head_sq_sum", i, per_head.square().sum(-1), None)

        def block_hook(_m, args, kwargs, output, i=i):
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            y = _first_tensor(output).detach()
            add_rows("hidden_sq_sum", i, x, torch.square)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            stats["block_cos_sum"][i] += cos.sum(dtype=torch.float64)

        handles.append(down.register_forward_pre_hook(mlp_hook))
        handles.append(attn_output(layer).register_forward_pre_hook(head_hook))
        handles.append(layer.register_forward_hook(block_hook, with_kwargs=True))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def accumulate(model: nn.Module, blocks: torch.Tensor, batch_size: int, stats: Stats | None = None) -> Stats:
    """Run `blocks` [N, T] through the model's decoder (no lm_head: it affects no statistic) and add their stats."""
    if stats is None:
        stats = stats_for_model(model)
    device = next(model.parameters()).device
    with collecting(model, stats):
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            model.base_model(input_ids=ids, use_cache=False)
            stats["tokens"] += ids.numel()
            stats["token_counts"] += torch.bincount(ids.reshape(-1).cpu(), minlength=stats["token_counts"].numel()
                                                    ).to(torch.float64)
    return stats


def taylor_sums(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> Stats:
    """First-order Taylor importance (LLM-Pruner) of coupled groups, as fp64 sums over batches.

    For every batch the next-token loss is back-propagated and sum |w * dL/dw| is added per MLP channel (its input
    rows, biases and output column) and per KV group (its key/value rows, its query heads' rows and their output
    projection columns). Entries: taylor_batches [1], taylor_mlp [L, I], taylor_kv [L, G] (zeros where the
    architecture's heads cannot be pruned). Gradients are cleared afterwards; the weights are not changed.
    """
    w = widths(model)
    layers = decoder_layers(model)
    out = {"taylor_batches": torch.zeros(1, dtype=torch.float64),
           "taylor_mlp": torch.zeros(w["layers"], w["intermediate"], dtype=torch.float64),
           "taylor_kv": torch.zeros(w["layers"], w["kv_heads"], dtype=torch.float64)}
    mlp = mlp_coupling(model)
    try:
        kv = kv_coupling(model)
    except ConfigError:  # e.g. GPT-2: no prunable KV groups
        kv = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    params = dict(layer.named_parameters())
                    for coupling, key, n in ((mlp, "taylor_mlp", w["intermediate"]), (kv, "taylor_kv", w["kv_heads"])):
                        for c in coupling:
                            p = params[c.name]
                            if p.grad is None:
                                continue
                            contrib = (p.detach().double() * p.grad.double()).abs()
                            per_index = contrib.sum(dim=[d for d in range(p.dim()) if d != c.dim]) if p.dim() > 1 \
                                else contrib
                            out[key][i] += per_index.reshape(n, c.size).sum(1).cpu()
            out["taylor_batches"] += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out
