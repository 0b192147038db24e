"""Sequential pruning: layer by layer, each layer chosen and refit on the partly pruned model's own activations.

One-shot compensation (minigpt.refit on the dense profile) refits every layer for the inputs the *dense* model
feeds it. Pruned layers change what later layers see; SlimGPT's order follows that: prune layer 0, run the pruned
layer, pruned layer 1 is chosen and refit on those outputs, and so on. Within a layer the attention groups go first,
then the MLP channels are chosen on the outputs of the pruned attention. With prune.refit_target `layer` the refit
target is the layer's full width applied to the same (pruned-model) inputs; with `stream` it is the dense model's
residual stream after the layer: the runners carry the dense stream beside the pruned one and sum the drift between
them (`stats(drift="mlp")`), every MLP output projection is first refit at full width toward the dense stream
(refit.corrected), and its channels are chosen and refit from that, so each layer also undoes what earlier cuts
left (at the price of one more layer pass per layer and a second copy of the stream). With prune.stream_attn the
attention output projection is corrected the same way first, toward the dense stream just after the attention
(`stats(drift="attn", attn_only=True)`: half a layer pass), so the MLP is chosen on inputs closer to the dense ones.

`LayerRunner` holds what one worker needs: the model being pruned, the residual stream of its share of
the calibration blocks, and the arguments each layer is called with (masks, rotary tables: captured from the model's
own forward with every layer standing in as the identity, so every architecture works as its modeling code built
them, at the cost of no layer pass). It answers three calls: `stats`
(one layer's sums on the current activations), `apply` (write a layer's new weights) and `advance` (run the pruned
layer to move the activations one layer on). `prune_sequential` drives any number of runners - in-process, or Ray
actors (`ray_runners`) each holding the hidden states of its own shards - through that protocol: the driver sums
the runners' statistics (exact, as everywhere), chooses and solves, and broadcasts the layer.

Nothing holds a second copy of the whole model. A runner built from a model shares its weights and copies a layer
only when `apply` changes it (the caller's model is never written); one built from a checkpoint folder
(`LayerRunner.from_folder`, what `ray_runners` starts) runs on a minigpt.streamed.StreamedDecoder: the embedding and
head resident, one decoder layer read from the folder at a time, the streams in HiddenBuffers under a byte budget.
The driver likewise copies only the layer it solves, or, given a LayerStore instead of a model, reads each layer
from the folder, solves it and lets it go: its memory is one layer; the new weights it returns wait on disk.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from minigpt import refit, scoring, stats as S
from minigpt.config import SEQUENTIAL_METHODS, ConfigError, PruneConfig
from minigpt.hidden import SpilledTensors
from minigpt.layerstore import LayerStore
from minigpt.models import arch_of, decoder_layers, widths
from minigpt.plan import PruningPlan, Shape, plan_from_shape, stream_refit, target_shape, top_units
from minigpt.runner import LayerRunner, _private_layers, _write, ray_runners  # noqa: F401 (LayerRunner, ray_runners:
# the runner side, re-exported for callers)
from minigpt.streamed import _params_to_meta, _stored_dtype


def _merged(runners, index: int, num_layers: int, remote: bool, drift: str | None = None,
            attn_only: bool = False) -> dict:
    """The runners' sums for one layer, merged (exactly: they are sums) and laid out as a whole-model profile."""
    if remote:
        import ray

        parts = ray.get([r.stats.remote(index, drift, attn_only) for r in runners])
    else:
        parts = [r.stats(index, drift, attn_only) for r in runners]
    return S.layer_view(S.merge(S.from_numpy(p) for p in parts), index, num_layers)


STREAM_DAMP_TOKENS = 16384  # calibration tokens at which prune.stream_damp is the relative ridge itself


def stream_ridge(stream_damp: float, tokens: float) -> float:
    """The stream correction's ridge relative to its Gram matrix's mean diagonal: `stream_damp` up to 16,384 tokens,
    then falling as 1 / tokens. The Gram matrix grows with the tokens while the drift regression's noise falls, so
    a fixed prior (a ridge worth 16,384 tokens x stream_damp of the mean input energy) is what generalises: 1.0 was
    the best at 16k tokens, and 1/16 of it at 256k ties the best value measured there (README)."""
    return stream_damp * min(1.0, STREAM_DAMP_TOKENS / max(tokens, 1.0))


def _toward_stream(work: nn.Module, index: int, st: Mapping[str, torch.Tensor], damp: float,
                   part: str = "mlp") -> dict[str, torch.Tensor]:
    """Layer `index`'s MLP (or attention) output projection refit at full width toward the dense model's stream
    (refit.corrected); choosing and refitting the kept units on the result then targets the dense stream."""
    arch = arch_of(work)
    module = arch.mlp_out if part == "mlp" else arch.attn_out
    mod = decoder_layers(work)[index].get_submodule(module)
    W = mod.weight.detach().T if arch.conv1d else mod.weight.detach()
    bias = getattr(mod, "bias", None)
    Wc, b = refit.corrected(W, st[f"{part}_gram"][index], st[f"{part}_drift"][index], damp, bias=bias,
                            x_sum=st[f"{part}_sum"][index], count=float(st["tokens"].item()),
                            e_sum=st[f"{part}_drift_sum"][index])
    name = f"{arch.layers}.{index}.{module}"
    out = {f"{name}.weight": Wc.T if arch.conv1d else Wc}
    if b is not None:
        out[f"{name}.bias"] = b
    return out


def _broadcast(runners, remote: bool, method: str, *args) -> None:
    if remote:
        import ray

        ray.get([getattr(r, method).remote(*args) for r in runners])
    else:
        for r in runners:
            getattr(r, method)(*args)


def prune_sequential(model: nn.Module | LayerStore, runners: Sequence, prune_cfg: PruneConfig, *, domain: str,
                     shape: Shape | None = None, remote: bool = False, base_model: str = "", profile: str = "",
                     vocab: tuple[int, ...] | None = None, on_layer=None) -> tuple[PruningPlan, dict[str, torch.Tensor]]:
    """Choose and refit one layer at a time; returns the plan and the new weights (dense shapes) to slim with.

    `runners` are LayerRunner objects (or Ray actor handles of them with remote=True) over disjoint shares of the
    calibration blocks; `shape` defaults to the job's uniform target shape. Only width pruning is sequential (a
    depth cut has no per-layer order to follow). `model` may be a LayerStore: each layer is then read when its turn
    comes and released after it, and the new weights are kept on disk (a SpilledTensors mapping, read back by name)."""
    if prune_cfg.method not in SEQUENTIAL_METHODS or prune_cfg.mode != "target":
        raise ConfigError(f"prune.sequential supports target-mode width pruning with "
                          f"{', '.join(SEQUENTIAL_METHODS)}, not {prune_cfg.method!r} ({prune_cfg.mode})")
    store = model if isinstance(model, LayerStore) else None
    stream = stream_refit(prune_cfg, model.config)
    # The driver's model, scored and refit layer by layer: a skeleton with one layer read at a time, or the model
    # with a private layer list whose layer i is copied before it is written.
    work, layers = (store.skeleton().eval(), None) if store else _private_layers(model)
    w = widths(work)
    dtype = (store.dtype or _stored_dtype(store)) if store else next(work.parameters()).dtype
    shape = shape or target_shape(work, prune_cfg, None, {})
    mlp_keep: list = [None] * w["layers"]
    kv_keep: list = [None] * w["layers"]
    # Streamed, the new weights go to disk as each layer is done (read back one layer at a time by slimming), so
    # the driver never holds a third of the model's layer weights.
    weights: dict[str, torch.Tensor] | SpilledTensors = SpilledTensors(0) if store else {}
    cut = {"attn": shape.kv_groups < w["kv_heads"], "mlp": shape.mlp_width < w["intermediate"]}
    correct = {"attn": stream and prune_cfg.stream_attn, "mlp": stream}
    for i in range(w["layers"]):
        if store:
            decoder_layers(work)[i].load_state_dict(store.layer_state(i), strict=True, assign=True)
        else:
            layers[i] = copy.deepcopy(layers[i])
        if stream:
            _broadcast(runners, remote, "dense_step", i, correct["attn"])
        # Attention first (groups chosen, or its output corrected), then the MLP on the attention's new outputs.
        for part in ("attn", "mlp"):
            if not (cut[part] or correct[part]):
                continue
            # A correction alone of the attention needs only the layer's first half on each batch.
            st = _merged(runners, i, w["layers"], remote, drift=part if correct[part] else None,
                         attn_only=part == "attn" and not cut["attn"])
            if correct[part]:
                # The part's output projection absorbs the stream's drift at full width, whether it loses units
                # or not; its units are then chosen and refit from the corrected projection.
                ridge = stream_ridge(prune_cfg.stream_damp, float(st["tokens"]))
                corrected = _toward_stream(work, i, st, ridge, part)
                _write(work, corrected)
                if not cut[part]:
                    new = {k: v.to(dtype) for k, v in corrected.items()}
                    weights.update(new)
                    _broadcast(runners, remote, "apply", new)
                    continue
            scores = scoring.score_all(prune_cfg, st, work, shape=shape, layers=[i])
            row, width = (scores.kv[i], shape.kv_groups) if part == "attn" else (scores.mlp[i], shape.mlp_width)
            keep = top_units(row[None], width)[0]
            if part == "attn":
                kv_keep[i] = keep
                new = refit.layer_compensation(work, i, None, keep, st, prune_cfg.damp, prune_cfg.reconstruct)
            else:
                mlp_keep[i] = keep
                new = refit.layer_compensation(work, i, keep, None, st, prune_cfg.damp, prune_cfg.reconstruct)
            new = {k: v.to(dtype) for k, v in new.items()}
            _write(work, new)
            weights.update(new)
            _broadcast(runners, remote, "apply", new)
        _broadcast(runners, remote, "advance", i)
        # Layer i's new weights are in `weights`; no later layer's choice reads it.
        if store:
            _params_to_meta(decoder_layers(work)[i])
        else:
            layers[i] = decoder_layers(model)[i]
        if on_layer:
            on_layer(i)
    _broadcast(runners, remote, "close")  # the last stream is not needed: spill files go now, not at exit
    plan = plan_from_shape(_chosen(mlp_keep, kv_keep, w), work if store else model, shape, domain=domain, method=prune_cfg.method,
                           base_model=base_model, profile=profile, target=prune_cfg.target, vocab=vocab,
                           reconstruct=prune_cfg.reconstruct, damp=prune_cfg.damp)
    return dataclasses.replace(plan, sequential=True), weights


def _chosen(mlp_keep, kv_keep, w) -> scoring.Scores:
    """Scores under which plan_from_shape keeps exactly the units chosen layer by layer."""
    L = w["layers"]
    mlp = torch.zeros(L, w["intermediate"], dtype=torch.float64)
    kv = torch.zeros(L, w["kv_heads"], dtype=torch.float64)
    for i in range(L):
        mlp[i, list(mlp_keep[i] or range(w["intermediate"]))] = 1
        kv[i, list(kv_keep[i] or range(w["kv_heads"]))] = 1
    return scoring.Scores(mlp=mlp, kv=kv, layer=torch.zeros(L, dtype=torch.float64), vocab=torch.zeros(0))


__all__ = ["LayerRunner", "STREAM_DAMP_TOKENS", "prune_sequential", "ray_runners", "stream_ridge"]
