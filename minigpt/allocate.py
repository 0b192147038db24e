"""Allocation within stock shapes: the mix of dropped layers, KV groups and MLP width that meets a size target with
the least *predicted* loss, computed from the statistics alone (no forward pass of any candidate).

A stock checkpoint has one MLP width and one KV group count for every layer, but a target can be met many ways:
narrower MLPs everywhere, or one KV group fewer and wider MLPs, or an n-layer span replaced by a linear map
(minigpt.refit.replacement) and the rest narrowed less. Each way's damage is predicted in one currency: the error it
adds to each channel d of the residual stream at position p, summed over the calibration tokens and priced by
F[p, d], the squared loss gradient of that channel (stats.taylor_sums' taylor_resid, a diagonal empirical Fisher):
sum_d F[p, d] sum_t e[t, d]^2 is, up to a constant factor, the second-order increase of the loss.
  * MLP channels of layer l: the cumulative error of greedy structured OBS removing k channels (refit.obs_order on
    the output projection with its rows scaled by sqrt(F[l + 1]); the least-squares objective the compensation
    minimises, per channel);
  * KV groups: the same for whole groups of the attention output projection; query heads: the same for the heads
    of each group, the same number leaving every group (summed over groups; scaled by the share of groups kept
    when groups go too);
  * a replaced span: the per-channel least-squares residual of its replacement, priced at the stream leaving the
    span (plan.replacement_span).
Why a gradient price and not the energy of the stream: the residual stream of most LLMs carries a few "massive"
channels (SmolLM2: one channel holds 97% of the energy in mid layers) that the next norms mostly ignore; relative to
raw energy, errors in the other channels look free, and every allocation then drops layers.
Errors add across layers as a first-order model. `allocate` evaluates every stock shape on a small grid and returns
the cheapest; benchmarks/methods.py measures whether it pays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from minigpt.config import ConfigError, PruneConfig
from minigpt.models import (arch_of, count_parameters, decoder_layers, kv_coupling, kv_prunable, layer_params,
                            mlp_coupling, params_per_unit, q_coupling, widths)


@dataclass(frozen=True)
class Candidate:
    depth: int  # layers cut (one span, replaced)
    first: int  # first layer of the span (-1: none)
    kv_groups: int
    q_heads: int  # query heads kept per KV group
    mlp_width: int
    predicted: float  # summed relative error
    removed: float  # share of non-embedding parameters removed


def depth_options(max_layers: int) -> tuple[int, ...]:
    """Span lengths offered to the allocation (each costs one D x D moment per layer in the profile)."""
    return tuple(sorted({n for n in (1, 2, 4, max_layers // 2, max_layers) if n >= 1}))


def _curve(W: torch.Tensor, G: torch.Tensor, price: torch.Tensor, group: int, damp: float, remove: int,
           candidates=None) -> list[float]:
    """Priced OBS error after removing 0..remove units of W [out, in] (price: per output channel)."""
    from minigpt import refit

    if remove <= 0:
        return [0.0]
    Wp = W.double() * price.double().sqrt()[:, None]
    _, errors = refit.obs_order(Wp, G, group, damp, remove=remove, batch=max(1, remove // 64),
                                candidates=None if candidates is None else list(candidates))
    return [0.0, *errors]


def allocate(model: nn.Module, stats: Mapping[str, torch.Tensor], prune_cfg: PruneConfig,
             fisher: torch.Tensor | None) -> tuple[Candidate, list[Candidate]]:
    """(the cheapest stock shape for prune_cfg.target, every candidate evaluated) — see the module docstring.

    `fisher`: taylor_resid [L + 1, D] of stats.taylor_sums on the domain's calibration blocks."""
    from minigpt import plan as P

    if "mlp_gram" not in stats:
        raise ConfigError("prune.allocate needs the profile's Gram statistics (prune.reconstruct true)")
    if fisher is None:
        raise ConfigError("prune.allocate needs the loss gradients of the residual stream (stats.taylor_sums' "
                          "taylor_resid), computed on prune.taylor_blocks calibration blocks")
    w = widths(model)
    L, I, G = w["layers"], w["intermediate"], w["kv_heads"]
    conv1d = arch_of(model).conv1d
    _, non_emb = count_parameters(model)
    block = layer_params(model)
    kv_unit = params_per_unit(model, kv_coupling(model)) if kv_prunable(model) else 0
    q_unit = params_per_unit(model, q_coupling(model)) if kv_prunable(model) else 0
    kv_options = range(G, 0, -1) if kv_prunable(model) else [G]
    per_group = w["heads"] // G
    q_options = range(per_group, 0, -1) if kv_prunable(model) else [per_group]
    spans = [n for n in depth_options(P.depth_layers(model, prune_cfg.target)) if f"depth_cross_{n}" in stats]
    # The widest MLP cut any candidate needs: every layer kept, every KV group kept.
    min_width = P.uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of)
    mlp_out = next(c for c in mlp_coupling(model) if c.output)
    kv_out = next(c for c in kv_coupling(model) if c.output) if kv_prunable(model) else None
    q_out = next(c for c in q_coupling(model) if c.output) if kv_prunable(model) else None
    mlp_rel, kv_rel, q_rel = [], [], []
    for i, layer in enumerate(decoder_layers(model)):
        params = dict(layer.named_parameters())
        Wm = params[mlp_out.name].detach()
        # Both output projections add to the stream that enters layer i + 1 (the attention output also passes
        # through layer i's MLP; first order ignores that).
        price = fisher[i + 1]
        mlp_rel.append(_curve(Wm.T if conv1d else Wm, stats["mlp_gram"][i], price, 1, prune_cfg.damp,
                              I - min_width))
        if kv_out is not None:
            Wo, Go = params[kv_out.name].detach(), stats["attn_gram"][i]
            kv_rel.append(_curve(Wo, Go, price, kv_out.size, prune_cfg.damp, G - 1))
            # r heads out of every group: each group's own OBS curve, summed over the groups.
            curves = [_curve(Wo, Go, price, q_out.size, prune_cfg.damp, per_group - 1,
                             candidates=range(g * per_group, (g + 1) * per_group)) for g in range(G)]
            q_rel.append([sum(c[r] for c in curves) for r in range(per_group)])
    out: list[Candidate] = []
    for n in [0, *spans]:
        first, rel = P.replacement_span(stats, n, prune_cfg.damp, fisher) if n else (-1, [0.0])
        kept = [i for i in range(L) if not (n and first <= i < first + n)]
        for kv, q in [(kv, q) for kv in kv_options for q in q_options]:
            already = n * block + len(kept) * ((G - kv) * kv_unit + kv * (per_group - q) * q_unit)
            try:
                width = P.uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of, already_removed=already,
                                            layers=len(kept)) if already < prune_cfg.target * non_emb else I
            except ConfigError:
                continue
            if I - width >= len(mlp_rel[0]):
                continue  # a cut spread over fewer layers can be deeper than the curves were computed for
            removed = (already + len(kept) * (I - width) * params_per_unit(model, mlp_coupling(model))) / non_emb
            if removed > prune_cfg.target + 0.02:
                continue  # the layers and groups alone overshoot the target
            pred = sum(mlp_rel[i][I - width] for i in kept) + (rel[first] if n else 0.0)
            if kv_out is not None:
                pred += sum(kv_rel[i][G - kv] + q_rel[i][per_group - q] * kv / G for i in kept)
            out.append(Candidate(n, first, kv, q, width, pred, removed))
    if not out:
        raise ConfigError(f"prune.allocate found no stock shape for prune.target {prune_cfg.target}")
    return min(out, key=lambda c: (c.predicted, -c.mlp_width)), out


__all__ = ["Candidate", "allocate", "depth_options"]
