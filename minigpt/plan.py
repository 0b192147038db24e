"""PruningPlan: what each layer keeps, as plain JSON data, and how to build one from scores and a size target.

A plan names, per layer, the MLP channels kept (sorted ascending). Widths are uniform across layers and rounded to
a multiple (default 8), so the slimmed model is the stock architecture with a smaller `intermediate_size`. The plan
also records the parameter counts it predicts; slimming is tested against them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from minigpt.config import ConfigError
from minigpt.models import count_parameters, decoder_layers, mlp_parts

FORMAT = "minigpt.plan/1"


@dataclass(frozen=True)
class LayerPlan:
    index: int
    mlp_keep: tuple[int, ...]


@dataclass(frozen=True)
class PruningPlan:
    domain: str
    method: str
    target: float
    model_type: str
    num_layers: int
    intermediate_size: int  # dense width, for reference
    layers: tuple[LayerPlan, ...]
    params: dict[str, int] = field(default_factory=dict)  # dense/predicted total and non-embedding counts
    base_model: str = ""
    profile: str = ""  # the profile file it was cut from

    @property
    def mlp_width(self) -> int:
        widths = {len(lp.mlp_keep) for lp in self.layers}
        if len(widths) != 1:
            raise ValueError(f"plan has non-uniform MLP widths {sorted(widths)}")
        return widths.pop()

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        d["layers"] = [{"index": lp.index, "mlp_keep": list(lp.mlp_keep)} for lp in self.layers]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} plan")
        d["layers"] = tuple(LayerPlan(int(x["index"]), tuple(int(i) for i in x["mlp_keep"])) for x in d["layers"])
        return cls(**d)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        return cls.from_json(Path(path).read_text())


def _params_per_mlp_channel(model: nn.Module) -> int:
    """Parameters that go with one MLP channel in one layer: its input rows (+biases) and output column."""
    ins, down = mlp_parts(decoder_layers(model)[0])
    n = sum(p.weight.shape[1] + (1 if p.bias is not None else 0) for p in ins)
    return n + down.weight.shape[0]


def uniform_mlp_width(model: nn.Module, target: float, multiple_of: int) -> int:
    """The MLP width, equal in every layer, that removes closest to `target` of the non-embedding parameters."""
    _, non_emb = count_parameters(model)
    layers = len(decoder_layers(model))
    width = model.config.intermediate_size
    per_channel = _params_per_mlp_channel(model)
    remove = target * non_emb / (layers * per_channel)
    keep = round((width - remove) / multiple_of) * multiple_of
    if keep < multiple_of:
        max_target = layers * (width - multiple_of) * per_channel / non_emb
        raise ConfigError(f"prune.target {target} cannot be reached by MLP channels alone "
                          f"(at most {max_target:.2f} with multiple_of={multiple_of})")
    return min(keep, width)


def build_uniform(scores: torch.Tensor, model: nn.Module, *, domain: str, method: str, target: float,
                  multiple_of: int = 8, base_model: str = "", profile: str = "") -> PruningPlan:
    """Keep the top-scoring channels of every layer, the same number in each."""
    layers = len(decoder_layers(model))
    if tuple(scores.shape) != (layers, model.config.intermediate_size):
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match the model "
                         f"({layers}, {model.config.intermediate_size})")
    keep = uniform_mlp_width(model, target, multiple_of)
    # Ties broken by index (stable sort) so equal scores give a deterministic plan.
    order = torch.sort(scores.double(), dim=1, descending=True, stable=True).indices[:, :keep]
    kept = torch.sort(order, dim=1).values
    total, non_emb = count_parameters(model)
    removed = layers * (model.config.intermediate_size - keep) * _params_per_mlp_channel(model)
    params = {"dense_total": total, "dense_non_embedding": non_emb,
              "total": total - removed, "non_embedding": non_emb - removed}
    return PruningPlan(domain=domain, method=method, target=target, model_type=model.config.model_type,
                       num_layers=layers, intermediate_size=model.config.intermediate_size,
                       layers=tuple(LayerPlan(i, tuple(kept[i].tolist())) for i in range(layers)),
                       params=params, base_model=base_model, profile=profile)
