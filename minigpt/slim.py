"""Apply a PruningPlan: the only code that cuts weights. Rows and columns are deleted, never just zeroed.

The slimmed model is built from a new config written here (same architecture, smaller widths, fewer layers,
smaller vocabulary) and filled with sliced tensors through a strict state-dict load, so a plan that does not fit
the model fails loudly. Compensated plans (minigpt.refit) pass new values for the kept output projections, given
in the dense shapes, which are cut like every other weight: only kept weights change values. Fused tensors (Phi-3's
q|k|v and gate|up rows) are cut per segment, as minigpt.archs describes them. `mask` is the reference used by
tests: the dense model with the same MLP channels, KV groups and layers silenced must give the same logits
(vocabulary: the dense logits restricted to the kept ids).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from minigpt.archs import (Coupled, arch_of, config_key, decoder_layers, kv_coupling, mlp_coupling, q_coupling,
                           unit_index, widths)
from minigpt.config import ConfigError
from minigpt.io import atomic_dir
from minigpt.plandata import PruningPlan
from minigpt import refit, vocab as V


def _check(model: nn.Module, plan: PruningPlan) -> None:
    w = widths(model)
    if plan.num_layers != w["layers"] or plan.intermediate_size != w["intermediate"]:
        raise ValueError(f"plan is for {plan.num_layers} layers x {plan.intermediate_size} channels, model has "
                         f"{w['layers']} x {w['intermediate']}")
    if plan.vocab_keep is not None and plan.vocab_size not in (0, w["vocab"]):
        raise ValueError(f"plan is for a vocabulary of {plan.vocab_size}, model has {w['vocab']}")


def _remap_id(value, remap: dict[int, int]):
    if isinstance(value, list):
        return [remap[v] for v in value if v in remap]
    return remap.get(value) if isinstance(value, int) else value


def slim_config(model: nn.Module, plan: PruningPlan):
    """A new config of the same class with the plan's widths, layer count and vocabulary."""
    arch = arch_of(model)
    if not plan.uniform:
        raise ConfigError(f"plan has non-uniform per-layer widths, which is not a stock {arch.model_type!r} config "
                          "(one width for every layer); evaluate it with slim.mask or build a uniform plan")
    w = widths(model)
    d = model.config.to_dict()
    d[config_key(arch, "intermediate")] = plan.mlp_width
    d[config_key(arch, "layers")] = len(plan.layers)
    kv, q = plan.kv_width, plan.q_width
    if kv is not None or q is not None:
        kv = kv if kv is not None else w["kv_heads"]
        per_group = q if q is not None else w["heads"] // w["kv_heads"]
        d[config_key(arch, "heads")] = kv * per_group
        d[config_key(arch, "kv_heads")] = kv
        d[config_key(arch, "head_dim")] = w["head_dim"]  # otherwise re-derived from hidden_size / heads
    if isinstance(d.get("layer_types"), list) and len(d["layer_types"]) == w["layers"]:
        d["layer_types"] = [d["layer_types"][lp.index] for lp in plan.layers]
    if plan.vocab_keep is not None:
        remap = {old: new for new, old in enumerate(plan.vocab_keep)}
        d["vocab_size"] = len(plan.vocab_keep)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
            if d.get(key) is not None:
                d[key] = _remap_id(d[key], remap)
    return type(model.config).from_dict(d)


def _param_name(model: nn.Module, tensor: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is tensor)


def _check_weights(model: nn.Module, weights: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    """New values for some dense parameters (minigpt.refit.compensation): same names and shapes as the model's.
    The mapping is returned as it is: one kept on disk (minigpt.hidden.SpilledTensors) is read one tensor at a
    time, here and when slimming uses it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in (weights or {}).items():
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"replacement weight {name} {tuple(value.shape)} does not match the model")
    return weights if weights is not None else {}


def _cuts(model: nn.Module, plan: PruningPlan) -> list[tuple[list[Coupled], int, str]]:
    """(couplings, units, plan field) of each structure the plan cuts, query heads after KV groups: where both are
    cut, a query-head coupling names the kept heads of the kept groups and overrides the group cut of the q rows."""
    w = widths(model)
    cuts = [(mlp_coupling(model), w["intermediate"], "mlp_keep")]
    if plan.kv_width is not None:
        cuts.append((kv_coupling(model), w["kv_heads"], "kv_keep"))
    if plan.q_width is not None:
        cuts.append((q_coupling(model), w["heads"], "q_keep"))
    return cuts


def _kept_indices(value: torch.Tensor, cuts: list[tuple[Coupled, int, tuple[int, ...]]]) -> dict[int, torch.Tensor]:
    """Per dimension of one tensor, the indices it keeps (ascending): each coupling's segment keeps only its kept
    units; entries outside every segment (Phi-3's k|v rows under a query-head cut) stay."""
    drop: dict[int, torch.Tensor] = {}
    for c, units, keep in cuts:
        mask = drop.setdefault(c.dim, torch.zeros(value.shape[c.dim], dtype=torch.bool))
        mask[unit_index(c, range(units))] = True
        mask[unit_index(c, keep)] = False
    return {dim: (~mask).nonzero().reshape(-1) for dim, mask in drop.items()}


@torch.no_grad()
def slim(model: nn.Module, plan: PruningPlan, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Return a new, physically smaller model; `model` is left untouched.

    `weights` (dense shapes, e.g. minigpt.refit.compensation) replace the named parameters before they are cut."""
    _check(model, plan)
    weights = _check_weights(model, weights)
    arch = arch_of(model)
    new_cfg = slim_config(model, plan)
    cuts = _cuts(model, plan)
    kept = {lp.index: (j, lp) for j, lp in enumerate(plan.layers)}
    prefix = arch.layers + "."
    state = {}
    for key, value in model.state_dict().items():
        value = weights.get(key, value)
        if not key.startswith(prefix):
            state[key] = value
            continue
        idx, rel = key[len(prefix):].split(".", 1)
        if int(idx) not in kept:
            continue  # a dropped layer
        j, lp = kept[int(idx)]
        mine = [(c, units, getattr(lp, field)) for coupling, units, field in cuts for c in coupling
                if c.name == rel and getattr(lp, field) is not None]
        for dim, index in _kept_indices(value, mine).items():
            value = value.index_select(dim, index)
        state[f"{prefix}{j}.{rel}"] = value.clone()
    if plan.vocab_keep is not None:
        rows = torch.tensor(plan.vocab_keep, dtype=torch.long)
        tensors = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None:
            tensors += [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else [])
        # Every name of each tensor (tied embeddings appear under two names), each sliced once.
        names = {n for n, p in model.named_parameters(remove_duplicate=False) if any(p is t for t in tensors)}
        for name in names:
            if name in state:
                state[name] = state[name].index_select(0, rows).clone()
    dtype = next(model.parameters()).dtype
    new = type(model)(new_cfg).to(dtype)
    # Tied embeddings share one tensor; the state dict may carry lm_head.weight too, which load_state_dict accepts.
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = getattr(new_cfg, "tie_word_embeddings", False)
    out_new = new.get_output_embeddings()
    tied_name = _param_name(new, out_new.weight) if tied and out_new is not None else None
    missing = [k for k in missing if k != tied_name]
    if missing or unexpected:
        raise RuntimeError(f"slimmed state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        new.tie_weights()
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen = copy.deepcopy(gen)
        if plan.vocab_keep is not None:
            remap = {old: new_id for new_id, old in enumerate(plan.vocab_keep)}
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                if getattr(gen, key, None) is not None:
                    setattr(gen, key, _remap_id(getattr(gen, key), remap))
        new.generation_config = gen
    new.eval()
    return new


@torch.no_grad()
def mask(model: nn.Module, plan: PruningPlan, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Silence, in place, what the plan removes: the output-projection inputs of removed MLP channels and KV groups,
    and the whole residual contribution (output projections and their biases) of dropped layers. `weights` are
    written into the model first (as in slim)."""
    _check(model, plan)
    params_by_name = dict(model.named_parameters(remove_duplicate=False))
    for name, value in _check_weights(model, weights).items():
        params_by_name[name].copy_(value)
    arch = arch_of(model)
    w = widths(model)
    layers = decoder_layers(model)
    mlp_out = [c for c in mlp_coupling(model) if c.output]
    kv_out = [c for c in kv_coupling(model) if c.output] if any(lp.kv_keep is not None for lp in plan.layers) else []
    q_out = [c for c in q_coupling(model) if c.output] if any(lp.q_keep is not None for lp in plan.layers) else []
    for lp in plan.layers:
        params = dict(layers[lp.index].named_parameters())
        for couplings, keep, units in ((mlp_out, lp.mlp_keep, w["intermediate"]), (kv_out, lp.kv_keep, w["kv_heads"]),
                                       (q_out, lp.q_keep, w["heads"])):
            if keep is None:
                continue
            drop = sorted(set(range(units)) - set(keep))
            for c in couplings:
                if drop:
                    params[c.name].index_fill_(c.dim, unit_index(c, drop), 0.0)
    for i in plan.dropped_layers:
        for module in (arch.mlp_out, arch.attn_out):
            for name, p in layers[i].get_submodule(module).named_parameters():
                p.zero_()
    return model


def slim_expert(model: nn.Module, tokenizer, plan: PruningPlan, stats: Mapping[str, torch.Tensor] | None = None,
                weights: Mapping[str, torch.Tensor] | None = None):
    """(slimmed model, tokenizer): a plan with `reconstruct` is compensated from the profile `stats`
    (minigpt.refit) unless its new `weights` are given (sequential pruning computes them itself); the tokenizer is
    rewritten when the plan prunes the vocabulary."""
    if weights is None and (plan.reconstruct or plan.replace):
        if stats is None:
            raise refit.RefitError(f"plan for {plan.domain!r} refits weights: slimming it needs its profile")
        weights = refit.compensation(model, plan, stats)
    small = slim(model, plan, weights)
    if plan.vocab_keep is not None:
        tokenizer = V.prune_tokenizer(tokenizer, plan.vocab_keep)
    return small, tokenizer


def save_expert(model: nn.Module, tokenizer, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """save_pretrained model + tokenizer into `out_dir` atomically (temporary sibling, then rename)."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)
