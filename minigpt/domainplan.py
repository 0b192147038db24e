"""The slim stage's plan for one domain, one function per mode behind one call (`plan_domain`): the shapes a search
picked, a sequential (layer-by-layer, on Ray actors) plan, or a fixed-ratio plan cut from the profile.

Each returns what slimming needs: the plan, the statistics its compensation is computed from (or the new weights a
sequential run computed itself) and, for a search, the further front points that are slimmed and evaluated too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from minigpt import corpora, general as G, plan as P, search as SE, sequential as Q, stats as ST
from minigpt.config import ConfigError
from minigpt.layerstore import LayerStore
from minigpt.raylib import print_actor_peaks
from minigpt.models import decoder_layers
from minigpt.plandata import PruningPlan
from minigpt.runfolder import Run



@dataclass(frozen=True)
class DomainPlan:
    plan: PruningPlan
    stats: Mapping[str, torch.Tensor] | None  # what a plan with `reconstruct` is compensated from
    weights: Mapping[str, torch.Tensor] | None = None  # new weights a sequential run computed itself
    extra: tuple[PruningPlan, ...] = ()  # further search front points (experts search-1, search-2, ...)


def plan_domain(p: Run, name: str, dense, tokenizer) -> DomainPlan:
    """The domain's plan in the job's mode: searched, sequential or fixed ratio."""
    if p.cfg.search.enabled:
        return _searched(p, name)
    if p.cfg.prune.sequential:
        return _sequential(p, name, dense, tokenizer)
    return _fixed_ratio(p, name, dense, tokenizer)


def _searched(p: Run, name: str) -> DomainPlan:
    # With prune.reconstruct the search scored every candidate compensated from the profile (minigpt.search), so
    # the picked shapes are compensated the same way when they are slimmed.
    stats = planning_stats(p, name) if p.cfg.prune.reconstruct else None
    picked = [dataclasses.replace(x, reconstruct=p.cfg.prune.reconstruct, damp=p.cfg.prune.damp)
              for x in picked_plans(p, name)]
    return DomainPlan(picked[0], stats, extra=tuple(picked[1:]))


def _sequential(p: Run, name: str, dense, tokenizer) -> DomainPlan:
    stats = ST.load_profile(p.layout.profile(name))[0]  # its token counts (vocabulary); the runners sum the rest
    plan, weights = _sequential_plan(p, name, dense, tokenizer, stats)
    return DomainPlan(plan, stats, weights)


def _fixed_ratio(p: Run, name: str, dense, tokenizer) -> DomainPlan:
    stats = planning_stats(p, name)
    return DomainPlan(_fixed_ratio_plan(p, name, dense, tokenizer, stats), stats)


def planning_stats(p: Run, domain: str):
    """The statistics a domain's plan is cut from: its profile, mixed with the general text's at
    prune.general_weight (stats.mix)."""
    stats = ST.load_profile(p.layout.profile(domain))[0]
    w = p.cfg.prune.general_weight
    return ST.mix(stats, ST.load_profile(p.layout.general_profile)[0], w) if w > 0 else stats


def picked_plans(p: Run, domain: str) -> list:
    """Plans the search picked for this domain (search.points of them, or one within search.budget)."""
    result = SE.SearchResult.from_json(SE.load_front(p.layout.search(domain)))
    picked = SE.pick(result, p.cfg.search.points, p.cfg.search.budget)
    if not picked:
        raise ConfigError(f"search found no plan for domain {domain!r} that removes anything; "
                          "widen search.mlp_fractions or raise search.generations")
    return picked


def _sequential_plan(p: Run, name: str, dense, tokenizer, stats):
    """Layer-by-layer choice and refit on Ray actors that each keep the activations of a share of the domain's
    calibration blocks (minigpt.sequential)."""
    import ray  # only sequential jobs need Ray in this module: kept off the import of every stage

    cfg = p.cfg
    blocks = corpora.read_blocks(corpora.DomainData.load(p.layout.data_dir(name)).shards("calib"))
    shares = [s for s in blocks.tensor_split(min(cfg.calibrate.workers, len(blocks))) if len(s)]
    general, weight = None, cfg.prune.general_weight
    if weight > 0:
        # General text rides along on the same runners, its sums weighted to general_weight x the domain's mass.
        text = corpora.read_blocks(G.shards(p.layout.general))
        general = text.tensor_split(len(shares))
        weight *= blocks.numel() / max(text.numel(), 1)
    c = cfg.calibrate
    runners = Q.ray_runners(str(p.model_dir), shares, c.batch_size, c.dtype, c.cpus_per_worker, c.gpus_per_worker,
                            general, weight, hidden_budget=c.stream_budget, streamed=c.streams,
                            memory=c.ray_memory.get("memory", 0))
    vocab = P.vocab_keep(stats["token_counts"], tokenizer, cfg.prune.vocab_min_count) if cfg.prune.vocab else None
    # `dense` is the model, or with calibrate.streamed its LayerStore: the driver reads, solves and lets go of one
    # layer at a time.
    n_layers = dense.num_layers if isinstance(dense, LayerStore) else len(decoder_layers(dense))
    try:
        return Q.prune_sequential(dense, runners, cfg.prune, domain=name, remote=True, vocab=vocab,
                                  base_model=cfg.model.source, profile=str(p.layout.profile(name)),
                                  on_layer=lambda i: print(f"[slim] {name}: sequential, layer {i + 1}/{n_layers}"
                                                           " pruned and refit", flush=True))
    finally:
        print_actor_peaks(f"{name}: sequential runners", runners)
        for r in runners:
            ray.kill(r)


def _fixed_ratio_plan(p: Run, name: str, dense, tokenizer, stats):
    cfg = p.cfg
    others = {o.name: ST.load_profile(p.layout.profile(o.name))[0]
              for o in cfg.domains if o.name != name} if cfg.prune.method == "cus-prun" else None
    grad = verify = None
    data = corpora.DomainData.load(p.layout.data_dir(name))
    replaced = cfg.prune.reconstruct and (cfg.prune.method == "depth" or cfg.prune.allocate)
    if cfg.prune.method == "taylor" or replaced:
        # Gradients (one backward pass over part of the calibration split): first-order Taylor importance, and
        # the loss gradient of the residual stream that prices the allocation's and the replaced span's errors.
        blocks = corpora.read_blocks(data.shards("calib"))[: cfg.prune.taylor_blocks]
        grad = ST.taylor_sums(dense, blocks, cfg.calibrate.batch_size)
    if cfg.prune.allocate and cfg.prune.verify:
        # Shapes are measured on text the statistics never saw: the validation split (the calibration split, and
        # a warning, when the job has none).
        split = "valid" if "valid" in data.splits and data.shards("valid") else "calib"
        if split == "calib":
            print(f"[slim] {name}: no validation split (data.valid_fraction 0): prune.verify measures shapes on "
                  "calibration blocks", flush=True)
        verify = corpora.read_blocks(data.shards(split))[: max(1, cfg.prune.verify_tokens // cfg.data.block_size)]
    return P.build_plan(stats, dense, cfg.prune, domain=name, other_profiles=others, grad_stats=grad,
                        tokenizer=tokenizer, base_model=cfg.model.source, profile=str(p.layout.profile(name)),
                        verify_blocks=verify, log=lambda line: print(f"[slim] {name}: {line}", flush=True))
