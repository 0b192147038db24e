"""PruningPlan: what each layer keeps, as plain JSON data, and how to build one from a profile and a size target.

A plan names, per kept layer, the MLP channels and KV groups kept (sorted ascending; a KV group carries its query
heads), the layers dropped, and optionally the vocabulary kept (`vocab_keep[new_id] = old_id`). Widths are uniform
across layers and the MLP width is rounded to a multiple (default 8), so the slimmed model is the stock
architecture with a smaller config. The plan records the parameter counts it predicts, computed from the dense
model's shapes; slimming is tested against them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from minigpt.config import ConfigError, PruneConfig
from minigpt.models import (count_parameters, decoder_layers, kv_coupling, mlp_coupling, params_per_unit, widths)

FORMAT = "minigpt.plan/2"
_READS = ("minigpt.plan/1", FORMAT)


@dataclass(frozen=True)
class LayerPlan:
    index: int  # the layer's index in the dense model
    mlp_keep: tuple[int, ...]
    kv_keep: tuple[int, ...] | None = None  # None: every KV group kept


@dataclass(frozen=True)
class PruningPlan:
    domain: str
    method: str
    target: float
    model_type: str
    num_layers: int  # dense
    intermediate_size: int  # dense width, for reference
    layers: tuple[LayerPlan, ...]  # the kept layers, in order
    params: dict[str, int] = field(default_factory=dict)  # dense/predicted total and non-embedding counts
    base_model: str = ""
    profile: str = ""  # the profile file it was cut from
    kv_groups: int = 0  # dense KV groups per layer (0: unknown / not pruned)
    dropped_layers: tuple[int, ...] = ()
    vocab_size: int = 0  # dense vocabulary size
    vocab_keep: tuple[int, ...] | None = None  # old ids in new-id order; None: vocabulary untouched
    mode: str = "target"
    threshold: float | None = None

    @property
    def uniform(self) -> bool:
        """Same MLP width and KV group count in every kept layer: the stock architecture with a smaller config."""
        try:
            self.mlp_width, self.kv_width
        except ValueError:
            return False
        return True

    @property
    def mlp_width(self) -> int:
        widths_ = {len(lp.mlp_keep) for lp in self.layers}
        if len(widths_) != 1:
            raise ValueError(f"plan has non-uniform MLP widths {sorted(widths_)}")
        return widths_.pop()

    @property
    def kv_width(self) -> int | None:
        """KV groups kept per layer, or None when attention is untouched."""
        if all(lp.kv_keep is None for lp in self.layers):
            return None
        widths_ = {len(lp.kv_keep) if lp.kv_keep is not None else self.kv_groups for lp in self.layers}
        if len(widths_) != 1:
            raise ValueError(f"plan has non-uniform KV group counts {sorted(widths_)}")
        return widths_.pop()

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        d["layers"] = [{"index": lp.index, "mlp_keep": list(lp.mlp_keep),
                        "kv_keep": None if lp.kv_keep is None else list(lp.kv_keep)} for lp in self.layers]
        d["dropped_layers"] = list(self.dropped_layers)
        d["vocab_keep"] = None if self.vocab_keep is None else list(self.vocab_keep)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        d = json.loads(text)
        if d.pop("format", None) not in _READS:
            raise ValueError(f"not a {FORMAT} plan")
        d["layers"] = tuple(LayerPlan(int(x["index"]), tuple(int(i) for i in x["mlp_keep"]),
                                      None if x.get("kv_keep") is None else tuple(int(i) for i in x["kv_keep"]))
                            for x in d["layers"])
        d["dropped_layers"] = tuple(int(i) for i in d.get("dropped_layers", ()))
        if d.get("vocab_keep") is not None:
            d["vocab_keep"] = tuple(int(i) for i in d["vocab_keep"])
        return cls(**d)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        return cls.from_json(Path(path).read_text())


# ------------------------------------------------------------------------------------------ predictions


def _vocab_row_params(model: nn.Module) -> tuple[int, int]:
    """(embedding-matrix parameters, other parameters) removed with one vocabulary row."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    emb_row = emb.shape[1]
    other = 0
    if out is not None and out.weight is not emb:
        emb_row += out.weight.shape[1]
    if out is not None and getattr(out, "bias", None) is not None:
        other += 1
    return emb_row, other


def predict_params(model: nn.Module, *, mlp_width: int | list[int], kv_width: int | list[int], dropped: int,
                   vocab: int) -> dict[str, int]:
    """Parameter counts after slimming, from the dense model's shapes alone. Widths are per kept layer or uniform."""
    w = widths(model)
    total, non_emb = count_parameters(model)
    kept_layers = w["layers"] - dropped
    mlp_widths = mlp_width if isinstance(mlp_width, list) else [mlp_width] * kept_layers
    kv_widths = kv_width if isinstance(kv_width, list) else [kv_width] * kept_layers
    layer_params = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    removed = sum(w["intermediate"] - m for m in mlp_widths) * params_per_unit(model, mlp_coupling(model))
    if any(k != w["kv_heads"] for k in kv_widths):
        removed += sum(w["kv_heads"] - k for k in kv_widths) * params_per_unit(model, kv_coupling(model))
    removed += dropped * layer_params
    emb_row, other_row = _vocab_row_params(model)
    rows = w["vocab"] - vocab
    return {"dense_total": total, "dense_non_embedding": non_emb,
            "total": total - removed - rows * (emb_row + other_row),
            "non_embedding": non_emb - removed - rows * other_row}


def uniform_mlp_width(model: nn.Module, target: float, multiple_of: int, *, already_removed: int = 0,
                      layers: int | None = None) -> int:
    """The MLP width, equal in every layer, that removes closest to `target` of the non-embedding parameters."""
    _, non_emb = count_parameters(model)
    w = widths(model)
    layers = w["layers"] if layers is None else layers
    width = w["intermediate"]
    per_channel = params_per_unit(model, mlp_coupling(model))
    remove = target * non_emb - already_removed
    if remove < 0:
        raise ConfigError(f"prune.target {target} is already exceeded by the KV groups / layers removed "
                          f"({already_removed / non_emb:.2f} of non-embedding parameters)")
    keep = round((width - remove / (layers * per_channel)) / multiple_of) * multiple_of
    if keep < multiple_of:
        max_target = (layers * (width - multiple_of) * per_channel + already_removed) / non_emb
        raise ConfigError(f"prune.target {target} cannot be reached by MLP channels alone "
                          f"(at most {max_target:.2f} with multiple_of={multiple_of})")
    return min(keep, width)


def _top(scores: torch.Tensor, keep: int) -> list[tuple[int, ...]]:
    # Ties broken by index (stable sort) so equal scores give a deterministic plan.
    order = torch.sort(scores.double(), dim=1, descending=True, stable=True).indices[:, :keep]
    return [tuple(r) for r in torch.sort(order, dim=1).values.tolist()]


def threshold_width(scores: torch.Tensor, threshold: float, multiple_of: int) -> int:
    """Mini-GPTs threshold mode: channels scoring >= threshold x their layer's mean survive; the uniform width is
    the mean surviving count over layers, rounded to `multiple_of` (at least one multiple)."""
    s = scores.double()
    survivors = (s >= threshold * s.mean(1, keepdim=True)).sum(1).double()
    keep = round(float(survivors.mean()) / multiple_of) * multiple_of
    return int(min(max(keep, multiple_of), s.shape[1]))


def _vocab_keep(scores_vocab: torch.Tensor, tokenizer, min_count: int) -> tuple[int, ...]:
    from minigpt import vocab as V

    if tokenizer is None:
        raise ConfigError("prune.vocab needs the base model's tokenizer to build the plan")
    seen = torch.nonzero(scores_vocab >= min_count).reshape(-1).tolist()
    return tuple(V.closure(tokenizer, seen))


def build_plan(profile_stats: Mapping[str, torch.Tensor], model: nn.Module, prune_cfg: PruneConfig, *, domain: str,
               other_profiles: Mapping[str, Mapping[str, torch.Tensor]] | None = None, base_model: str = "",
               profile: str = "", grad_stats: Mapping[str, torch.Tensor] | None = None,
               tokenizer=None, protect_layers: tuple[int, ...] = ()) -> PruningPlan:
    """One call from a domain profile to a plan, for every method (see minigpt.scoring).

    `other_profiles` (other domains / a general corpus) feed cus-prun; `grad_stats` (stats.taylor_sums) feed taylor;
    `tokenizer` is needed only with prune.vocab.

    `protect_layers` is an explicit opt-in to NON-UNIFORM widths: those layers keep every channel and group and the
    others share the whole cut. Such a plan is NOT a stock checkpoint for these architectures (one
    intermediate_size per model): it can be evaluated with slim.mask, and slim.slim refuses it.
    """
    from minigpt import scoring

    others = {k: v for k, v in (other_profiles or {}).items() if k != domain}
    scores = scoring.score_all(prune_cfg.method, profile_stats, model, seed=prune_cfg.seed, others=others or None,
                               grad=grad_stats) if prune_cfg.method != "cus-prun" else \
        scoring.cus_prun(profile_stats, model, others=others, strength=prune_cfg.cus_prun_strength)
    w = widths(model)
    L, G = w["layers"], w["kv_heads"]
    _, non_emb = count_parameters(model)
    dropped: tuple[int, ...] = ()
    kv_width = G
    if prune_cfg.method == "depth":
        layer_params = sum(p.numel() for p in decoder_layers(model)[0].parameters())
        n = min(max(1, round(prune_cfg.target * non_emb / layer_params)), L - 1)
        # Lowest block influence = the layer whose output is most similar to its input; ties: later layers first.
        order = sorted(range(L), key=lambda i: (float(scores.layer[i]), -i))
        dropped = tuple(sorted(order[:n]))
        mlp_width = w["intermediate"]
    else:
        already = 0
        if prune_cfg.kv_groups:
            if scores.kv is None:
                kv_coupling(model)  # raises the architecture's one-line reason
            if prune_cfg.kv_groups > G:
                raise ConfigError(f"prune.kv_groups {prune_cfg.kv_groups} exceeds the model's {G} KV groups")
            kv_width = prune_cfg.kv_groups
            already = L * (G - kv_width) * params_per_unit(model, kv_coupling(model))
        if prune_cfg.mode == "threshold":
            mlp_width = threshold_width(scores.mlp, prune_cfg.threshold, prune_cfg.multiple_of)
        else:
            mlp_width = uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of, already_removed=already)
    kept_layers = [i for i in range(L) if i not in dropped]
    mlp_keep = _top(scores.mlp, mlp_width)
    kv_keep = _top(scores.kv, kv_width) if kv_width != G else [None] * L
    mlp_widths = [mlp_width] * len(kept_layers)
    kv_widths = [kv_width] * len(kept_layers)
    if protect_layers:
        if prune_cfg.method == "depth" or prune_cfg.mode == "threshold":
            raise ConfigError("protect_layers applies to target-mode channel/group pruning only")
        protect = {i % L for i in protect_layers}
        n = L - len(protect)
        already = n * (G - kv_width) * params_per_unit(model, kv_coupling(model)) if kv_width != G else 0
        mlp_width = uniform_mlp_width(model, prune_cfg.target, prune_cfg.multiple_of, already_removed=already,
                                      layers=n)
        mlp_keep = [tuple(range(w["intermediate"])) if i in protect else k for i, k in
                    enumerate(_top(scores.mlp, mlp_width))]
        kv_keep = [None if i in protect else k for i, k in enumerate(kv_keep)]
        mlp_widths = [len(mlp_keep[i]) for i in kept_layers]
        kv_widths = [G if kv_keep[i] is None else len(kv_keep[i]) for i in kept_layers]
    vocab_keep = _vocab_keep(scores.vocab, tokenizer, prune_cfg.vocab_min_count) if prune_cfg.vocab else None
    params = predict_params(model, mlp_width=mlp_widths, kv_width=kv_widths, dropped=len(dropped),
                            vocab=len(vocab_keep) if vocab_keep is not None else w["vocab"])
    return PruningPlan(domain=domain, method=prune_cfg.method, target=prune_cfg.target,
                       model_type=model.config.model_type, num_layers=L, intermediate_size=w["intermediate"],
                       layers=tuple(LayerPlan(i, mlp_keep[i], kv_keep[i]) for i in kept_layers), params=params,
                       base_model=base_model, profile=profile, kv_groups=G, dropped_layers=dropped,
                       vocab_size=w["vocab"], vocab_keep=vocab_keep, mode=prune_cfg.mode,
                       threshold=prune_cfg.threshold if prune_cfg.mode == "threshold" else None)


def build_uniform(scores: torch.Tensor, model: nn.Module, *, domain: str, method: str, target: float,
                  multiple_of: int = 8, base_model: str = "", profile: str = "") -> PruningPlan:
    """MLP channels only: keep the top-scoring channels of every layer, the same number in each."""
    w = widths(model)
    if tuple(scores.shape) != (w["layers"], w["intermediate"]):
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match the model "
                         f"({w['layers']}, {w['intermediate']})")
    keep = uniform_mlp_width(model, target, multiple_of)
    kept = _top(scores, keep)
    params = predict_params(model, mlp_width=keep, kv_width=w["kv_heads"], dropped=0, vocab=w["vocab"])
    return PruningPlan(domain=domain, method=method, target=target, model_type=model.config.model_type,
                       num_layers=w["layers"], intermediate_size=w["intermediate"],
                       layers=tuple(LayerPlan(i, kept[i]) for i in range(w["layers"])),
                       params=params, base_model=base_model, profile=profile, kv_groups=w["kv_heads"],
                       vocab_size=w["vocab"])


def removed_fraction(plan: PruningPlan) -> float:
    return 1 - plan.params["non_embedding"] / plan.params["dense_non_embedding"]


__all__ = ["FORMAT", "LayerPlan", "PruningPlan", "build_plan", "build_uniform", "predict_params",
           "threshold_width", "uniform_mlp_width", "removed_fraction"]
