"""Slim a checkpoint one layer at a time, straight into sharded safetensors: no process holds the dense model.

minigpt.slim builds the whole slimmed model in memory from the whole dense one (and save_expert writes it), which
needs both in memory at once. `slim_to_folder` gives the same files from a LayerStore: it reads the embedding, each
kept decoder layer and the head in turn, cuts them with slim.py's own helpers (`_cuts`, `_kept_indices`,
`slim_config`: the one place that decides what a plan keeps) and hands the pieces to a ShardedWriter, so its memory
is one layer (plus the embedding while it is cut). The config (as save_pretrained writes it: dtype and
architectures set), the generation config and the tokenizer (rewritten when the vocabulary is cut, as slim_expert
does) go beside the weights, and the folder appears at once, complete, or not at all (io.atomic_dir).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from minigpt import vocab as V
from minigpt.io import atomic_dir
from minigpt.layerstore import LayerStore
from minigpt.plan import PruningPlan
from minigpt.refit import RefitError
from minigpt.shardwriter import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from minigpt.slim import _check, _check_weights, _cuts, _kept_indices, _remap_id, slim_config
from minigpt.streamed import _stored_dtype


def _vocab_names(skeleton: nn.Module) -> set[str]:
    """Every name of the tensors whose rows are token ids: input embedding, output embedding and its bias (a tied
    embedding appears under both names), as slim.slim cuts them."""
    tensors = [skeleton.get_input_embeddings().weight]
    out = skeleton.get_output_embeddings()
    if out is not None:
        tensors += [out.weight] + ([out.bias] if getattr(out, "bias", None) is not None else [])
    return {n for n, p in skeleton.named_parameters(remove_duplicate=False) if any(p is t for t in tensors)}


def _cut_layer(state: Mapping[str, torch.Tensor], lp, cuts) -> dict[str, torch.Tensor]:
    """One kept layer's tensors (named relative to the layer) with the plan's units removed."""
    out = {}
    for rel, value in state.items():
        mine = [(c, units, getattr(lp, field)) for coupling, units, field in cuts for c in coupling
                if c.name == rel and getattr(lp, field) is not None]
        for dim, index in _kept_indices(value, mine).items():
            value = value.index_select(dim, index)
        out[rel] = value
    return out


def _generation_config(store: LayerStore, plan: PruningPlan):
    """The dense model's generation config (what from_pretrained gives it), its token ids remapped to the kept
    vocabulary."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(store.folder))
    except OSError:  # no generation_config.json: from_pretrained derives one from the model's config
        gen = GenerationConfig.from_model_config(store.config)
    if plan.vocab_keep is not None:
        remap = {old: new for new, old in enumerate(plan.vocab_keep)}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if getattr(gen, key, None) is not None:
                setattr(gen, key, _remap_id(getattr(gen, key), remap))
    return gen


@torch.no_grad()
def slim_to_folder(store: LayerStore, plan: PruningPlan, out_dir: Path | str,
                   weights: Mapping[str, torch.Tensor] | None = None, tokenizer=None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   extra_files: Mapping[str, str] | None = None) -> Path:
    """Write the slimmed checkpoint of `plan` into `out_dir`: what slim.slim_expert + slim.save_expert write
    (same tensors, same config), one layer in memory at a time. `weights` (dense shapes, e.g. sequential pruning's)
    replace the named tensors before they are cut; `tokenizer` (optional) is rewritten when the plan cuts the
    vocabulary. Tensors are written in the store's dtype (the dense model's, as slim.slim keeps it)."""
    if weights is None and (plan.reconstruct or plan.replace):
        raise RefitError(f"plan for {plan.domain!r} refits weights: slimming it needs its new weights "
                         "(refit.compensation, or sequential pruning's)")
    skel = store.skeleton()
    _check(skel, plan)
    weights = _check_weights(skel, weights)
    dtype = store.dtype or _stored_dtype(store)
    cfg = copy.deepcopy(slim_config(skel, plan))
    cfg.dtype = str(dtype).split(".")[1]  # what save_pretrained records
    cfg.architectures = [type(skel).__name__]
    cuts = _cuts(skel, plan)
    rows = torch.tensor(plan.vocab_keep, dtype=torch.long) if plan.vocab_keep is not None else None
    vocab_names = _vocab_names(skel) if rows is not None else set()

    def cast(value: torch.Tensor) -> torch.Tensor:
        return value.to(dtype) if value.is_floating_point() else value

    def outside(name: str, value: torch.Tensor) -> torch.Tensor:
        """An embedding or head tensor: replaced, then its token rows cut."""
        value = weights.get(name, value)
        return cast(value.index_select(0, rows) if name in vocab_names else value)

    with atomic_dir(out_dir) as tmp:
        with ShardedWriter(tmp, max_shard_bytes) as writer:
            for name, value in store.embed_state().items():
                writer.add(name, outside(name, value))
            for j, lp in enumerate(plan.layers):  # kept layers, renumbered; dropped ones are never read
                src, dst = store.layer_prefix(lp.index), store.layer_prefix(j)
                state = {rel: weights.get(src + rel, v) for rel, v in store.layer_state(lp.index).items()}
                for rel, value in _cut_layer(state, lp, cuts).items():
                    writer.add(dst + rel, cast(value))
                del state
            for name, value in store.head_state().items():
                writer.add(name, outside(name, value))
        cfg.save_pretrained(tmp)
        _generation_config(store, plan).save_pretrained(tmp)
        if tokenizer is not None:
            if plan.vocab_keep is not None:
                tokenizer = V.prune_tokenizer(tokenizer, plan.vocab_keep)
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


__all__ = ["slim_to_folder"]
