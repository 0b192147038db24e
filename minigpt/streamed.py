"""Layer-streamed execution: run a model whose decoder layers are never all in memory at once.

The model's modules are built on the meta device (shapes, no storage). Its buffers (rotary tables, Gemma 3's
embedding scale) are rebuilt for real by the modeling code's own `_init_weights`, the embedding and the head (final
norm, lm_head) are loaded from a `LayerStore` and stay resident, and each decoder layer is materialised from the
store only while it runs, then put back on the meta device. A forward is a loop over layers, not over batches:
every batch goes through layer i before layer i + 1 is read, so each layer is read once per pass, and the residual
stream between layers lives in a `HiddenBuffer` (minigpt.hidden) under a byte budget.

The arguments each layer is called with (masks, rotary tables: Gemma 3's local and global layers get different
ones) are captured from the model's own forward with every layer standing in as the identity, the way
minigpt.sequential.LayerRunner captures them, so every architecture works as its modeling code builds them. The
logits come from the model's own forward again, with the last layer standing in as "return the streamed hidden
state", so the final norm, lm_head and whatever an architecture does after them (Gemma 3's soft-capping, Granite's
logit scaling) are the modeling code's too. Neither pass computes a layer.

`streamed_logits` hands the logits out one batch at a time, after every batch has been through every layer
(evaluation and the teacher reduce each batch as it comes: minigpt.evalpass); `streamed_greedy` continues prompts
without a KV cache, one streamed pass per new token; `streamed_sample` samples the job's general text with one
(every layer's entry of transformers' own cache extended by that layer as it runs).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minigpt import stats as S
from minigpt.archs import decoder_layers
from minigpt.config import ConfigError
from minigpt.hidden import HiddenBuffer
from minigpt.layerstore import LayerStore

Calls = list[tuple[tuple, dict[str, Any]]]  # per layer: (positional args after the hidden state, keyword args)
OnLayer = Callable[[int, nn.Module], Callable[[], None] | None]


def _params_to_meta(module: nn.Module, recurse: bool = True) -> None:
    """Replace every parameter of `module` (with `recurse`, of its submodules too) by a meta tensor of the same
    shape: its storage is released."""
    for mod in module.modules() if recurse else [module]:
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _rebuild_buffers(model: nn.Module) -> None:
    """Give every meta buffer (non-persistent ones: rotary frequencies, embedding scales) its real value through the
    modeling code's own initialisation, which is what from_pretrained does for them. Persistent buffers are in the
    checkpoint and loaded with their module. NaN-filled first, so a buffer the code does not initialise fails here
    instead of computing garbage."""
    persistent = set(model.state_dict())
    names = {id(b): n for n, b in model.named_buffers()}
    for mod in model.modules():
        own = [(n, b) for n, b in mod._buffers.items() if b is not None and b.device.type == "meta"]
        if not own:
            continue
        for n, b in own:
            if names[id(b)] in persistent:
                continue
            if not b.is_floating_point():
                raise ConfigError(f"{names[id(b)]}: a non-float buffer the checkpoint does not hold; this model "
                                  "cannot be streamed: set calibrate.streamed false")
            mod._buffers[n] = torch.full(b.shape, float("nan"), dtype=b.dtype)
        model._init_weights(mod)
        for n, b in mod._buffers.items():
            if b is not None and b.device.type != "meta" and b.is_floating_point() and b.isnan().any():
                raise ConfigError(f"{type(mod).__name__}.{n}: the modeling code does not initialise this buffer; "
                                  "this model cannot be streamed: set calibrate.streamed false")


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation of `nbytes` or more (its own initial threshold) with its own mapping, returned
    to the system when freed.

    glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MB), after which blocks of
    that size come from the heap, where freed layers and activations fragment it and stay in the RSS: measured on
    SmolLM2-135M, a streamed pass grew by ~7 MB per layer (+200 MB over 30 layers) without this, and stayed flat
    with it. Process-wide; a no-op (False) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD; fixing it also stops the dynamic raising
    except (OSError, AttributeError):
        return False


def resident_parameters(model: nn.Module) -> int:
    """Parameter elements that hold storage (not on the meta device); a tied tensor counts once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.device.type != "meta":
            seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass
class Captured:
    """What one batch needs to run the layers on its own: layer 0's input and every layer's call arguments."""

    hidden: torch.Tensor
    calls: Calls


class StreamedDecoder:
    """A causal LM whose decoder layers are loaded from `store` one at a time (see the module docstring)."""

    def __init__(self, store: LayerStore, dtype: torch.dtype | None = None, pin_malloc: bool = True):
        from transformers import AutoModelForCausalLM

        if pin_malloc:
            pin_mmap_threshold()
        self.dtype = dtype or store.dtype or _stored_dtype(store)
        self.store = copy.copy(store)  # a view of the same index that converts every tensor once, on the way in
        self.store.dtype = self.dtype
        with torch.device("meta"):
            # dtype as from_pretrained would set it: buffers built in the default dtype (Gemma 3's embedding scale)
            # then match a model loaded in memory.
            self.model = AutoModelForCausalLM.from_config(store.config, dtype=self.dtype,
                                                          trust_remote_code=store.trust_remote_code).eval()
        self.layers = decoder_layers(self.model)
        _rebuild_buffers(self.model)
        self._load_outside()
        self._returns: list[tuple | None] = []  # what a layer returns after its hidden state (learned once)
        self.resident: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _load_outside(self) -> None:
        """Embedding and head: loaded once, resident for the decoder's life."""
        state = {**self.store.embed_state(), **self.store.head_state()}
        missing, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        if unexpected:
            raise RuntimeError(f"{self.store.folder}: unexpected tensors {unexpected[:5]}")
        if self.store.tied:
            self.model.tie_weights()  # lm_head is the (now loaded) embedding again
        root = self.store.arch.layers + "."
        left = [n for n, p in self.model.named_parameters() if p.device.type == "meta" and not n.startswith(root)]
        if left:
            raise RuntimeError(f"{self.store.folder}: no weights for {left[:5]}")

    # -- one layer resident at a time ------------------------------------------------------------------------------

    def load_layer(self, i: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Materialise layer `i` from the store, or from `state` (its tensors named relative to the layer: a layer
        changed in memory and parked, see `resident_state`), releasing whichever layer was resident."""
        if self.resident == i:
            return self.layers[i]
        if self.resident is not None:
            self.release_layer()
        self.layers[i].load_state_dict(self.store.layer_state(i) if state is None else state, strict=True,
                                       assign=True)
        self.resident = i
        return self.layers[i]

    def resident_state(self) -> dict[str, torch.Tensor]:
        """The resident layer's own tensors (not copies): what `load_layer(i, state)` takes to bring it back as it
        is now, after it was released."""
        if self.resident is None:
            raise RuntimeError("no layer is resident")
        return dict(self.layers[self.resident].state_dict(keep_vars=False))

    def release_outside(self) -> None:
        """Release the embedding and the head: a caller that runs layers only (a sequential runner, once it has
        captured its batches) needs neither, and on a large vocabulary they are most of what it holds."""
        root = self.store.arch.layers + "."
        for name, mod in self.model.named_modules():
            if not name.startswith(root):  # the modules around the layers, each its own parameters only
                _params_to_meta(mod, recurse=False)

    def release_layer(self) -> None:
        if self.resident is not None:
            _params_to_meta(self.layers[self.resident])
            self.resident = None

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Layer `i`, resident inside the block and released after it."""
        try:
            yield self.load_layer(i)
        finally:
            self.release_layer()

    # -- the forward, in pieces -------------------------------------------------------------------------------------

    def _learn_returns(self, real_forward: Callable, args: tuple, kwargs: dict) -> None:
        """What a layer returns besides its hidden state (a bare tensor, or a tuple with extra entries): learned by
        running layer 0 (its own forward, not the stand-in) for real once, as LayerRunner does."""
        keep = self.resident
        self.load_layer(0)
        out = real_forward(*args, **kwargs)
        self._returns.append(tuple(out[1:]) if isinstance(out, tuple | list) else None)
        if keep != 0:
            self.release_layer()
            if keep is not None:
                self.load_layer(keep)

    def _with_stand_ins(self, stand_in: Callable[[int, tuple, dict], torch.Tensor], ids: torch.Tensor,
                        whole: bool, cache: Any = None) -> Any:
        """Run the model's own forward with every layer replaced by `stand_in(i, args, kwargs) -> hidden` (with a KV
        `cache`, the layers' arguments carry it and the positions after what it holds)."""
        def forward_of(i: int, real: Callable):
            def forward(*args, **kwargs):
                if not self._returns:
                    self._learn_returns(real, args, kwargs)
                hidden = stand_in(i, args, kwargs)
                tail = self._returns[0]
                return hidden if tail is None else (hidden, *tail)
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = forward_of(i, layer.forward)
        try:
            module = self.model if whole else self.model.base_model
            if cache is None:
                return module(input_ids=ids, use_cache=False)
            return module(input_ids=ids, past_key_values=cache, use_cache=True)
        finally:
            for layer in self.layers:
                del layer.forward  # the class's own forward again

    @torch.inference_mode()
    def capture(self, ids: torch.Tensor, cache: Any = None) -> Captured:
        """Layer 0's input and every layer's call arguments for one batch, without computing a layer (with a KV
        `cache`: arguments that make each layer read and extend its entry of it, see `streamed_sample`)."""
        calls: Calls = [None] * self.num_layers  # type: ignore[list-item]
        first: list[torch.Tensor] = []

        def record(i: int, args: tuple, kwargs: dict) -> torch.Tensor:
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                first.append(hidden)
            calls[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hidden

        self._with_stand_ins(record, ids, whole=False, cache=cache)
        return Captured(first[0], calls)

    @torch.inference_mode()
    def run_layer(self, i: int, hidden: torch.Tensor, calls: Calls) -> torch.Tensor:
        """Layer `i` (made resident if it is not) on one batch's hidden state."""
        args, kwargs = calls[i]
        out = self.load_layer(i)(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple | list) else out

    @torch.inference_mode()
    def finish(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of one batch whose last layer's output is `hidden`: the model's own forward, the last layer
        standing in as "return `hidden`", the others as the identity (so no layer is computed)."""
        last = self.num_layers - 1

        def replay(i: int, args: tuple, kwargs: dict) -> torch.Tensor:
            return hidden if i == last else (args[0] if args else kwargs["hidden_states"])

        return self._with_stand_ins(replay, ids, whole=True).logits


def _stored_dtype(store: LayerStore) -> torch.dtype:
    """The floating dtype the checkpoint's first layer is stored in."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    for n in store.layer_names(0):
        if store.index[n].dtype in names:
            return names[store.index[n].dtype]
    return torch.float32


def _batches(input_ids: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
    size = batch_size or input_ids.shape[0]
    return [input_ids[s:s + size] for s in range(0, input_ids.shape[0], size)]


def _through_layers(dec: StreamedDecoder, batches: Sequence[torch.Tensor], stream: HiddenBuffer,
                    on_layer: OnLayer | None) -> None:
    """Every batch through layer i, then layer i + 1, ...: afterwards `stream` holds each batch's last layer output
    (under key b). The call arguments captured per batch live only as long as this pass."""
    calls = []
    for b, ids in enumerate(batches):
        cap = dec.capture(ids)
        stream.put(b, cap.hidden)
        calls.append(cap.calls)
    for i in range(dec.num_layers):
        with dec.layer(i) as layer:
            done = on_layer(i, layer) if on_layer else None
            for b in range(len(batches)):
                stream.put(b, dec.run_layer(i, stream.get(b), calls[b]))
            if done is not None:
                done()


@torch.inference_mode()
def streamed_logits(dec: StreamedDecoder, batches: Sequence[torch.Tensor], hidden_budget: int | None = None,
                    spill_dir: str | None = None, on_layer: OnLayer | None = None,
                    head: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """(b, logits of batches[b]) for every batch in order, computed layer-major (see `streamed_forward`), yielded
    one batch at a time: the head runs on a batch only when the caller asks for the next one, so only one batch's
    logits ever exist. The batches may differ in length (each is captured and run on its own). With `head=False`
    the layers run and nothing is yielded."""
    with HiddenBuffer(hidden_budget, spill_dir) as stream:
        _through_layers(dec, batches, stream, on_layer)
        if head:
            for b, ids in enumerate(batches):
                yield b, dec.finish(ids, stream.get(b))


@torch.inference_mode()
def streamed_forward(store: LayerStore | StreamedDecoder, input_ids: torch.Tensor, batch_size: int | None = None,
                     on_layer: OnLayer | None = None, hidden_budget: int | None = None,
                     spill_dir: str | None = None,
                     on_logits: Callable[[int, torch.Tensor], None] | None = None,
                     logits: bool = True) -> torch.Tensor | None:
    """Logits of `input_ids` [N, T] computed one layer at a time: every batch of `batch_size` blocks through layer
    i, then layer i + 1. The residual stream of all batches is held in a HiddenBuffer under `hidden_budget` bytes
    (None: unlimited; 0: every batch spilled to `spill_dir`).

    `on_layer(i, layer)` is called while layer i is resident, before its batches run (e.g. to hook it for
    statistics); a callable it returns is called after they ran (e.g. to remove the hooks). With `on_logits(b,
    logits)` each batch's logits go there and are not kept (all of them are N x T x vocab values: 0.4 GB for 8 x 256
    tokens of a 49k vocabulary), and None is returned; with `logits=False` the head is not run at all (None)."""
    dec = store if isinstance(store, StreamedDecoder) else StreamedDecoder(store)
    parts = streamed_logits(dec, _batches(input_ids, batch_size), hidden_budget, spill_dir, on_layer, head=logits)
    if not logits:
        for _ in parts:  # runs the layers; yields nothing
            pass
        return None
    if on_logits is None:
        return torch.cat([out for _, out in parts])
    for b, out in parts:
        on_logits(b, out)
    return None


@torch.inference_mode()
def streamed_greedy(dec: StreamedDecoder, prompts: Sequence[torch.Tensor], max_new_tokens: int, eos: int | None,
                    hidden_budget: int | None = None) -> list[torch.Tensor]:
    """Greedy continuations ([1, n <= max_new_tokens] each, ending at `eos` when it is emitted) of `prompts` ([1, T_i]
    each), without a KV cache: every new token is one streamed pass over the whole prefix of every prompt still
    going, all prompts together, so the layers are read max_new_tokens times in all, not once per prompt."""
    seqs = [p.clone() for p in prompts]
    live = [j for j, p in enumerate(prompts) if p.shape[1]]
    for _ in range(max_new_tokens):
        if not live:
            break
        for b, logits in streamed_logits(dec, [seqs[j] for j in live], hidden_budget):
            # float32 argmax, as transformers' greedy search takes it
            seqs[live[b]] = torch.cat([seqs[live[b]], logits[:, -1].float().argmax(-1, keepdim=True)], dim=1)
        live = [j for j in live if eos is None or int(seqs[j][0, -1]) != eos]
    return [s[:, p.shape[1]:] for s, p in zip(seqs, prompts)]


@torch.inference_mode()
def streamed_sample(dec: StreamedDecoder, start: int, n_blocks: int, block_size: int, seed: int, batch: int,
                    eos: Sequence[int] = (), on_batch: Callable[[int, int], None] | None = None,
                    every: int = 32) -> torch.Tensor:
    """[n_blocks, block_size] token ids sampled at temperature 1 from the document start `start`, never an `eos`
    id (every block runs its whole length), with a KV cache: each new token of a batch of sequences is one pass over
    the layers, each layer read from the store, run on the batch's newest tokens, extending its own entry of the
    cache. The draws are transformers' sampling search's (softmax of the float32 logits with the eos ids at -inf,
    one multinomial per step, seeded once), so the blocks are the ones `generate` samples in memory with
    min_new_tokens (minigpt.evalpass.InMemory.sample), while only one layer is ever resident. `on_batch(blocks
    done, tokens of the batch in progress)` is called every `every` tokens and after each batch: a 1.5B model on
    two CPU cores takes seconds per token."""
    from transformers import DynamicCache

    dec.capture(torch.full((1, 1), int(start)))  # learns what a layer returns without a cache (never with one)
    torch.manual_seed(seed)
    out = []
    for lo in range(0, n_blocks, batch):
        seqs = torch.full((min(batch, n_blocks - lo), 1), int(start), dtype=torch.long)
        cache = DynamicCache(config=dec.model.config)
        while seqs.shape[1] < block_size:
            cap = dec.capture(seqs[:, -1:], cache)
            hidden = cap.hidden
            for i in range(dec.num_layers):
                hidden = dec.run_layer(i, hidden, cap.calls)
            dec.release_layer()
            logits = dec.finish(seqs[:, -1:], hidden)[:, -1].float()
            logits[:, list(eos)] = -math.inf
            seqs = torch.cat([seqs, torch.multinomial(logits.softmax(-1), num_samples=1)], dim=1)
            if on_batch and seqs.shape[1] % every == 0 and seqs.shape[1] < block_size:
                on_batch(lo, seqs.shape[1])
        out.append(seqs)
        if on_batch:
            on_batch(lo + len(seqs), block_size)
    return torch.cat(out)


@torch.inference_mode()
def accumulate_streamed(dec: StreamedDecoder, blocks: torch.Tensor, batch_size: int, stats=None, spec=None,
                        hidden_budget: int | None = None, spill_dir: str | None = None):
    """minigpt.stats.accumulate, layer-streamed: the same statistics of `blocks` [N, T] added into `stats` (fresh
    ones for `spec` when None), with one decoder layer resident at a time.

    The statistics hooks (stats.collecting with `layer=i`) go on layer i while it is resident, writing into row i
    of every per-layer entry; the stand-in passes that capture arguments never see them, and the head is not run
    (no statistic needs it). Depth-span moments need every layer's output of a batch at once, which a layer-major
    pass does not have: ValueError (collect them with the in-memory path)."""
    if stats is None:
        spec = spec or S.StatSpec()
        stats = S.stats_for_model(dec.model, spec)
    elif spec is None:
        spec = S.spec_of(stats)
    if spec.depth_spans:
        raise ValueError("depth-span statistics need every layer's activations of a batch at once; they are not "
                         "collected layer by layer (use stats.accumulate on the whole model)")
    L = dec.num_layers
    per_layer = [k for k, shape in S.stat_shapes(dec.model, spec).items()
                 if len(shape) and shape[0] == L and k not in ("tokens", "token_counts")]

    def on_layer(i: int, _layer: nn.Module):
        rows = {**stats, **{k: stats[k][i:i + 1] for k in per_layer}}  # views: the hooks add into row i in place
        ctx = S.collecting(dec.model, rows, spec, layer=i)
        ctx.__enter__()
        return lambda: ctx.__exit__(None, None, None)

    streamed_forward(dec, blocks, batch_size, on_layer=on_layer, hidden_budget=hidden_budget, spill_dir=spill_dir,
                     logits=False)
    stats["tokens"] += blocks.numel()
    stats["token_counts"] += torch.bincount(blocks.reshape(-1), minlength=stats["token_counts"].numel()
                                            ).to(torch.float64)
    return stats


__all__ = ["Captured", "StreamedDecoder", "accumulate_streamed", "pin_mmap_threshold", "resident_parameters",
           "streamed_forward", "streamed_greedy", "streamed_logits", "streamed_sample"]
