"""Calibration statistics: forward hooks that accumulate fp64 sums, pure functions that merge them, and the profile
file that keeps them (save_profile, load_profile: no Ray needed to read one).

A `Stats` is a plain dict name -> float64 tensor. Every entry is a *sum* (never a mean), and the token count is
itself an entry, so merging is element-wise addition: associative, commutative, and N workers give the profile one
worker gives on the same batches (up to the order of fp64 additions). Means, scores and least-squares solutions are
derived later (minigpt.scoring, minigpt.refit).

Always collected (L layers, I MLP channels, H attention heads, D hidden size, V vocabulary):
  tokens          [1]     token positions seen
  mlp_abs_sum     [L, I]  sum |a| of each layer's down-projection input (the Mini-GPTs statistic)
  mlp_sq_sum      [L, I]  sum a^2 of the same (for ||X|| in wanda-sp style scores)
  head_sq_sum     [L, H]  sum of the squared norm of each head's output (the output projection's input, per head)
  hidden_sq_sum   [L, D]  sum a^2 of the residual stream entering each layer
  block_cos_sum   [L]     sum of cos(layer input, layer output) per token (block influence, for depth pruning)
  token_counts    [V]     occurrences of each token id

Second moments, collected only when a `StatSpec` asks (least-squares compensation, structured OBS, depth with
replacement); Q = H * head_dim is the attention output projection's input width:
  mlp_gram        [L, I, I]  sum x x^T of the down-projection input x        (gram)
  mlp_sum         [L, I]     sum x of the same (intercepts, for layers with a bias)
  attn_gram       [L, Q, Q]  sum x x^T of the attention output projection's input
  attn_sum        [L, Q]     sum x of the same
  mlp_out_gram    [L, D, D]  sum a^T a of each block's MLP output a            (depth_spans)
  depth_cross_<n> [L, D, D]  sum a_k^T b_k with b_k = h_{k+1+n} - h_{k+1} + a_k: the part of the residual after a
                             cut of the n layers k+1..k+n that block k's remapped MLP output must supply (ReplaceMe)
  depth_bsq_<n>   [L, D]     sum b_k^2 per residual channel (with the two above, the residual a replacement leaves in
                             each channel, predicted without a forward pass)
Rows of depth_cross_<n> / depth_bsq_<n> whose span runs past the last layer stay zero.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from minigpt.io import atomic_save_np, atomic_write_text
from minigpt.models import (attn_output, decoder_layers, kv_coupling, kv_prunable, mlp_coupling, mlp_output,
                            mlp_parts, per_unit, residual_scale, widths)

Stats = dict[str, torch.Tensor]

@dataclass(frozen=True)
class StatSpec:
    """Which optional statistics a calibration pass collects (the base statistics are always collected)."""

    gram: bool = False  # second moments of the output projections' inputs (compensation, OBS)
    depth_spans: tuple[int, ...] = ()  # cut lengths n whose replacement moments are collected

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.depth_spans) or len(set(self.depth_spans)) != len(self.depth_spans):
            raise ValueError(f"depth_spans must be distinct positive span lengths, got {self.depth_spans}")
        object.__setattr__(self, "depth_spans", tuple(sorted(self.depth_spans)))


def stat_shapes(model_or_config, spec: StatSpec = StatSpec()) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every statistic a pass with `spec` collects, from the config alone."""
    w = widths(model_or_config)
    L, I, H, D, V = w["layers"], w["intermediate"], w["heads"], w["hidden"], w["vocab"]
    Q = H * w["head_dim"]
    shapes = {"tokens": (1,), "mlp_abs_sum": (L, I), "mlp_sq_sum": (L, I), "head_sq_sum": (L, H),
              "hidden_sq_sum": (L, D), "block_cos_sum": (L,), "token_counts": (V,)}
    if spec.gram:
        shapes.update(mlp_gram=(L, I, I), mlp_sum=(L, I), attn_gram=(L, Q, Q), attn_sum=(L, Q))
    if spec.depth_spans:
        shapes["mlp_out_gram"] = (L, D, D)
        for n in spec.depth_spans:
            shapes[f"depth_cross_{n}"] = (L, D, D)
            shapes[f"depth_bsq_{n}"] = (L, D)
    return shapes


def stats_bytes(model_or_config, spec: StatSpec = StatSpec()) -> int:
    """Bytes of one profile (fp64) collected with `spec`: what a worker holds per domain and a profile weighs."""
    return 8 * sum(int(np.prod(s)) for s in stat_shapes(model_or_config, spec).values())


def spec_of(stats: Mapping[str, torch.Tensor]) -> StatSpec:
    """The StatSpec a profile was collected with (read back from its entries)."""
    spans = tuple(int(k.rsplit("_", 1)[1]) for k in stats if k.startswith("depth_cross_"))
    return StatSpec(gram="mlp_gram" in stats, depth_spans=spans)


def stats_for_model(model_or_config, spec: StatSpec = StatSpec()) -> Stats:
    """Zeroed statistics of every entry `spec` collects."""
    return {k: torch.zeros(s, dtype=torch.float64) for k, s in stat_shapes(model_or_config, spec).items()}


def merge(parts: Iterable[Mapping[str, torch.Tensor]]) -> Stats:
    """Sum statistics. Keys must agree; the result is a fresh dict of float64 tensors."""
    out: Stats | None = None
    for part in parts:
        if out is None:
            out = {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in part.items()}
            continue
        if set(part) != set(out):
            raise ValueError(f"cannot merge statistics with different entries: {sorted(set(part) ^ set(out))}")
        for k, v in part.items():
            out[k] += torch.as_tensor(v, dtype=torch.float64)
    if out is None:
        raise ValueError("merge() needs at least one statistics dict")
    return out


# Statistics that describe the domain alone: which tokens it uses (vocabulary pruning) is never mixed.
DOMAIN_ONLY = ("token_counts",)


def mix(domain: Mapping[str, torch.Tensor], general: Mapping[str, torch.Tensor], weight: float) -> Stats:
    """Domain sums plus general text's sums rescaled to `weight` times the domain's token mass (minigpt.general):
    every mean is then (1 - s) x the domain's + s x general's with s = weight / (1 + weight). A general entry the
    domain lacks is left out; DOMAIN_ONLY entries are the domain's own. Sums stay sums: mixing merged profiles
    equals merging mixed parts scaled alike."""
    if weight < 0:
        raise ValueError("mix weight must be >= 0")
    scale = weight * float(domain["tokens"].sum()) / max(float(general["tokens"].sum()), 1.0)
    out: Stats = {}
    for k, v in domain.items():
        v = torch.as_tensor(v, dtype=torch.float64)
        if k in DOMAIN_ONLY or k not in general or weight == 0:
            out[k] = v.clone()
        elif tuple(general[k].shape) != tuple(v.shape):
            raise ValueError(f"cannot mix {k}: shapes {tuple(v.shape)} and {tuple(general[k].shape)}")
        else:
            out[k] = v + scale * torch.as_tensor(general[k], dtype=torch.float64)
    return out


def to_numpy(stats: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """For shipping through Ray: CPU numpy, never CUDA tensors."""
    return {k: v.detach().cpu().numpy() for k, v in stats.items()}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> Stats:
    return {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in arrays.items()}  # a writable copy


def _first_tensor(x):
    return x[0] if isinstance(x, tuple | list) else x


def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b of [N, p] and [N, q] batches in fp64: the product in the activations' precision (fp32 at least; a
    batch's error is then ~1e-7 relative), the sums it is added to in fp64 (so they merge exactly)."""
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return (wide(a).T @ wide(b)).double()


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of a [N, m] batch (see `cross`)."""
    return cross(x, x)


class _Collector:
    """Hooks on one model that add each forward pass's statistics into `stats` (in place).

    With `layer` set, only that decoder layer is hooked and its statistics go to row 0 of a one-layer `stats`
    (layer_stats_for_model): what sequential pruning sums per layer without holding every layer's Gram matrices."""

    def __init__(self, model: nn.Module, stats: Stats, spec: StatSpec, layer: int | None = None):
        self.model, self.stats, self.spec = model, stats, spec
        self.heads = widths(model)["heads"]
        self.scale = residual_scale(model)  # Granite: what a block adds to the stream is scaled after mlp_output
        self.handles = []
        self.hidden: dict[int, torch.Tensor] = {}  # depth: residual stream h_i of the current batch, flattened
        self.mlp_out: dict[int, torch.Tensor] = {}  # depth: each block's MLP output a_k of the current batch
        if layer is not None and spec.depth_spans:
            raise ValueError("depth moments span several layers; they cannot be collected for one layer")
        self.only = layer
        for i, block in enumerate(decoder_layers(model)):
            if layer is None or i == layer:
                self._register(i, block)

    def _register(self, i: int, block: nn.Module) -> None:
        _, down = mlp_parts(block)
        self.handles.append(down.register_forward_pre_hook(self._mlp_hook(i)))
        self.handles.append(attn_output(block).register_forward_pre_hook(self._attn_hook(i)))
        self.handles.append(block.register_forward_hook(self._block_hook(i), with_kwargs=True))
        if self.spec.depth_spans:
            self.handles.append(mlp_output(block).register_forward_hook(self._mlp_out_hook(i)))

    def _add(self, name: str, layer: int, value: torch.Tensor) -> None:
        self.stats[name][0 if self.only is not None else layer] += value

    def _mlp_hook(self, i: int):
        def hook(_m, args):
            a = args[0].detach()
            flat = a.reshape(-1, a.shape[-1])
            self._add("mlp_abs_sum", i, flat.abs().sum(0, dtype=torch.float64))
            self._add("mlp_sq_sum", i, flat.square().sum(0, dtype=torch.float64))
            if self.spec.gram:
                self._add("mlp_gram", i, _gram(flat))
                self._add("mlp_sum", i, flat.sum(0, dtype=torch.float64))
        return hook

    def _attn_hook(self, i: int):
        def hook(_m, args):
            a = args[0].detach()
            flat = a.reshape(-1, a.shape[-1])
            per_head = flat.reshape(flat.shape[0], self.heads, -1).float()
            self._add("head_sq_sum", i, per_head.square().sum(-1).sum(0, dtype=torch.float64))
            if self.spec.gram:
                self._add("attn_gram", i, _gram(flat))
                self._add("attn_sum", i, flat.sum(0, dtype=torch.float64))
        return hook

    def _block_hook(self, i: int):
        def hook(_m, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            y = _first_tensor(output).detach()
            self._add("hidden_sq_sum", i, x.reshape(-1, x.shape[-1]).square().sum(0, dtype=torch.float64))
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            self._add("block_cos_sum", i, cos.sum(dtype=torch.float64))
            if self.spec.depth_spans:
                if i == 0:
                    self.hidden[0] = x.reshape(-1, x.shape[-1]).float()
                self.hidden[i + 1] = y.reshape(-1, y.shape[-1]).float()
        return hook

    def _mlp_out_hook(self, i: int):
        def hook(_m, _args, output):
            a = _first_tensor(output).detach()
            self.mlp_out[i] = a.reshape(-1, a.shape[-1]).float() * self.scale
        return hook

    def end_batch(self) -> None:
        """Depth moments need every layer's activations of a batch at once: added here, after the forward."""
        if not self.spec.depth_spans:
            return
        h, a, st = self.hidden, self.mlp_out, self.stats
        L = len(a)
        for k in range(L):
            st["mlp_out_gram"][k] += _gram(a[k])
            for n in self.spec.depth_spans:
                if k + 1 + n > L:
                    continue
                b = h[k + 1 + n] - h[k + 1] + a[k]
                st[f"depth_cross_{n}"][k] += cross(a[k], b)
                st[f"depth_bsq_{n}"][k] += b.square().sum(0, dtype=torch.float64)
        self.hidden.clear()
        self.mlp_out.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_stats_for_model(model: nn.Module, spec: StatSpec = StatSpec(gram=True)) -> Stats:
    """Empty statistics of ONE decoder layer (layer dimension 1; token counts and vocabulary as usual)."""
    shapes = stat_shapes(model, spec)
    L = widths(model)["layers"]
    return {k: torch.zeros((1, *s[1:]) if s and s[0] == L and k != "token_counts" else s, dtype=torch.float64)
            for k, s in shapes.items()}


def layer_view(stats: Mapping[str, torch.Tensor], layer: int, num_layers: int) -> Stats:
    """A one-layer profile laid out as a whole-model one: small per-layer entries are zero-padded to every layer,
    large ones (Gram matrices) answer only for `layer`, so scoring and refitting code reads row `layer` as usual."""
    out: Stats = {}
    for k, v in stats.items():
        if v.dim() >= 1 and v.shape[0] == 1 and k not in ("tokens", "token_counts"):
            if v.dim() >= 3:
                out[k] = _OneRow(v[0], layer)
            else:
                full = torch.zeros((num_layers, *v.shape[1:]), dtype=v.dtype)
                full[layer] = v[0]
                out[k] = full
        else:
            out[k] = v
    return out


class _OneRow:
    """Row `layer` of a per-layer statistic whose other rows were never collected."""

    def __init__(self, row: torch.Tensor, layer: int):
        self.row, self.layer = row, layer

    def __getitem__(self, i: int) -> torch.Tensor:
        if i != self.layer:
            raise IndexError(f"only layer {self.layer} of this statistic was collected, not {i}")
        return self.row


@contextmanager
def collecting(model: nn.Module, stats: Stats, spec: StatSpec = StatSpec(), layer: int | None = None):
    """Hooks that add one forward pass's statistics into `stats`; call `.end_batch()` after each forward."""
    collector = _Collector(model, stats, spec, layer)
    try:
        yield collector
    finally:
        collector.remove()


@torch.inference_mode()
def accumulate(model: nn.Module, blocks: torch.Tensor, batch_size: int, stats: Stats | None = None,
               spec: StatSpec | None = None) -> Stats:
    """Run `blocks` [N, T] through the model's decoder (no lm_head: it affects no statistic) and add their stats.

    `spec` defaults to the one `stats` was built with (base statistics only for a fresh dict)."""
    if stats is None:
        spec = spec or StatSpec()
        stats = stats_for_model(model, spec)
    elif spec is None:
        spec = spec_of(stats)
    device = next(model.parameters()).device
    with collecting(model, stats, spec) as collector:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            model.base_model(input_ids=ids, use_cache=False)
            collector.end_batch()
            stats["tokens"] += ids.numel()
            stats["token_counts"] += torch.bincount(ids.reshape(-1).cpu(), minlength=stats["token_counts"].numel()
                                                    ).to(torch.float64)
    return stats


def taylor_sums(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> Stats:
    """First-order Taylor importance (LLM-Pruner) of coupled groups, as fp64 sums over batches.

    For every batch the next-token loss is back-propagated and sum |w * dL/dw| is added per MLP channel (its input
    rows, biases and output column) and per KV group (its key/value rows, its query heads' rows and their output
    projection columns). Entries: taylor_batches [1], taylor_mlp [L, I], taylor_kv [L, G] (zeros where the
    architecture's heads cannot be pruned), and taylor_resid [L + 1, D]: sum over tokens of (dL/dh)^2 per channel of
    the residual stream h entering each layer (row L: leaving the last one) - the diagonal empirical Fisher that
    prices an error added to the stream there (minigpt.allocate). Gradients are cleared afterwards; the weights are
    not changed.
    """
    w = widths(model)
    layers = decoder_layers(model)
    out = {"taylor_batches": torch.zeros(1, dtype=torch.float64),
           "taylor_mlp": torch.zeros(w["layers"], w["intermediate"], dtype=torch.float64),
           "taylor_kv": torch.zeros(w["layers"], w["kv_heads"], dtype=torch.float64),
           "taylor_resid": torch.zeros(w["layers"] + 1, w["hidden"], dtype=torch.float64)}

    def grad_sq(row: int):
        def add(g: torch.Tensor) -> None:
            out["taylor_resid"][row] += g.detach().reshape(-1, g.shape[-1]).double().square().sum(0).cpu()
        return add

    def watch_input(i: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.requires_grad:
                x.register_hook(grad_sq(i))
        return hook

    def watch_output(_m, _args, _kwargs, output):
        y = _first_tensor(output)
        if y.requires_grad:
            y.register_hook(grad_sq(len(layers)))
    mlp = mlp_coupling(model)
    kv = kv_coupling(model) if kv_prunable(model) else []  # e.g. GPT-2: no prunable KV groups
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    handles = [layer.register_forward_pre_hook(watch_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(watch_output, with_kwargs=True))
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    params = dict(layer.named_parameters())
                    for coupling, key, n in ((mlp, "taylor_mlp", w["intermediate"]), (kv, "taylor_kv", w["kv_heads"])):
                        for c in coupling:
                            p = params[c.name]
                            if p.grad is None:
                                continue
                            contrib = (p.detach().double() * p.grad.double()).abs()
                            per_index = contrib.sum(dim=[d for d in range(p.dim()) if d != c.dim]) if p.dim() > 1 \
                                else contrib
                            out[key][i] += per_unit(c, per_index, n).sum(1).cpu()
            out["taylor_batches"] += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ the profile file


PROFILE_FORMAT = "minigpt.profile/1"


def save_profile(path: Path, stats: Stats, header: dict) -> None:
    """Profile = safetensors of the fp64 sums + a JSON header beside it (model, tokens, shards, statistics)."""
    header = {"format": PROFILE_FORMAT, "statistics": sorted(stats), "tokens": int(stats["tokens"].item()), **header}
    atomic_save_np(to_numpy(stats), path, metadata={"header": json.dumps(header)})
    atomic_write_text(path.with_suffix(".json"), json.dumps(header, indent=1))


def load_profile(path: Path) -> tuple[Stats, dict]:
    with safe_open(str(path), "pt") as f:
        header = json.loads((f.metadata() or {}).get("header", "{}"))
    if header.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path} is not a {PROFILE_FORMAT} file")
    return load_file(str(path)), header
