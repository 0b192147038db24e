"""The worker's side of sequential pruning (minigpt.sequential): a LayerRunner holds one share of the calibration
blocks' residual stream and answers `stats`, `apply` and `advance`, one layer at a time.

It captures the arguments each layer is called with (masks, rotary tables) from the model's own forward with every
layer standing in as the identity, so every architecture works as its modeling code built them, at the cost of no
layer pass. Built from a model it shares that model's weights and copies a layer only when `apply` changes it (the
caller's model is never written); built from a checkpoint folder (`LayerRunner.from_folder`, what `ray_runners`
starts as Ray actors) it runs on a minigpt.streamed.StreamedDecoder: the embedding and head resident, one decoder
layer read from the folder at a time, the streams in HiddenBuffers under a byte budget.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from minigpt import stats as S
from minigpt.hidden import HiddenBuffer
from minigpt.layerstore import LayerStore
from minigpt.memory import peak_rss_mib
from minigpt.models import arch_of, load_model, residual_scale, widths
from minigpt.streamed import StreamedDecoder

class _AttentionDone(Exception):
    """Raised from a hook to end a layer pass once the attention output is known (LayerRunner.stats)."""


class LayerRunner:
    """One worker's side of sequential pruning (see the module docstring)."""

    def __init__(self, model: nn.Module | StreamedDecoder, blocks: torch.Tensor, batch_size: int,
                 general: torch.Tensor | None = None, general_weight: float = 0.0,
                 hidden_budget: int | None = None, spill_dir: str | None = None):
        """`model`: a model (its weights shared, see the module docstring) or a StreamedDecoder; with the latter
        each stream (the pruned one, and the dense one for refit_target stream) is held in a HiddenBuffer of
        `hidden_budget` bytes (None: unlimited) spilling to `spill_dir`."""
        self._dec = model if isinstance(model, StreamedDecoder) else None
        self._budget, self._spill_dir = hidden_budget, spill_dir
        if self._dec is not None:
            self.model, self.layers = self._dec.model, self._dec.layers
        else:
            self.model, self.layers = _private_layers(model)
        self._shared = list(self.layers)  # the layers as given: one is put back once its changed copy is done with
        self._own: dict[int, nn.Module | dict[str, torch.Tensor]] = {}  # changed layers: a copy, or a parked state
        self.hidden = self._stream()  # residual stream entering the next layer, per batch
        self.calls: list[list[tuple[tuple, dict]]] = []  # per batch, per layer: (extra args, kwargs)
        self._returns: list = []  # what a layer returns after its hidden state (None: a bare tensor); see _capture
        # Groups of batches whose sums are weighted alike: the domain's blocks (1), and general text (minigpt.general)
        # at `general_weight`, which joins the statistics exactly as stats.mix joins a one-shot profile's.
        self.groups: list[tuple[float, list[int], int]] = []  # (weight, batch indices, tokens)
        for part, weight in ((blocks, 1.0), (general, general_weight)):
            if part is None or not len(part) or not weight:
                continue
            first = len(self.hidden)
            for start in range(0, part.shape[0], batch_size):
                self.hidden.put(len(self.hidden), self._capture(part[start:start + batch_size]))
            self.groups.append((float(weight), list(range(first, len(self.hidden))), int(part.numel())))
        self.tokens = sum(g[2] for g in self.groups)
        if self._dec is not None:
            # Every batch is captured: the layers are all a runner runs from here on, so the embedding and the head
            # go (on Qwen2.5-1.5B, 1.7 of the 6 GB a runner held).
            self._dec.release_outside()
        # The stream target: the dense model's stream rides along (the same layer, run before it is changed). It
        # is copied on the first dense_step, so only runs that refit toward the stream hold it.
        self.dense: _Batches | HiddenBuffer | None = None
        self.dense_next: _Batches | HiddenBuffer | None = None
        self.dense_attn: list[torch.Tensor] = []  # the dense attention output projection's output, per batch
        self._changed = False  # weights applied or layers advanced: the current stream is no longer the dense one
        self._reuse: tuple | None = None  # (layer, MLP output projection's name, [(out, x, y)] per batch): `stats`

    @classmethod
    def from_folder(cls, folder: str, blocks: torch.Tensor, batch_size: int, general: torch.Tensor | None = None,
                    general_weight: float = 0.0, dtype: str = "float32", hidden_budget: int | None = None,
                    spill_dir: str | None = None, trust_remote_code: bool = False) -> LayerRunner:
        """A runner over a checkpoint folder that never holds more than its embedding, head and one decoder layer."""
        store = LayerStore(folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        return cls(StreamedDecoder(store), blocks, batch_size, general, general_weight, hidden_budget, spill_dir)

    def _stream(self) -> _Batches | HiddenBuffer:
        """A per-batch stream: a list in memory, a HiddenBuffer under the budget for a streamed runner."""
        return _Batches() if self._dec is None else HiddenBuffer(self._budget, self._spill_dir)

    def _layer(self, index: int) -> nn.Module:
        """Layer `index` as it now is; a streamed runner reads it (or brings a changed one back) and makes it the
        resident layer, parking a changed layer it releases as its state."""
        if self._dec is None:
            return self.layers[index]
        if self._dec.resident != index:
            if self._dec.resident in self._own:
                self._own[self._dec.resident] = self._dec.resident_state()
            with torch.inference_mode(False):  # ordinary tensors, which `apply` may write outside inference mode
                self._dec.load_layer(index, self._own.get(index))
        return self.layers[index]

    def _owned_layer(self, index: int) -> nn.Module:
        """Layer `index`, ready to be written: copied first from a shared model (the caller's stays as it is)."""
        layer = self._layer(index)
        if index not in self._own:
            if self._dec is None:
                self.layers[index] = layer = copy.deepcopy(layer)
            self._own[index] = layer
        return layer

    def _done(self, index: int) -> None:
        """Layer `index` is behind the stream: the next calls are for later layers, so its copy (or its resident
        weights) can go."""
        if self._own.pop(index, None) is not None and self._dec is None:
            self.layers[index] = self._shared[index]
        if self._dec is not None and self._dec.resident == index:
            self._dec.release_layer()

    @torch.inference_mode()
    def _capture(self, ids: torch.Tensor) -> torch.Tensor:
        """Keep layer 0's input and the arguments every layer receives (masks, rotary tables: Gemma 3's local and
        global layers get different ones), without computing the layers.

        The decoder runs with every layer standing in as the identity, so a capture costs the embedding and the
        mask / rotary set-up, not a forward pass: the layers are computed one at a time later. The first call runs
        layer 0 for real once, to learn what a layer returns (a tensor, or a tuple with extra entries)."""
        if self._dec is not None:  # the same capture, on the skeleton (minigpt.streamed)
            cap = self._dec.capture(ids)
            self.calls.append(cap.calls)
            return cap.hidden
        calls: list[tuple[tuple, dict]] = [None] * len(self.layers)  # type: ignore[list-item]
        first: list[torch.Tensor] = []

        def stand_in(i: int, real):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if i == 0:
                    first.append(hidden.detach())
                calls[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
                if not self._returns:
                    out = real(*args, **kwargs)
                    self._returns.append(tuple(out[1:]) if isinstance(out, tuple | list) else None)
                tail = self._returns[0]
                return hidden if tail is None else (hidden, *tail)
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stand_in(i, layer.forward)
        try:
            self.model.base_model(input_ids=ids, use_cache=False)
        finally:
            for layer in self.layers:
                del layer.forward  # the class's own forward again
        self.calls.append(calls)
        return first[0]

    def _run(self, index: int, b: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        args, kw = self.calls[b][index]
        out = self._layer(index)(self.hidden.get(b) if hidden is None else hidden, *args, **kw)
        return out[0] if isinstance(out, tuple | list) else out

    @torch.inference_mode()
    def dense_step(self, index: int, attn: bool = False) -> None:
        """The dense model's stream after layer `index`, computed while that layer still has its dense weights; with
        `attn`, also the dense attention output projection's output (for `stats(drift="attn")`)."""
        if self.dense is None:
            if index or self._changed:
                raise RuntimeError("the dense stream is copied at layer 0 before anything changes: call dense_step "
                                   "for every layer from the first")
            self.dense = self._stream()
            for b in range(len(self.hidden)):  # never written in place: sharing the tensors is a copy
                self.dense.put(b, self.hidden.get(b))
        seen: list[torch.Tensor] = []
        hook = self._layer(index).get_submodule(arch_of(self.model).attn_out).register_forward_hook(
            lambda _m, _a, out: seen.append(out.detach())) if attn else None
        try:
            if self.dense_next is not None and self.dense_next is not self.dense:
                _close(self.dense_next)
            self.dense_next = self._stream()
            for b in range(len(self.hidden)):
                self.dense_next.put(b, self._run(index, b, self.dense.get(b)))
        finally:
            if hook:
                hook.remove()
        self.dense_attn = seen

    @torch.inference_mode()
    def stats(self, index: int, drift: str | None = None, attn_only: bool = False) -> dict:
        """Statistics of layer `index` alone (Gram matrices included) on the current activations.

        With `drift` ("mlp" or "attn"; after `dense_step(index)`), also the error sums the stream target refits
        from: `<part>_drift` = sum e x^T [1, D, in] and `<part>_drift_sum` = sum e [1, D], with x the input of that
        part's output projection and e, in the units of the projection's output (divided by the residual scale),
        the dense stream minus this model's stream just after the part: after the whole layer for "mlp", after
        the attention's contribution joins the stream for "attn". `attn_only` stops each batch at the attention
        output (its sums are then the only complete ones): what a correction of the attention alone needs.

        A whole-layer pass also keeps, per batch, the layer's output and the MLP output projection's input and
        output, where the layer's output is linear in that projection's (pre-norm blocks): if only that
        projection changes before `advance`, the next stream is then out + scale (W' x - W x), with no second
        pass through the layer. It costs (intermediate + 2 hidden) values per token until `advance`."""
        if attn_only and drift != "attn":
            raise ValueError("attn_only needs drift='attn'")
        spec = S.StatSpec(gram=True)
        layer = self._layer(index)
        arch = arch_of(self.model)
        hooked: dict[str, nn.Module] = {}
        drift_shapes: dict[str, tuple[int, ...]] = {}
        if drift:
            if drift not in ("mlp", "attn"):
                raise ValueError(f"drift must be 'mlp' or 'attn', got {drift!r}")
            if self.dense_next is None or (drift == "attn" and not self.dense_attn):
                raise RuntimeError(f"stats(drift={drift!r}) needs dense_step() for the same layer first"
                                   + (" (with attn=True)" if drift == "attn" else ""))
            hooked["drift"] = mod = layer.get_submodule(arch.mlp_out if drift == "mlp" else arch.attn_out)
            width = mod.weight.shape[0 if arch.conv1d else 1]
            hidden = widths(self.model)["hidden"]
            drift_shapes = {f"{drift}_drift": (1, hidden, width), f"{drift}_drift_sum": (1, hidden)}
        if not attn_only and arch.post_norms is None:
            hooked["mlp"] = layer.get_submodule(arch.mlp_out)
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in hooked}

        def keeper(key: str):
            def keep(_m, args, out):
                seen[key].append((args[0].detach(), out.detach()))
                if attn_only:
                    raise _AttentionDone
            return keep

        hooks = [m.register_forward_hook(keeper(k)) for k, m in hooked.items()]
        scale = residual_scale(self.model)
        kept = [] if self._dec is None else _Triples(self._stream())  # streamed: under the budget too
        self._drop_reuse()
        # Each group's sums, weighted into one total as they finish: two sets of Gram matrices live at once, never
        # one per group plus their weighted copies (a 0.5B model's MLP Gram alone is 190 MB in fp64).
        total: dict[str, torch.Tensor] | None = None
        try:
            for weight, batches, tokens in self.groups:
                st = S.layer_stats_for_model(self.model, spec)
                st.update({k: torch.zeros(shape, dtype=torch.float64) for k, shape in drift_shapes.items()})
                with S.collecting(self.model, st, spec, layer=index):
                    for b in batches:
                        try:
                            out = self._run(index, b)
                        except _AttentionDone:  # the rest of the layer is not needed
                            out = None
                        if "mlp" in seen:
                            kept.append((out, *seen["mlp"].pop()))
                        if drift:
                            x, y = seen["drift"].pop()
                            if drift == "mlp":
                                e = (self.dense_next.get(b) - out) / scale
                            else:  # streams just after the attention: the layer's input plus its attention output
                                e = (self.dense.get(b) - self.hidden.get(b)) / scale + self.dense_attn[b] - y
                            x = x.reshape(-1, x.shape[-1])
                            e = e.reshape(x.shape[0], -1)
                            st[f"{drift}_drift"][0] += S.cross(e, x)
                            st[f"{drift}_drift_sum"][0] += e.sum(0, dtype=torch.float64)
                st["tokens"] += tokens
                if total is None:
                    total = st if weight == 1 else {k: v.mul_(weight) for k, v in st.items()}
                else:
                    for k, v in st.items():
                        total[k].add_(v, alpha=weight)
                del st
        finally:
            for h in hooks:
                h.remove()
        if len(kept):
            self._reuse = (index, f"{arch.layers}.{index}.{arch.mlp_out}.", kept)
        return S.to_numpy(total)

    def peak_rss_mib(self) -> float:
        """The process's peak resident memory (a runner actor reports its own, measured)."""
        return peak_rss_mib()

    def close(self) -> None:
        """Drop the streams (and their spill files) and every layer held: the runner has nothing left to do."""
        self._drop_reuse()
        for stream in (self.hidden, self.dense, self.dense_next):
            _close(stream)
        self.hidden, self.dense, self.dense_next, self.dense_attn = self._stream(), None, None, []
        self._own.clear()
        if self._dec is not None:
            self._dec.release_layer()

    def _drop_reuse(self) -> None:
        if self._reuse is not None and isinstance(self._reuse[2], _Triples):
            self._reuse[2].close()
        self._reuse = None

    def apply(self, weights: Mapping[str, torch.Tensor]) -> None:
        root = arch_of(self.model).layers + "."
        for index in sorted({int(k[len(root):].split(".", 1)[0]) for k in weights if k.startswith(root)}):
            self._owned_layer(index)  # resident and private before it is written
        _write(self.model, weights)
        self._changed = True
        if self._reuse and any(not k.startswith(self._reuse[1]) for k in weights):
            self._drop_reuse()  # more than the MLP output projection changed: advance runs the layer again

    @torch.inference_mode()
    def advance(self, index: int) -> None:
        """Move the stream one layer on, through layer `index` as it now is."""
        if self._reuse is not None and self._reuse[0] == index:
            # Only the MLP output projection changed since the last whole-layer pass (see `stats`).
            mod = self._layer(index).get_submodule(arch_of(self.model).mlp_out)
            scale = residual_scale(self.model)
            for b, (out, x, y) in enumerate(self._reuse[2]):
                self.hidden.put(b, out + scale * (mod(x) - y))
        else:
            for b in range(len(self.hidden)):
                self.hidden.put(b, self._run(index, b))
        self._drop_reuse()
        self._changed = True
        self._done(index)
        if self.dense is not None:
            _close(self.dense)
            self.dense, self.dense_next, self.dense_attn = self.dense_next, None, []


class _Batches(list):
    """An in-memory stream: a list of per-batch tensors with HiddenBuffer's get / put."""

    def get(self, b: int) -> torch.Tensor:
        return self[b]

    def put(self, b: int, value: torch.Tensor) -> None:
        if b == len(self):
            self.append(value)
        else:
            self[b] = value


class _Triples:
    """(out, x, y) per batch (see `LayerRunner.stats`) in a HiddenBuffer: a streamed runner's budget covers them."""

    def __init__(self, buffer: HiddenBuffer):
        self.buffer, self.n = buffer, 0

    def append(self, triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        for j, t in enumerate(triple):
            self.buffer.put(3 * self.n + j, t)
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for b in range(self.n):
            yield tuple(self.buffer.get(3 * b + j) for j in range(3))

    def close(self) -> None:
        self.buffer.close()


def _close(stream) -> None:
    if isinstance(stream, HiddenBuffer):
        stream.close()


def _private_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """A shallow copy of `model` whose modules on the path to its layer list, and that list, are its own: a layer
    replaced in it (a changed copy) is not replaced in `model`, every other weight is shared. A model in training
    mode is copied whole, so that switching to eval (no dropout) does not change the caller's."""
    if any(m.training for m in model.modules()):
        model = copy.deepcopy(model).eval()
    top = _shallow(model)
    mod = top
    for name in arch_of(model).layers.split("."):
        mod._modules[name] = child = _shallow(mod._modules[name])
        mod = child
    return top, mod


def _shallow(module: nn.Module) -> nn.Module:
    out = copy.copy(module)
    out._modules = dict(module._modules)
    return out



def _write(model: nn.Module, new: Mapping[str, torch.Tensor]) -> None:
    """Copy new values (tensors, or numpy arrays sent through Ray) into the model's named parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in new.items():
            params[k].copy_(torch.as_tensor(v, dtype=params[k].dtype))


def ray_runners(model_dir: str, shards: Sequence[torch.Tensor], batch_size: int, dtype: str = "float32",
                cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                general: Sequence[torch.Tensor] | None = None, general_weight: float = 0.0,
                hidden_budget: int | None = None, spill_dir: str | None = None, streamed: bool = True,
                memory: int = 0) -> list:
    """One LayerRunner actor per share of the calibration blocks (and of the general text, when given). Streamed
    (CPU), each reads the model from its folder one layer at a time (embedding, head and one layer resident; each
    stream under `hidden_budget` bytes, None: unlimited); otherwise (or on a GPU) each loads the whole model onto
    its device. `memory`: Ray's memory resource per actor in bytes (0: none)."""
    import ray

    @ray.remote
    class _Runner(LayerRunner):
        def __init__(self, folder, blocks, batch, extra, weight):
            torch.set_num_threads(max(1, int(cpus_per_worker)))
            if streamed and not torch.cuda.is_available():
                model = StreamedDecoder(LayerStore(folder, dtype=getattr(torch, dtype)))
            else:
                model = load_model(folder, dtype).to("cuda" if torch.cuda.is_available() else "cpu")
            super().__init__(model, torch.as_tensor(blocks), batch,
                             None if extra is None else torch.as_tensor(extra), weight, hidden_budget, spill_dir)

    opts = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, **({"memory": memory} if memory else {})}
    general = list(general) if general is not None else [None] * len(shards)
    return [_Runner.options(**opts).remote(str(model_dir), b.numpy(), batch_size,
                                           None if g is None else g.numpy(), general_weight)
            for b, g in zip(shards, general)]


__all__ = ["LayerRunner", "ray_runners"]
