"""Importance scores: plain functions from (profile statistics, model weights) to scores per prunable structure.

Higher means more important. Every method returns a `Scores`: one score per MLP channel [L, I], per KV group
[L, G] (None where the method or the architecture has none), per layer [L] (block influence) and per token [V]
(the domain's token counts, for vocabulary pruning), so the plan builder does not care which method produced it.

Methods (the seed papers):
  contextual  Mini-GPTs: mean |activation| of each channel on the domain; heads by the RMS of their output.
  cus-prun    Cus-Prun: a channel's relevance to the domain contrasted with its relevance to the job's other
              corpora; what serves only the other corpora scores lowest.
  taylor      LLM-Pruner: first-order Taylor importance sum |w * grad| of coupled groups (needs taylor_sums).
  wanda-sp    structured Wanda: sum |W| * ||X|| over a structure's output weights.
  flap        FLAP: the variance of a structure's input across tokens x the squared norm of its output weights
              (needs the Gram statistics and sums; a near-constant input is what the refit carries over).
  magnitude   data-free: L2 norm of the structure's coupled weights.
  random      seeded uniform baseline.
  depth       block influence: 1 - mean cos(layer input, layer output); the plan drops the least influential layers
              (with prune.reconstruct: the contiguous span whose linear replacement leaves the least residual).
  obs         structured Optimal Brain Surgeon (SlimGPT, ZipLM): per layer, greedy removal by the OBS error on the
              Gram matrix of the output projection's input (needs the Gram statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minigpt.config import ConfigError, PruneConfig
from minigpt.models import (arch_of, decoder_layers, kv_coupling, kv_prunable, mlp_coupling, per_unit, q_coupling,
                            widths)
from minigpt import refit

Stats = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Scores:
    mlp: torch.Tensor  # [L, I]
    kv: torch.Tensor | None  # [L, G]
    layer: torch.Tensor  # [L], block influence (higher = the layer changes its input more)
    vocab: torch.Tensor  # [V], token counts on the domain
    q: torch.Tensor | None = None  # [L, H] per query head (pruned inside KV groups); None where there is none


def _tokens(stats: Stats) -> torch.Tensor:
    return stats["tokens"].double().clamp_min(1)


def _group_heads(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, H] per query head -> [L, G] per KV group (a group's query heads are contiguous)."""
    return per_head.reshape(per_head.shape[0], groups, -1).sum(-1)


def block_influence(stats: Stats) -> torch.Tensor:
    return 1 - stats["block_cos_sum"].double() / _tokens(stats)


def _head_rms(stats: Stats) -> torch.Tensor:
    """RMS norm of each query head's output per token [L, H]."""
    return (stats["head_sq_sum"].double() / _tokens(stats)).sqrt()


def _finish(stats: Stats, model: nn.Module, mlp: torch.Tensor, kv: torch.Tensor | None,
            q: torch.Tensor | None = None) -> Scores:
    prunable = kv_prunable(model)
    return Scores(mlp=mlp.double(), kv=kv.double() if kv is not None and prunable else None,
                  layer=block_influence(stats), vocab=stats["token_counts"].double(),
                  q=q.double() if q is not None and prunable else None)


def contextual(stats: Stats, model: nn.Module) -> Scores:
    """Mini-GPTs: mean |activation| of each MLP channel on the domain; a KV group by its query heads' output RMS."""
    mlp = stats["mlp_abs_sum"].double() / _tokens(stats)
    kv = _group_heads(_head_rms(stats), widths(model)["kv_heads"])
    return _finish(stats, model, mlp, kv, _head_rms(stats))


def _relevance(stats: Stats, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer normalised mean |activation| (channels), head RMS (groups) and head RMS (query heads), so corpora
    compare on one scale."""
    mlp = stats["mlp_abs_sum"].double() / _tokens(stats)
    q = _head_rms(stats)
    kv = _group_heads(q, widths(model)["kv_heads"])
    norm = lambda x: x / x.mean(1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return norm(mlp), norm(kv), norm(q)


def cus_prun(stats: Stats, model: nn.Module, *, others: Mapping[str, Stats] | None, strength: float = 1.0) -> Scores:
    """Cus-Prun: keep what the domain uses; push down what is relevant only to the other corpora.

    score = r_d - strength * max(0, max_o r_o - r_d), with r the per-layer normalised relevance on each corpus.
    A channel the domain uses keeps its relevance; one that serves another corpus more than this domain falls below
    even a silent channel, so it is pruned first (the paper's 'prune the irrelevant dimensions').
    """
    if not others:
        raise ConfigError("prune.method cus-prun needs other corpora (other domains or a general corpus) to contrast")
    mine = _relevance(stats, model)
    rel = [_relevance(o, model) for o in others.values()]
    contrast = [d - strength * (torch.stack([r[k] for r in rel]).amax(0) - d).clamp_min(0) for k, d in enumerate(mine)]
    return _finish(stats, model, *contrast)


def taylor(stats: Stats, model: nn.Module, *, grad: Stats | None) -> Scores:
    """LLM-Pruner: mean over batches of sum |w * dL/dw| over each coupled group (from stats.taylor_sums)."""
    if grad is None or "taylor_mlp" not in grad:
        raise ConfigError("prune.method taylor needs gradient statistics (minigpt.stats.taylor_sums)")
    n = grad["taylor_batches"].double().clamp_min(1)
    return _finish(stats, model, grad["taylor_mlp"].double() / n, grad["taylor_kv"].double() / n)


def _out_weight_norms(model: nn.Module, coupling, square: bool = False) -> list[torch.Tensor]:
    """Per block: sum |W| (square: sum W^2) of the output projection per index along its coupled dimension."""
    out = next(c for c in coupling if c.output)
    rows = []
    for layer in decoder_layers(model):
        w = dict(layer.named_parameters())[out.name].detach()
        if w.device.type == "meta":  # a layer not read (minigpt.sequential streams one at a time): zero
            rows.append(torch.zeros(w.shape[out.dim], dtype=torch.float64))
            continue
        w = w.double()
        rows.append((w.square() if square else w.abs()).sum(1 - out.dim))
    return rows


def wanda_sp(stats: Stats, model: nn.Module) -> Scores:
    """Structured Wanda: sum_i |W_out[i, j]| * ||X_j|| with ||X_j|| the RMS of the structure's input activation."""
    rms = (stats["mlp_sq_sum"].double() / _tokens(stats)).sqrt()
    mlp = torch.stack(_out_weight_norms(model, mlp_coupling(model))) * rms
    kv = None
    if kv_prunable(model):
        w = widths(model)
        col = torch.stack(_out_weight_norms(model, kv_coupling(model)))  # [L, H * head_dim]
        # Only per-head norms are profiled: spread each head's mean square evenly over its head_dim inputs.
        head_rms = (stats["head_sq_sum"].double() / _tokens(stats) / w["head_dim"]).sqrt()
        per_head = col.reshape(col.shape[0], w["heads"], w["head_dim"]).sum(-1) * head_rms
        kv = _group_heads(per_head, w["kv_heads"])
        return _finish(stats, model, mlp, kv, per_head)
    return _finish(stats, model, mlp, kv)


def _input_variance(stats: Stats, gram: str, total: str, layers: Sequence[int]) -> torch.Tensor:
    """[L, n] variance across tokens of each input channel of an output projection, from the Gram matrix's
    diagonal (sum x^2) and the sums (sum x); rows outside `layers` stay zero."""
    n, sums = _tokens(stats), stats[total].double()
    out = torch.zeros_like(sums)
    for i in layers:
        out[i] = (torch.diagonal(stats[gram][i].double()) / n - (sums[i] / n).square()).clamp_min(0)
    return out


def flap(stats: Stats, model: nn.Module, *, layers: Sequence[int] | None = None) -> Scores:
    """FLAP (An et al., AAAI 2024), its WIFV metric: the variance of a unit's input across tokens times the squared
    norm of the output-projection weights it feeds (an MLP channel's column; a query head's head_dim columns,
    averaged; a KV group's heads, summed).

    A channel whose input hardly fluctuates adds a near-constant vector to the residual stream. FLAP removes it and
    adds that constant to a bias; minigpt's experts keep the base architecture's bias-free projections, so the
    least-squares refit (prune.reconstruct, on the uncentred Gram matrix) is what carries the mean over. Needs the
    Gram statistics and sums (sequential runners sum them layer by layer); `layers` limits the work as for obs."""
    if "mlp_gram" not in stats or "mlp_sum" not in stats:
        raise refit.RefitError("prune.method flap needs the profile's Gram statistics and sums (mlp_gram, mlp_sum)")
    w = widths(model)
    layers = range(w["layers"]) if layers is None else layers
    mlp = _input_variance(stats, "mlp_gram", "mlp_sum", layers) * torch.stack(
        _out_weight_norms(model, mlp_coupling(model), square=True))
    if not kv_prunable(model):
        return _finish(stats, model, mlp, None)
    col = _input_variance(stats, "attn_gram", "attn_sum", layers) * torch.stack(
        _out_weight_norms(model, kv_coupling(model), square=True))  # [L, H * head_dim]
    per_head = col.reshape(col.shape[0], w["heads"], w["head_dim"]).mean(-1)
    return _finish(stats, model, mlp, _group_heads(per_head, w["kv_heads"]), per_head)


def _coupled_l2(model: nn.Module, coupling, units: int) -> torch.Tensor:
    rows = []
    for layer in decoder_layers(model):
        params = dict(layer.named_parameters())
        sq = torch.zeros(units, dtype=torch.float64)
        for c in coupling:
            if params[c.name].device.type == "meta":  # a layer not read (minigpt.sequential): zero
                continue
            p = params[c.name].detach().double().square()
            per_index = p.sum(dim=[d for d in range(p.dim()) if d != c.dim]) if p.dim() > 1 else p
            sq += per_unit(c, per_index, units).sum(1)  # the coupling's segment of a fused tensor
        rows.append(sq.sqrt())
    return torch.stack(rows)


def magnitude(stats: Stats, model: nn.Module) -> Scores:
    """Data-free baseline: L2 norm of each structure's coupled weights."""
    w = widths(model)
    kv = _coupled_l2(model, kv_coupling(model), w["kv_heads"]) if kv_prunable(model) else None
    q = _coupled_l2(model, q_coupling(model), w["heads"]) if kv_prunable(model) else None
    return _finish(stats, model, _coupled_l2(model, mlp_coupling(model), w["intermediate"]), kv, q)


def random(stats: Stats, model: nn.Module, *, seed: int = 0) -> Scores:
    """Baseline: seeded uniform scores."""
    g = torch.Generator().manual_seed(seed)
    w = widths(model)
    mlp = torch.rand(stats["mlp_abs_sum"].shape, generator=g, dtype=torch.float64)
    kv = torch.rand((w["layers"], w["kv_heads"]), generator=g, dtype=torch.float64)
    q = torch.rand((w["layers"], w["heads"]), generator=g, dtype=torch.float64)
    return _finish(stats, model, mlp, kv, q)


def depth(stats: Stats, model: nn.Module) -> Scores:
    """Block influence only: channels and groups are not ranked (the plan drops whole layers)."""
    w = widths(model)
    return _finish(stats, model, torch.ones(w["layers"], w["intermediate"], dtype=torch.float64),
                   torch.ones(w["layers"], w["kv_heads"], dtype=torch.float64))


def _order_scores(order: list[int], units: int) -> torch.Tensor:
    """Removal order -> scores: the k-th unit removed scores k, every unit OBS keeps scores len(order)."""
    s = torch.full((units,), float(len(order)), dtype=torch.float64)
    s[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(order), dtype=torch.float64)
    return s


def obs(stats: Stats, model: nn.Module, *, shape, damp: float = 0.01, batch: int = 0,
        layers: Sequence[int] | None = None) -> Scores:
    """Structured OBS (SlimGPT / ZipLM): per layer, the units greedy OBS removes to reach the shape's widths on the
    Gram matrix of the output projection's input (minigpt.refit.obs_order) score lowest, in removal order.

    The scores only mean something at the shape's widths (OBS is greedy and path-dependent); `batch` units are
    removed per step (0: a 64th of the units to remove, at least 1). `layers` limits the work to those layers
    (sequential pruning scores one layer at a time); the others score zero."""
    if shape is None:
        raise ConfigError("prune.method obs needs the target widths before scoring (prune.mode target)")
    if "mlp_gram" not in stats:
        raise refit.RefitError("prune.method obs needs the profile's Gram statistics (mlp_gram, attn_gram)")
    w = widths(model)
    L, I, G = w["layers"], w["intermediate"], w["kv_heads"]
    conv1d = arch_of(model).conv1d
    mlp_c = next(c for c in mlp_coupling(model) if c.output)
    mlp = torch.zeros(L, I, dtype=torch.float64)
    kv = torch.zeros(L, G, dtype=torch.float64) if kv_prunable(model) else None
    q = torch.zeros(L, w["heads"], dtype=torch.float64) if kv_prunable(model) else None
    for i, layer in enumerate(decoder_layers(model)):
        if layers is not None and i not in layers:
            continue
        params = dict(layer.named_parameters())
        remove = I - shape.mlp_width
        if remove:
            W = params[mlp_c.name].detach()
            W = W.T if conv1d else W
            order, _ = refit.obs_order(W, stats["mlp_gram"][i], 1, damp, remove=remove,
                                       batch=batch or max(1, remove // 64))
            mlp[i] = _order_scores(order, I)
        if kv is not None and shape.kv_groups < G:
            kv_c = next(c for c in kv_coupling(model) if c.output)
            W = params[kv_c.name].detach()
            order, _ = refit.obs_order(W, stats["attn_gram"][i], kv_c.size, damp, remove=G - shape.kv_groups)
            kv[i] = _order_scores(order, G)
        per_group = w["heads"] // G
        if q is not None and shape.q_heads and shape.q_heads < per_group:
            # Within each group on its own (the same number leaves every group), the other heads absorbing.
            q_c = next(c for c in q_coupling(model) if c.output)
            W = params[q_c.name].detach()
            for g in range(G):
                heads = list(range(g * per_group, (g + 1) * per_group))
                order, _ = refit.obs_order(W, stats["attn_gram"][i], q_c.size, damp,
                                           remove=per_group - shape.q_heads, candidates=heads)
                q[i, heads] = _order_scores(order, w["heads"])[heads]
    return _finish(stats, model, mlp, kv, q)


def score_all(prune_cfg: PruneConfig | str, stats: Stats, model: nn.Module, *, others: Mapping[str, Stats] | None = None,
              grad: Stats | None = None, shape=None, layers: Sequence[int] | None = None) -> Scores:
    """Scores of the method `prune_cfg.method` (or a method name, with default settings), each method given exactly
    the inputs it uses: other corpora (cus-prun), gradient sums (taylor), the target widths (obs)."""
    cfg = prune_cfg if isinstance(prune_cfg, PruneConfig) else None
    method = cfg.method if cfg is not None else prune_cfg
    if method not in METHODS:
        raise ConfigError(f"unknown prune.method {method!r}; known: {', '.join(METHODS)}")
    cfg = cfg or PruneConfig(method=method)
    if method == "cus-prun":
        return cus_prun(stats, model, others=others, strength=cfg.cus_prun_strength)
    if method == "taylor":
        return taylor(stats, model, grad=grad)
    if method == "random":
        return random(stats, model, seed=cfg.seed)
    if method == "obs":
        return obs(stats, model, shape=shape, damp=cfg.damp, batch=cfg.obs_batch, layers=layers)
    if method == "flap":
        return flap(stats, model, layers=layers)
    return METHODS[method](stats, model)


METHODS: dict[str, Callable[..., Scores]] = {
    "contextual": contextual,
    "cus-prun": cus_prun,
    "taylor": taylor,
    "wanda-sp": wanda_sp,
    "flap": flap,
    "magnitude": magnitude,
    "random": random,
    "depth": depth,
    "obs": obs,
}


__all__ = ["METHODS", "Scores", "block_influence", "score_all"]
