"""Importance scores: plain functions from (profile statistics, model weights) to one score per MLP channel.

Higher means more important. Every method returns a float64 tensor [num_layers, intermediate_size], so the plan
builder does not care which method produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from minigpt.models import decoder_layers, mlp_parts


def contextual(stats: Mapping[str, torch.Tensor], model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Mini-GPTs: mean |activation| of each channel on the domain."""
    return stats["mlp_abs_sum"] / stats["tokens"].clamp_min(1)


def wanda_sp(stats: Mapping[str, torch.Tensor], model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Structured Wanda: sum_i |W_down[i, j]| * ||X_j||, with ||X_j|| the RMS of the channel's activation."""
    rms = (stats["mlp_sq_sum"] / stats["tokens"].clamp_min(1)).sqrt()
    w = torch.stack([mlp_parts(layer)[1].weight.detach().abs().sum(0).double() for layer in decoder_layers(model)])
    return w * rms


def magnitude(stats: Mapping[str, torch.Tensor], model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Data-free baseline: L2 norm of the channel's coupled weights (input rows and output column)."""
    rows = []
    for layer in decoder_layers(model):
        ins, down = mlp_parts(layer)
        sq = sum(p.weight.detach().double().square().sum(1) for p in ins) + down.weight.detach().double().square().sum(0)
        rows.append(sq.sqrt())
    return torch.stack(rows)


def random(stats: Mapping[str, torch.Tensor], model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Baseline: seeded uniform scores."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(stats["mlp_abs_sum"].shape, generator=g, dtype=torch.float64)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "contextual": contextual,
    "wanda-sp": wanda_sp,
    "magnitude": magnitude,
    "random": random,
}


def score(method: str, stats: Mapping[str, torch.Tensor], model: nn.Module, seed: int = 0) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method](stats, model, seed=seed)
