"""PruningPlan: what each layer keeps, as plain JSON data, and the pure shape maths a plan is made with.

A plan names, per kept layer, the MLP channels and KV groups kept (sorted ascending; a KV group carries its query
heads), optionally the query heads kept inside the kept groups (the same number in each), the layers dropped, and optionally the vocabulary kept (`vocab_keep[new_id] = old_id`). Widths are uniform
across layers and the MLP width is rounded to a multiple (default 8), so the slimmed model is the stock
architecture with a smaller config. The plan records the parameter counts it predicts, computed from the dense
model's shapes; slimming is tested against them.

This module is the bottom of the planning code: the data types, parameter predictions, uniform widths, the
replacement span and the one plan builder from scores and a shape. Choosing a shape (minigpt.allocate) and the
one call from a profile and a job's settings to a plan (minigpt.plan) sit above it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from minigpt import refit, vocab as V
from minigpt.config import ConfigError
from minigpt.io import atomic_write_text
from minigpt.models import (count_parameters, kv_coupling, kv_prunable, layer_params, mlp_coupling, params_per_unit,
                            q_coupling, widths)

FORMAT = "minigpt.plan/3"
_READS = ("minigpt.plan/1", "minigpt.plan/2", FORMAT)


@dataclass(frozen=True)
class LayerPlan:
    index: int  # the layer's index in the dense model
    mlp_keep: tuple[int, ...]
    kv_keep: tuple[int, ...] | None = None  # None: every KV group kept
    q_keep: tuple[int, ...] | None = None  # query heads kept (dense indices, the same number in each kept group)


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
    reconstruct: bool = False  # kept output-projection weights are refit by least squares (minigpt.refit)
    damp: float = 0.01  # ridge of that refit, relative to the mean diagonal of the Gram matrix
    replace: bool = False  # each run of dropped layers is replaced by a linear map folded into the block before
    sequential: bool = False  # chosen and refit layer by layer on the pruned model's activations (minigpt.sequential)

    @property
    def uniform(self) -> bool:
        """Same MLP width and KV group count in every kept layer: the stock architecture with a smaller config."""
        try:
            self.mlp_width, self.kv_width, self.q_width
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
    def q_width(self) -> int | None:
        """Query heads kept per KV group, or None when every kept group keeps all of its heads."""
        if all(lp.q_keep is None for lp in self.layers):
            return None
        per_group = set()
        for lp in self.layers:
            groups = len(lp.kv_keep) if lp.kv_keep is not None else self.kv_groups
            per_group.add(len(lp.q_keep) // groups if lp.q_keep is not None else None)
        if len(per_group) != 1 or None in per_group:
            raise ValueError(f"plan has non-uniform query heads per group {sorted(map(str, per_group))}")
        return per_group.pop()

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
                        "kv_keep": None if lp.kv_keep is None else list(lp.kv_keep),
                        "q_keep": None if lp.q_keep is None else list(lp.q_keep)} for lp in self.layers]
        d["dropped_layers"] = list(self.dropped_layers)
        d["vocab_keep"] = None if self.vocab_keep is None else list(self.vocab_keep)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        d = json.loads(text)
        if d.pop("format", None) not in _READS:
            raise ValueError(f"not a {FORMAT} plan")
        ints = lambda v: None if v is None else tuple(int(i) for i in v)  # noqa: E731
        d["layers"] = tuple(LayerPlan(int(x["index"]), ints(x["mlp_keep"]), ints(x.get("kv_keep")),
                                      ints(x.get("q_keep"))) for x in d["layers"])
        d["dropped_layers"] = tuple(int(i) for i in d.get("dropped_layers", ()))
        if d.get("vocab_keep") is not None:
            d["vocab_keep"] = tuple(int(i) for i in d["vocab_keep"])
        return cls(**d)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        return cls.from_json(Path(path).read_text())


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
                   vocab: int, q_heads: int = 0) -> dict[str, int]:
    """Parameter counts after slimming, from the dense model's shapes alone. Widths are per kept layer or uniform;
    `q_heads` > 0 is the query heads kept in each kept KV group."""
    w = widths(model)
    total, non_emb = count_parameters(model)
    kept_layers = w["layers"] - dropped
    mlp_widths = mlp_width if isinstance(mlp_width, list) else [mlp_width] * kept_layers
    kv_widths = kv_width if isinstance(kv_width, list) else [kv_width] * kept_layers
    removed = sum(w["intermediate"] - m for m in mlp_widths) * params_per_unit(model, mlp_coupling(model))
    if any(k != w["kv_heads"] for k in kv_widths):
        removed += sum(w["kv_heads"] - k for k in kv_widths) * params_per_unit(model, kv_coupling(model))
    per_group = w["heads"] // w["kv_heads"]
    if q_heads and q_heads != per_group:
        removed += sum(kv_widths) * (per_group - q_heads) * params_per_unit(model, q_coupling(model))
    removed += dropped * layer_params(model)
    emb_row, other_row = _vocab_row_params(model)
    rows = w["vocab"] - vocab
    return {"dense_total": total, "dense_non_embedding": non_emb,
            "total": total - removed - rows * (emb_row + other_row),
            "non_embedding": non_emb - removed - rows * other_row}


def mlp_keep(model: nn.Module, target: float, multiple_of: int, *, already_removed: int = 0,
             layers: int | None = None) -> int:
    """The uniform MLP width that removes closest to `target`, unchecked: below `multiple_of` (even negative) when
    the MLPs alone cannot reach the target, above the dense width when `already_removed` exceeds it."""
    _, non_emb = count_parameters(model)
    w = widths(model)
    layers = w["layers"] if layers is None else layers
    remove = target * non_emb - already_removed
    per_channel = params_per_unit(model, mlp_coupling(model))
    return round((w["intermediate"] - remove / (layers * per_channel)) / multiple_of) * multiple_of


def uniform_mlp_width(model: nn.Module, target: float, multiple_of: int, *, already_removed: int = 0,
                      layers: int | None = None) -> int:
    """The MLP width, equal in every layer, that removes closest to `target` of the non-embedding parameters."""
    _, non_emb = count_parameters(model)
    w = widths(model)
    layers = w["layers"] if layers is None else layers
    if target * non_emb < already_removed:
        raise ConfigError(f"prune.target {target} is already exceeded by the KV groups / layers removed "
                          f"({already_removed / non_emb:.2f} of non-embedding parameters)")
    keep = mlp_keep(model, target, multiple_of, already_removed=already_removed, layers=layers)
    if keep < multiple_of:
        per_channel = params_per_unit(model, mlp_coupling(model))
        max_target = (layers * (w["intermediate"] - multiple_of) * per_channel + already_removed) / non_emb
        raise ConfigError(f"prune.target {target} cannot be reached by MLP channels alone "
                          f"(at most {max_target:.2f} with multiple_of={multiple_of})")
    return min(keep, w["intermediate"])


@dataclass(frozen=True)
class Shape:
    """What a uniform plan is made of: the kept layers, one MLP width, one KV group count, a vocabulary cut."""

    kept_layers: tuple[int, ...]
    mlp_width: int
    kv_groups: int
    vocab_min_count: int = 0  # 0 = vocabulary untouched
    q_heads: int = 0  # query heads kept per KV group; 0 = all


def top_units(scores: torch.Tensor, keep: int) -> list[tuple[int, ...]]:
    """Per row of `scores` [rows, units], the `keep` highest-scoring units, ascending."""
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


def vocab_keep(token_counts: torch.Tensor, tokenizer, min_count: int) -> tuple[int, ...] | None:
    """Old ids kept by a vocabulary cut: tokens seen >= min_count times, closed under merges (minigpt.vocab);
    None for min_count 0 (no cut)."""
    if min_count == 0:
        return None
    if tokenizer is None:
        raise ConfigError("a vocabulary cut needs the base model's tokenizer to build the plan")
    seen = torch.nonzero(token_counts.double() >= min_count).reshape(-1).tolist()
    return tuple(V.closure(tokenizer, seen))


def depth_layers(model_or_config, target: float) -> int:
    """How many whole layers remove closest to `target` of the non-embedding parameters (at least 1)."""
    w = widths(model_or_config)
    return min(max(1, round(target * count_parameters(model_or_config)[1] / layer_params(model_or_config))),
               w["layers"] - 1)


def replacement_span(stats: Mapping[str, torch.Tensor], n: int, damp: float,
                     fisher: torch.Tensor | None = None) -> tuple[int, list[float]]:
    """The first layer of the n-layer span whose least-squares replacement leaves the smallest error, and that error
    for every start (inf where impossible).

    With `fisher` ([L + 1, D], stats.taylor_sums' taylor_resid) the residual of each channel is priced by the
    squared loss gradient of the stream leaving the span: a first-order estimate of the loss it adds, in the
    currency minigpt.allocate compares every change in. Without it, the residual is relative to the energy of the
    stream leaving the span (for a span that ends the model, the stream entering its last layer stands in).
    Layer 0 is never cut (no block before it carries a replacement)."""
    key = f"depth_cross_{n}"
    if key not in stats:
        raise refit.RefitError(f"the profile has no {key}: calibrate with prune.method depth at this target")
    L = stats["mlp_out_gram"].shape[0]
    rel = [float("inf")] * L
    for first in range(1, L - n + 1):
        k = first - 1
        A, C, bsq = stats["mlp_out_gram"][k], stats[key][k], stats[f"depth_bsq_{n}"][k]
        err = refit.replacement_error(A, C, bsq, refit.replacement(A, C, damp))
        if fisher is not None:
            rel[first] = float((err * fisher[first + n].double()).sum())
        else:
            energy = float(stats["hidden_sq_sum"][min(first + n, L - 1)].sum())
            rel[first] = float(err.sum()) / max(energy, 1e-30)
    best = min(range(L), key=lambda i: (rel[i], i))
    return best, rel


def plan_from_shape(scores, model: nn.Module, shape: Shape, *, domain: str, method: str,
                    vocab: tuple[int, ...] | None = None, base_model: str = "", profile: str = "",
                    target: float | None = None, mode: str = "target", threshold: float | None = None,
                    reconstruct: bool = False, damp: float = 0.01, replace: bool = False,
                    protect: tuple[int, ...] = ()) -> PruningPlan:
    """The one plan builder: in each kept layer the `mlp_width` top-scoring MLP channels, the `kv_groups`
    top-scoring KV groups and, in each kept group, its `q_heads` top-scoring query heads of `scores` (a
    scoring.Scores), and `vocab` (old ids, see vocab_keep).

    `protect` is an explicit opt-in to NON-UNIFORM widths: those layers keep every channel and group. Such a plan
    is NOT a stock checkpoint for these architectures (one intermediate_size per model): it can be evaluated with
    slim.mask, and slim.slim refuses it.
    """
    w = widths(model)
    L, G, I = w["layers"], w["kv_heads"], w["intermediate"]
    if not shape.kept_layers or not all(0 <= i < L for i in shape.kept_layers):
        raise ValueError(f"shape keeps layers {shape.kept_layers}, model has {L}")
    if not 1 <= shape.mlp_width <= I or not 1 <= shape.kv_groups <= G:
        raise ValueError(f"shape widths {shape.mlp_width}/{shape.kv_groups} do not fit {I}/{G}")
    if shape.kv_groups != G and scores.kv is None:
        if not kv_prunable(model):
            kv_coupling(model)  # raises the architecture's one-line reason
        raise ConfigError(f"method {method!r} gives no KV group scores")
    per_group = w["heads"] // G
    q_heads = shape.q_heads if shape.q_heads and shape.q_heads != per_group else 0
    if q_heads and (getattr(scores, "q", None) is None or not 1 <= q_heads <= per_group):
        if not kv_prunable(model):
            q_coupling(model)  # raises the architecture's one-line reason
        raise ConfigError(f"method {method!r} gives no query-head scores" if q_heads <= per_group else
                          f"{q_heads} query heads per group do not fit the model's {per_group}")
    if protect and q_heads:
        raise ConfigError("protect_layers does not combine with query-head pruning")
    protect_set = {i % L for i in protect}
    mlp = [tuple(range(I)) if i in protect_set else k for i, k in enumerate(top_units(scores.mlp, shape.mlp_width))]
    kv = top_units(scores.kv, shape.kv_groups) if shape.kv_groups != G else [None] * L
    kv = [None if i in protect_set else k for i, k in enumerate(kv)]
    q: list = [None] * L
    if q_heads:
        for i in range(L):
            groups = kv[i] if kv[i] is not None else range(G)
            # In each kept group its best q_heads heads: the same number everywhere keeps the model valid.
            q[i] = tuple(sorted(g * per_group + int(h) for g in groups for h in
                                torch.sort(scores.q[i, g * per_group:(g + 1) * per_group].double(), descending=True,
                                           stable=True).indices[:q_heads]))
    kept = list(shape.kept_layers)
    dropped = tuple(i for i in range(L) if i not in set(kept))
    params = predict_params(model, mlp_width=[len(mlp[i]) for i in kept],
                            kv_width=[G if kv[i] is None else len(kv[i]) for i in kept], dropped=len(dropped),
                            vocab=len(vocab) if vocab is not None else w["vocab"], q_heads=q_heads)
    removed = 1 - params["non_embedding"] / params["dense_non_embedding"]
    return PruningPlan(domain=domain, method=method, target=removed if target is None else target,
                       model_type=model.config.model_type, num_layers=L, intermediate_size=I,
                       layers=tuple(LayerPlan(i, mlp[i], kv[i], q[i]) for i in kept), params=params,
                       base_model=base_model, profile=profile, kv_groups=G, dropped_layers=dropped,
                       vocab_size=w["vocab"], vocab_keep=vocab, mode=mode, threshold=threshold,
                       reconstruct=reconstruct, damp=damp, replace=replace and bool(dropped))


def removed_fraction(plan: PruningPlan) -> float:
    return 1 - plan.params["non_embedding"] / plan.params["dense_non_embedding"]


def depth_options(max_layers: int) -> tuple[int, ...]:
    """Span lengths offered to the allocation (each costs one D x D moment per layer in the profile)."""
    return tuple(sorted({n for n in (1, 2, 4, max_layers // 2, max_layers) if n >= 1}))
