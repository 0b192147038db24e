"""Apply a PruningPlan: the only code that cuts weights. Rows and columns are deleted, never just zeroed.

The slimmed model is built from a new config written here (same architecture, smaller widths) and filled with
sliced tensors through a strict state-dict load, so a plan that does not fit the model fails loudly.
`mask` is the reference used by tests: the dense model with the same channels zeroed must give the same logits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from minigpt.models import decoder_layers, mlp_parts
from minigpt.plan import PruningPlan


def _check(model: nn.Module, plan: PruningPlan) -> None:
    layers = decoder_layers(model)
    if plan.num_layers != len(layers) or plan.intermediate_size != model.config.intermediate_size:
        raise ValueError(f"plan is for {plan.num_layers} layers x {plan.intermediate_size} channels, model has "
                         f"{len(layers)} x {model.config.intermediate_size}")


def slim_config(model: nn.Module, plan: PruningPlan):
    """A new config of the same class with the plan's widths."""
    d = model.config.to_dict()
    d["intermediate_size"] = plan.mlp_width
    return type(model.config).from_dict(d)


@torch.no_grad()
def slim(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Return a new, physically smaller model; `model` is left untouched."""
    _check(model, plan)
    new_cfg = slim_config(model, plan)
    state = {k: v for k, v in model.state_dict().items()}
    for lp, layer in zip(plan.layers, decoder_layers(model)):
        keep = torch.tensor(lp.mlp_keep, dtype=torch.long)
        ins, down = mlp_parts(layer)
        names = {id(m): n for n, m in model.named_modules()}
        for lin in ins:
            prefix = names[id(lin)]
            state[f"{prefix}.weight"] = lin.weight.index_select(0, keep).clone()
            if lin.bias is not None:
                state[f"{prefix}.bias"] = lin.bias.index_select(0, keep).clone()
        state[f"{names[id(down)]}.weight"] = down.weight.index_select(1, keep).clone()
    dtype = next(model.parameters()).dtype
    new = type(model)(new_cfg).to(dtype)
    # Tied embeddings share one tensor; the state dict may carry lm_head.weight too, which load_state_dict accepts.
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = getattr(new_cfg, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"slimmed state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        new.tie_weights()
    new.eval()
    return new


@torch.no_grad()
def mask(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Zero the down-projection columns of removed channels in place (the reference for slimming tests)."""
    _check(model, plan)
    for lp, layer in zip(plan.layers, decoder_layers(model)):
        _, down = mlp_parts(layer)
        drop = torch.ones(down.weight.shape[1], dtype=torch.bool)
        drop[list(lp.mlp_keep)] = False
        down.weight[:, drop] = 0
    return model


def save_expert(model: nn.Module, tokenizer, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """save_pretrained model + tokenizer into `out_dir` atomically (temporary sibling, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
