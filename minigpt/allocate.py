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
    span (plandata.replacement_span).
Why a gradient price and not the energy of the stream: the residual stream of most LLMs carries a few "massive"
channels (SmolLM2: one channel holds 97% of the energy in mid layers) that the next norms mostly ignore; relative to
raw energy, errors in the other channels look free, and every allocation then drops layers.
Errors add across layers as a first-order model. `allocate` evaluates every stock shape on a small grid and returns
the cheapest; benchmarks/methods.py measures whether it pays.

The prediction is known to undercount one large, structured perturbation (a replaced span: later layers amplify
its residual non-linearly), so with `prune.verify` N > 0 the prediction only shortlists: `verified` builds N shapes
(the one no allocation would build, then the best predicted of each span length), compensates and slims each, and
keeps the one with the lowest loss on blocks the statistics never saw (the domain's validation split), one forward
pass per shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minigpt.config import ConfigError, PruneConfig
from minigpt import plandata as P, refit
from minigpt.losses import validation_nll
from minigpt.models import (arch_of, count_parameters, decoder_layers, kv_coupling, kv_prunable, layer_params,
                            mlp_coupling, params_per_unit, q_coupling, widths)
from minigpt.plandata import Shape, depth_options  # noqa: F401 (depth_options: re-exported)
from minigpt.slim import slim_expert


@dataclass(frozen=True)
class Candidate:
    depth: int  # layers cut (one span, replaced)
    first: int  # first layer of the span (-1: none)
    kv_groups: int
    q_heads: int  # query heads kept per KV group
    mlp_width: int
    predicted: float  # predicted loss increase (priced error, summed over layers; up to a constant factor)
    removed: float  # share of non-embedding parameters removed

    def shape(self, num_layers: int):
        """The plandata.Shape this candidate builds in a model of `num_layers` layers."""
        span = range(self.first, self.first + self.depth) if self.depth else range(0)
        return Shape(tuple(i for i in range(num_layers) if i not in span), self.mlp_width, self.kv_groups,
                     q_heads=self.q_heads)


def _curve(W: torch.Tensor, G: torch.Tensor, price: torch.Tensor, group: int, damp: float, remove: int,
           candidates=None) -> list[float]:
    """Priced OBS error after removing 0..remove units of W [out, in] (price: per output channel)."""
    if remove <= 0:
        return [0.0]
    Wp = W.double() * price.double().sqrt()[:, None]
    _, errors = refit.obs_order(Wp, G, group, damp, remove=remove, batch=max(1, remove // 64),
                                candidates=None if candidates is None else list(candidates))
    return [0.0, *errors]


@dataclass(frozen=True)
class Curves:
    """Priced error of removing 0, 1, 2 ... units of each layer (see the module docstring)."""

    mlp: list[list[float]]  # [layer][MLP channels removed]
    kv: list[list[float]]  # [layer][KV groups removed]; empty when the architecture's heads cannot be pruned
    q: list[list[float]]  # [layer][query heads removed from every group]


def _check_inputs(stats: Mapping[str, torch.Tensor], fisher: torch.Tensor | None) -> None:
    if "mlp_gram" not in stats:
        raise ConfigError("prune.allocate needs the profile's Gram statistics (prune.reconstruct true)")
    if fisher is None:
        raise ConfigError("prune.allocate needs the loss gradients of the residual stream (stats.taylor_sums' "
                          "taylor_resid), computed on prune.taylor_blocks calibration blocks")


def priced_curves(model: nn.Module, stats: Mapping[str, torch.Tensor], fisher: torch.Tensor, damp: float,
                  mlp_remove: int) -> Curves:
    """Every layer's priced OBS curves: up to `mlp_remove` MLP channels, all but one KV group, all but one query
    head per group."""
    w = widths(model)
    G = w["kv_heads"]
    per_group = w["heads"] // G
    conv1d = arch_of(model).conv1d
    mlp_out = next(c for c in mlp_coupling(model) if c.output)
    kv_out = next(c for c in kv_coupling(model) if c.output) if kv_prunable(model) else None
    q_out = next(c for c in q_coupling(model) if c.output) if kv_prunable(model) else None
    curves = Curves([], [], [])
    for i, layer in enumerate(decoder_layers(model)):
        params = dict(layer.named_parameters())
        Wm = params[mlp_out.name].detach()
        # Both output projections add to the stream that enters layer i + 1 (the attention output also passes
        # through layer i's MLP; first order ignores that).
        price = fisher[i + 1]
        curves.mlp.append(_curve(Wm.T if conv1d else Wm, stats["mlp_gram"][i], price, 1, damp, mlp_remove))
        if kv_out is not None:
            Wo, Go = params[kv_out.name].detach(), stats["attn_gram"][i]
            curves.kv.append(_curve(Wo, Go, price, kv_out.size, damp, G - 1))
            # r heads out of every group: each group's own OBS curve, summed over the groups.
            per = [_curve(Wo, Go, price, q_out.size, damp, per_group - 1,
                          candidates=range(g * per_group, (g + 1) * per_group)) for g in range(G)]
            curves.q.append([sum(c[r] for c in per) for r in range(per_group)])
    return curves


def candidates(model: nn.Module, stats: Mapping[str, torch.Tensor], fisher: torch.Tensor, curves: Curves, *,
               target: float, multiple_of: int, damp: float, depth: bool = True) -> list[Candidate]:
    """Every stock shape on the grid that removes about `target` of the non-embedding parameters, with its
    predicted loss (`depth` False: no replaced spans)."""
    w = widths(model)
    L, I, G = w["layers"], w["intermediate"], w["kv_heads"]
    per_group = w["heads"] // G
    _, non_emb = count_parameters(model)
    block = layer_params(model)
    heads = kv_prunable(model)
    kv_unit = params_per_unit(model, kv_coupling(model)) if heads else 0
    q_unit = params_per_unit(model, q_coupling(model)) if heads else 0
    mlp_unit = params_per_unit(model, mlp_coupling(model))
    spans = [n for n in depth_options(P.depth_layers(model, target)) if f"depth_cross_{n}" in stats] if depth else []
    out: list[Candidate] = []
    for n in [0, *spans]:
        first, rel = P.replacement_span(stats, n, damp, fisher) if n else (-1, [0.0])
        kept = [i for i in range(L) if not (n and first <= i < first + n)]
        for kv in (range(G, 0, -1) if heads else [G]):
            for q in (range(per_group, 0, -1) if heads else [per_group]):
                already = n * block + len(kept) * ((G - kv) * kv_unit + kv * (per_group - q) * q_unit)
                if already > target * non_emb:
                    continue  # the layers and groups alone overshoot the target
                width = min(I, P.mlp_keep(model, target, multiple_of, already_removed=already, layers=len(kept)))
                if width < multiple_of or I - width >= len(curves.mlp[0]):
                    continue  # a cut spread over fewer layers can be deeper than the curves were computed for
                removed = (already + len(kept) * (I - width) * mlp_unit) / non_emb
                if removed > target + 0.02:
                    continue
                pred = sum(curves.mlp[i][I - width] for i in kept) + (rel[first] if n else 0.0)
                if heads:
                    pred += sum(curves.kv[i][G - kv] + curves.q[i][per_group - q] * kv / G for i in kept)
                out.append(Candidate(n, first, kv, q, width, pred, removed))
    return out


def _cheapest(cands: list[Candidate]) -> Candidate:
    return min(cands, key=lambda c: (c.predicted, -c.mlp_width))


def allocate(model: nn.Module, stats: Mapping[str, torch.Tensor], prune_cfg: PruneConfig,
             fisher: torch.Tensor | None) -> tuple[Candidate, list[Candidate]]:
    """(the cheapest stock shape for prune_cfg.target, every candidate evaluated) — see the module docstring.

    `fisher`: taylor_resid [L + 1, D] of stats.taylor_sums on the domain's calibration blocks."""
    _check_inputs(stats, fisher)
    # The widest MLP cut any candidate needs: every layer kept, every KV group kept.
    min_width = P.uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of)
    curves = priced_curves(model, stats, fisher, prune_cfg.damp, widths(model)["intermediate"] - min_width)
    out = candidates(model, stats, fisher, curves, target=prune_cfg.target, multiple_of=prune_cfg.multiple_of,
                     damp=prune_cfg.damp)
    if not out:
        raise ConfigError(f"prune.allocate found no stock shape for prune.target {prune_cfg.target}")
    return _cheapest(out), out


def shortlist(cands: Sequence[Candidate], n: int) -> list[Candidate]:
    """The `n` candidates worth measuring. First the shape the job would build without allocation (every layer,
    every KV group and query head, the MLP narrowed to the target), so measuring can only improve on it; then the
    cheapest predicted shape of each span length (0 = width only), most promising first; then the next cheapest
    overall. One per span length because the prediction's known error is structural (it undercounts one large
    replaced span), not a matter of ranking within a kind."""
    ranked = sorted(cands, key=lambda c: (c.predicted, -c.mlp_width))
    plain = [c for c in cands if c.depth == 0 and c.kv_groups == max(x.kv_groups for x in cands)
             and c.q_heads == max(x.q_heads for x in cands)]
    out, depths = plain[:1], set()
    for c in ranked:
        if c.depth not in depths and c not in out:
            out.append(c)
            depths.add(c.depth)
    out = out[:n]
    out += [c for c in ranked if c not in out][: max(0, n - len(out))]
    return out


@torch.inference_mode()
def measured_loss(model: nn.Module, plan, stats: Mapping[str, torch.Tensor], blocks: torch.Tensor,
                  batch_size: int) -> float:
    """Mean next-token loss on `blocks` of the expert `plan` builds (compensated as it will be, slimmed)."""
    small, _ = slim_expert(model, None, plan, stats)
    nll = validation_nll(small, blocks, 0, 1, batch_size, torch.device("cpu")).item()
    return nll / max(1, blocks[:, 1:].numel())


def verified(model: nn.Module, stats: Mapping[str, torch.Tensor], prune_cfg: PruneConfig,
             fisher: torch.Tensor | None, blocks: torch.Tensor, plan_for, batch_size: int = 4, log=None):
    """(the plan of the measured-best shape, [(candidate, measured loss)]): the `prune_cfg.verify` shortlisted
    shapes (see `shortlist`) are each built, compensated, slimmed and run on `blocks`; the lowest loss wins.
    `plan_for(shape)` builds the plan of a plan.Shape (the method's scores for that shape); `log` gets one line per
    measured shape."""
    _, cands = allocate(model, stats, prune_cfg, fisher)
    L = widths(model)["layers"]
    rows, best = [], None
    for c in shortlist(cands, prune_cfg.verify):
        plan = plan_for(c.shape(L))
        loss = measured_loss(model, plan, stats, blocks, batch_size)
        rows.append((c, loss))
        if log:
            log(f"{c.depth} layers replaced, {c.kv_groups} KV groups x {c.q_heads} query heads, MLP {c.mlp_width}: "
                f"predicted {c.predicted:.4g}, measured loss {loss:.4f}")
        if best is None or loss < best[1]:
            best = (plan, loss)
    return best[0], rows


def allocation_front(model: nn.Module, stats: Mapping[str, torch.Tensor], fisher: torch.Tensor | None,
                     targets: Sequence[float], *, damp: float, multiple_of: int, depth: bool = False,
                     query_heads: bool = False) -> list[Candidate]:
    """The cheapest stock shape at each feasible target (one set of curves, those of the largest target): the
    predicted Pareto front of size against loss, which warm-starts the architecture search (minigpt.search, whose
    shapes neither replace layers nor cut query heads inside groups: hence the defaults)."""
    _check_inputs(stats, fisher)
    I = widths(model)["intermediate"]
    # The deepest MLP cut any target needs (every layer and group kept); targets the MLPs cannot reach yield nothing.
    min_width = min(I, max(multiple_of, P.mlp_keep(model, max(targets), multiple_of)))
    curves = priced_curves(model, stats, fisher, damp, I - min_width)
    front = []
    for t in sorted(targets):
        cands = candidates(model, stats, fisher, curves, target=t, multiple_of=multiple_of, damp=damp, depth=depth)
        per_group = widths(model)["heads"] // widths(model)["kv_heads"]
        cands = [c for c in cands if query_heads or c.q_heads == per_group]
        if cands:
            front.append(_cheapest(cands))
    return front


__all__ = ["Candidate", "Curves", "allocate", "allocation_front", "candidates", "depth_options", "measured_loss",
           "priced_curves", "shortlist", "verified"]
