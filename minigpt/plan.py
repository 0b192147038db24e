"""PruningPlan for a domain: the one call from a profile and a job's prune settings to a plan (`build_plan`), the
shape a fixed-ratio job asks for (`target_shape`) and the statistics the settings need (`stat_spec`).

The plan's data types and shape maths are minigpt.plandata (re-exported here); the allocation over stock shapes is
minigpt.allocate; the importance methods are minigpt.scoring. This module sits above all three.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from minigpt import scoring
from minigpt.allocate import allocate, verified
from minigpt.config import ConfigError, PruneConfig
from minigpt.models import (check_replacement, check_stream_refit, depth_replaceable, kv_coupling, kv_prunable,
                            params_per_unit, q_coupling, widths)
from minigpt.plandata import (FORMAT, LayerPlan, PruningPlan, Shape, depth_layers, depth_options,  # noqa: F401
                              mlp_keep, plan_from_shape, predict_params, removed_fraction, replacement_span,
                              threshold_width, top_units, uniform_mlp_width, vocab_keep)
from minigpt.stats import StatSpec


def stream_refit(prune_cfg: PruneConfig, model_or_config) -> bool:
    """Whether sequential pruning refits toward the dense model's residual stream (prune.refit_target): `stream`
    raises in one line where the architecture cannot (post-norm blocks), `auto` falls back to the layer target."""
    if prune_cfg.refit_target == "stream":
        check_stream_refit(model_or_config)
        return True
    return (prune_cfg.refit_target == "auto" and prune_cfg.sequential and prune_cfg.reconstruct
            and depth_replaceable(model_or_config))


def stat_spec(prune_cfg: PruneConfig, model_or_config) -> StatSpec:
    """The optional statistics a job's prune settings need from calibration (minigpt.stats)."""
    gram = prune_cfg.reconstruct or prune_cfg.method in ("obs", "flap") or prune_cfg.allocate
    spans = (depth_layers(model_or_config, prune_cfg.target),) if prune_cfg.method == "depth" and \
        prune_cfg.reconstruct else ()
    if spans:
        check_replacement(model_or_config)  # post-norm blocks (Gemma 3, OLMo 2): stop before calibrating
    stream_refit(prune_cfg, model_or_config)  # an explicit stream target: the same limit, for the same reason
    if prune_cfg.allocate:  # without replaceable spans, allocation chooses among width shapes only
        spans = depth_options(depth_layers(model_or_config, prune_cfg.target)) \
            if depth_replaceable(model_or_config) else ()
    # Sequential pruning sums each layer's Gram matrices itself, one layer at a time (minigpt.sequential).
    return StatSpec(gram=gram and prune_cfg.method != "depth" and not prune_cfg.sequential, depth_spans=spans)


def target_shape(model: nn.Module, prune_cfg: PruneConfig, scores, stats: Mapping[str, torch.Tensor],
                 grad_stats: Mapping[str, torch.Tensor] | None = None) -> Shape:
    """The uniform shape a fixed-ratio job asks for: depth drops layers, otherwise KV groups then MLP width.

    `grad_stats` (stats.taylor_sums), when it carries taylor_resid, prices depth replacements by the loss they add;
    prune.allocate needs it."""
    fisher = (grad_stats or {}).get("taylor_resid")
    w = widths(model)
    L, G = w["layers"], w["kv_heads"]
    if prune_cfg.method == "depth":
        n = depth_layers(model, prune_cfg.target)
        if prune_cfg.reconstruct:
            first, _ = replacement_span(stats, n, prune_cfg.damp, fisher)
            dropped = set(range(first, first + n))
        else:
            # Lowest block influence = the layer whose output is most similar to its input; ties: later first.
            dropped = set(sorted(range(L), key=lambda i: (float(scores.layer[i]), -i))[:n])
        return Shape(tuple(i for i in range(L) if i not in dropped), w["intermediate"], G)
    if prune_cfg.allocate:
        best, _ = allocate(model, stats, prune_cfg, fisher)
        return best.shape(L)
    kv_width = G
    already = 0
    if prune_cfg.kv_groups:
        if not kv_prunable(model):
            kv_coupling(model)  # raises the architecture's one-line reason
        if prune_cfg.kv_groups > G:
            raise ConfigError(f"prune.kv_groups {prune_cfg.kv_groups} exceeds the model's {G} KV groups")
        kv_width = prune_cfg.kv_groups
        already = L * (G - kv_width) * params_per_unit(model, kv_coupling(model))
    per_group = w["heads"] // G
    if prune_cfg.q_heads:
        if not kv_prunable(model):
            q_coupling(model)  # raises the architecture's one-line reason
        if prune_cfg.q_heads > per_group:
            raise ConfigError(f"prune.q_heads {prune_cfg.q_heads} exceeds the model's {per_group} query heads per "
                              "KV group")
        already += L * kv_width * (per_group - prune_cfg.q_heads) * params_per_unit(model, q_coupling(model))
    if prune_cfg.mode == "threshold":
        mlp_width = threshold_width(scores.mlp, prune_cfg.threshold, prune_cfg.multiple_of)
    else:
        mlp_width = uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of, already_removed=already)
    return Shape(tuple(range(L)), mlp_width, kv_width, q_heads=prune_cfg.q_heads)


def build_plan(profile_stats: Mapping[str, torch.Tensor], model: nn.Module, prune_cfg: PruneConfig, *, domain: str,
               other_profiles: Mapping[str, Mapping[str, torch.Tensor]] | None = None, base_model: str = "",
               profile: str = "", grad_stats: Mapping[str, torch.Tensor] | None = None,
               tokenizer=None, protect_layers: tuple[int, ...] = (), verify_blocks: torch.Tensor | None = None,
               log=None) -> PruningPlan:
    """One call from a domain profile and a job's prune settings to a plan, for every method (minigpt.scoring).

    `other_profiles` (other domains / a general corpus) feed cus-prun; `grad_stats` (stats.taylor_sums) feed taylor;
    `tokenizer` is needed only with prune.vocab. `protect_layers`: see plan_from_shape (non-uniform, not stock).
    `verify_blocks` (token blocks the profile never saw): with prune.allocate and prune.verify, the shortlisted
    shapes are measured on them and the best measured is built (minigpt.allocate.verified; `log` reports each).
    """
    if protect_layers and (prune_cfg.method == "depth" or prune_cfg.mode == "threshold"):
        raise ConfigError("protect_layers applies to target-mode channel/group pruning only")
    others = {k: v for k, v in (other_profiles or {}).items() if k != domain}
    # Shapes that do not depend on the scores are fixed first: OBS scores depend on how much each layer loses.
    needs_scores_first = prune_cfg.method == "depth" or prune_cfg.mode == "threshold"
    scores = scoring.score_all(prune_cfg, profile_stats, model, others=others, grad=grad_stats) \
        if needs_scores_first else None
    shape = target_shape(model, prune_cfg, scores, profile_stats, grad_stats)
    if protect_layers:
        # The protected layers keep everything, so the others share the whole cut.
        w = widths(model)
        n = w["layers"] - len({i % w["layers"] for i in protect_layers})
        already = n * (w["kv_heads"] - shape.kv_groups) * params_per_unit(model, kv_coupling(model)) \
            if shape.kv_groups != w["kv_heads"] else 0
        shape = Shape(shape.kept_layers, uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of,
                                                           already_removed=already, layers=n), shape.kv_groups)

    def plan_for(shape: Shape, scores=None, with_vocab: bool = False) -> PruningPlan:
        if scores is None:
            scores = scoring.score_all(prune_cfg, profile_stats, model, others=others, grad=grad_stats, shape=shape)
        vocab = vocab_keep(scores.vocab, tokenizer, prune_cfg.vocab_min_count) if with_vocab else None
        return plan_from_shape(scores, model, shape, domain=domain, method=prune_cfg.method, vocab=vocab,
                               base_model=base_model, profile=profile, target=prune_cfg.target, mode=prune_cfg.mode,
                               threshold=prune_cfg.threshold if prune_cfg.mode == "threshold" else None,
                               reconstruct=prune_cfg.reconstruct, damp=prune_cfg.damp,
                               replace=prune_cfg.reconstruct and (prune_cfg.method == "depth" or prune_cfg.allocate),
                               protect=protect_layers)

    if prune_cfg.allocate and prune_cfg.verify and verify_blocks is not None:
        # Measured in the dense vocabulary (the blocks' ids); the chosen shape then gets its vocabulary cut.
        best, rows = verified(model, profile_stats, prune_cfg, (grad_stats or {}).get("taylor_resid"),
                              verify_blocks, plan_for, log=log)
        if not prune_cfg.vocab:
            return best
        shape = min(rows, key=lambda r: r[1])[0].shape(widths(model)["layers"])
    return plan_for(shape, scores, with_vocab=prune_cfg.vocab)


__all__ = ["FORMAT", "LayerPlan", "PruningPlan", "Shape", "build_plan", "mlp_keep", "plan_from_shape",
           "predict_params", "removed_fraction", "stat_spec", "stream_refit", "target_shape", "threshold_width",
           "top_units", "uniform_mlp_width", "vocab_keep"]
