"""Predict a worker's memory from the model's config alone, before any weight is read.

Where a job places its workers (how many per node, streamed or whole-model) must be decided before a model loads:
a 7B model in fp32 is 28 GB, more than many nodes give a worker. `model_sizes` counts the parameters of the
embedding, of one decoder layer and of the head from the model's skeleton on the meta device (exact for every
architecture, tied embeddings counted once, no weight read); `predict_memory` turns them into bytes for a dtype, a
batch shape and a hidden-state budget. It is a pure function: the terms are documented on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minigpt.archs import arch_of, widths


BASE_BYTES = 300 * 2**20  # a worker process before any model: interpreter, torch, transformers, Ray (measured ~0.25 GB)


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a model's parts and the widths its activations are made of."""

    embed_params: int  # embeddings outside the layers (token, and GPT-2's position embedding)
    layer_params: int  # one decoder layer (every layer of a supported model has the same)
    head_params: int  # final norm and lm_head (no lm_head when it is tied to the embedding)
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def total_params(self) -> int:
        return self.embed_params + self.num_layers * self.layer_params + self.head_params


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (what the kernel measured: every byte it ever held).

    Linux: the high-water mark of this process's own address space (VmHWM). Not getrusage's ru_maxrss: the kernel
    carries that across exec from the address space it replaced, so a subprocess started from a 1 GB parent
    (Python's subprocess uses vfork) reports the parent's 1 GB however little it holds itself (measured). Elsewhere,
    ru_maxrss."""
    try:
        return status_mib("VmHWM")
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def status_mib(key: str) -> float:
    """One memory line of /proc/self/status (VmRSS, VmHWM, ...) in MiB; OSError off Linux, KeyError if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def report_peaks(what: str, peaks: list[float]) -> str:
    """One line of measured peaks (MiB) of a stage's processes."""
    return f"[memory] {what}: peak RSS {', '.join(f'{p:.0f}' for p in sorted(peaks))} MiB"


def model_sizes(config) -> ModelSizes:
    """ModelSizes of a transformers config (or a model: its config), from its skeleton on the meta device."""
    from transformers import AutoModelForCausalLM

    config = getattr(config, "config", config)
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(config)
    root = arch_of(config).layers + "."
    embed_modules = {m for m, mod in skel.named_modules() if isinstance(mod, nn.Embedding) and not m.startswith(root)}
    parts = {"embed": 0, "layer0": 0, "head": 0}
    for name, p in skel.named_parameters():  # a tied lm_head is the embedding's parameter: listed once, under it
        module = name.rsplit(".", 1)[0]
        if name.startswith(root):
            if name.startswith(f"{root}0."):
                parts["layer0"] += p.numel()
        else:
            parts["embed" if module in embed_modules else "head"] += p.numel()
    w = widths(config)
    return ModelSizes(parts["embed"], parts["layer0"], parts["head"], w["layers"], w["hidden"], w["intermediate"],
                      w["heads"], w["kv_heads"], w["head_dim"], w["vocab"])


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each term of `predict_memory` and the two peaks built from them."""

    embed_bytes: int
    layer_bytes: int
    head_bytes: int
    all_layers_bytes: int
    hidden_bytes: int
    activation_bytes: int
    base_bytes: int
    streamed_peak: int
    whole_peak: int
    gram_bytes: int = 0  # one layer's second moments as a sequential runner sends them (see runner_peak)
    runner_peak: int = 0


def dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty(0, dtype=dtype).element_size()


def activation_bytes(s: ModelSizes, batch: int, seq: int, nbytes: int, head: bool = True) -> int:
    """Working set of one inference forward step on `batch` x `seq` tokens, an upper bound (eager attention):

    * a decoder layer: its input and output (2 N D), plus the larger of its attention half - normed input (N D),
      q, k, v and their rotated copies (2 N (H + 2G) hd), k and v repeated to every query head (2 N H hd), the
      attention output (N H hd), the scores and their softmax (2 B H T^2), the mask (B T^2) - and its MLP half -
      normed input (N D), gate, up and their product (3 N I);
    * the head: the final norm's output (N D) and the logits (N V).
    They never live at once (inference frees each step's intermediates), so the working set is the larger."""
    n = batch * seq
    attn = n * s.hidden + 2 * n * (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * n * s.heads * s.head_dim \
        + 2 * batch * s.heads * seq * seq + batch * seq * seq
    mlp = n * s.hidden + 3 * n * s.intermediate
    layer = 2 * n * s.hidden + max(attn, mlp)
    logits = n * s.hidden + n * s.vocab if head else 0  # a sequential runner never runs the head
    return max(layer, logits) * nbytes


def predict_memory(s: ModelSizes, dtype: torch.dtype | str = torch.float32, batch: int = 1, seq: int = 2048,
                   tokens: int = 0, hidden_budget: int | None = None, base_bytes: int = 0) -> MemoryEstimate:
    """Peak bytes of a streamed worker and of a whole-model process (minigpt.streamed, minigpt.sequential).

    * embed / layer / head: parameters x bytes per element of `dtype` (the head without a tied lm_head);
    * hidden: the residual stream a worker holds between layers for its share of `tokens` calibration tokens
      (tokens x hidden x bytes), capped by `hidden_budget` (the rest is spilled to disk: minigpt.hidden); 0 for a
      plain forward, which holds no stream between batches;
    * activations: `activation_bytes` for one batch of `batch` x `seq` tokens;
    * base: what the process holds before any model (interpreter, torch, transformers: ~0.2-0.3 GB on CPU).

    streamed peak = embed + head + ONE layer + hidden + activations + base
    whole peak    = embed + head + EVERY layer + hidden + activations + base
    runner peak   = max(embed + head + hidden, 2 layers + 3 x hidden + kept + layer activations + 3 x Gram) + base
                    (a sequential runner, which drops the embedding and head once its batches are captured; the
                    terms are spelled out where it is computed)
    Captured call arguments (masks, rotary tables per batch) and a spilled entry read back (one batch) are small
    beside these and not counted; outputs a caller keeps (logits of every batch) are the caller's."""
    b = dtype_bytes(dtype)
    embed, layer, head = s.embed_params * b, s.layer_params * b, s.head_params * b
    held = tokens * s.hidden * b
    hidden = held if hidden_budget is None else min(held, hidden_budget)
    act = activation_bytes(s, batch, seq, b)
    shared = embed + head + hidden + act + base_bytes
    # A sequential runner (minigpt.runner) runs no head (nor, after capturing, the embedding) but holds, per layer:
    # the layer read and its changed copy; its share's stream, the dense stream and the next dense stream (the
    # stream target), and each batch's MLP output, input and layer output for reuse (intermediate + 2 hidden values
    # per token), each under the budget;
    # and the layer's fp64 Gram matrices (MLP input I x I, attention output input Q x Q, the drift D x max(I, Q)):
    # the running total, the group being summed and the copy Ray serialises.
    q = s.heads * s.head_dim
    gram = (s.intermediate ** 2 + q * q + s.hidden * max(s.intermediate, q)) * 8
    kept = tokens * (s.intermediate + 2 * s.hidden) * b
    kept = kept if hidden_budget is None else min(kept, hidden_budget)
    # The embedding and head only while the runner captures its batches (it releases them before any layer runs).
    layers = 2 * layer + 3 * hidden + kept + activation_bytes(s, batch, seq, b, head=False) + 3 * gram
    runner = max(embed + head + hidden, layers) + base_bytes
    return MemoryEstimate(embed, layer, head, s.num_layers * layer, hidden, act, base_bytes,
                          streamed_peak=shared + layer, whole_peak=shared + s.num_layers * layer, gram_bytes=gram,
                          runner_peak=runner)


def lora_params(config, targets: tuple[str, ...], rank: int) -> int:
    """Parameters of LoRA adapters of `rank` on every linear layer whose name ends with one of `targets` (what peft
    wraps): rank x (inputs + outputs) each, counted on the model's skeleton on the meta device."""
    from transformers import AutoModelForCausalLM

    config = getattr(config, "config", config)
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(config)
    total = 0
    for name, m in skel.named_modules():
        w = getattr(m, "weight", None)
        if name.rsplit(".", 1)[-1] in targets and isinstance(w, torch.Tensor) and w.dim() == 2:
            total += rank * (w.shape[0] + w.shape[1])  # nn.Linear [out, in] or GPT-2's Conv1D [in, out]
    return total


@dataclass(frozen=True)
class RecoveryEstimate:
    """Bytes of each term of `predict_recovery` and their sum, the peak of one recovery worker."""

    weights: int
    gathered: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    base: int

    @property
    def peak(self) -> int:
        return (self.weights + self.gathered + self.gradients + self.optimizer + self.activations + self.logits
                + self.base)

    def describe(self) -> str:
        gib = 2**30
        return ", ".join(f"{k} {v / gib:.2f}" for k, v in (
            ("weights", self.weights + self.gathered), ("gradients", self.gradients), ("optimizer", self.optimizer),
            ("activations", self.activations), ("logits", self.logits))) + " GiB"


def predict_recovery(s: ModelSizes, *, trainable: int, batch: int, seq: int, zero_stage: int, world: int,
                     gradient_checkpointing: bool, distill: bool, live: int = 10**9, prefetch: int = 0,
                     vocab_block: int = 0, base_bytes: int = BASE_BYTES) -> RecoveryEstimate:
    """Peak bytes of one recovery worker (minigpt.training: fp32 weights, AdamW, DeepSpeed ZeRO `zero_stage` over
    `world` workers) training `trainable` parameters (all of them, or LoRA's) of a model of sizes `s`:

    * weights: every parameter, 1 / world of them under ZeRO-3, which gathers a module's parameters while it runs
      (`gathered`: the largest module twice, measured: a gather holds its flat buffer beside the parameter it
      fills; the embedding or head on a large vocabulary unless they are held as blocks of at most `vocab_block`
      parameters, minigpt.vocabsplit), keeps gathered ones it will reuse soon up to `live` elements
      (stage3_max_live_parameters / max_reuse_distance; at most the other ranks' share) and fetches the next
      `prefetch` elements ahead;
    * gradients of the trainable parameters (whole, and reduced into a partition from ZeRO-2 on), and AdamW's two
      moments plus DeepSpeed's flat fp32 copy of the partition it updates (partitioned from ZeRO-1 on; offloading
      moves them to CPU memory, which on a CPU worker is the same memory);
    * activations kept for the backward pass: each layer's intermediates of a batch x seq step (`activation_bytes`'
      attention and MLP terms together), or with gradient checkpointing each layer's input plus one layer's
      intermediates while it is recomputed;
    * logits: batch x seq x vocab values, five copies (the logits, the loss's copy, its log-softmax, and the
      gradients of both), six when distilling (the tempered copy), one more from a split head (its blocks' logits
      beside their concatenation).
    Measured peaks of the demos' experts (ZeRO-2, one worker): SmolLM2-135M's (distill, 4 x 256) 5.40 GiB
    against 5.42 predicted, and 4.22 since trainer workers pin glibc's mmap threshold (the prediction is then 28%
    high); Gemma-3-270M's (full, 2 x 256) 9.19 against 8.74 (unpinned). Qwen2.5-Coder-1.5B's (LoRA, ZeRO-3 over
    two workers, 1 x 256, checkpointing; unpinned) 7.8 and 8.1 against 6.3 with the vocabulary gathered whole;
    over three workers with it in 14 blocks (pinned), 3.8 against 4.0 in the job and, outside Ray on two workers
    (benchmarks/zero3_memory.py), 4.5 against 5.0 (whole: 6.0 against 6.3)."""
    b = 4  # training runs in fp32
    params = s.total_params
    shard = world if zero_stage == 3 else 1
    weights = params * b // shard
    others = params - params // world
    split = bool(vocab_block) and zero_stage == 3
    vocab_module = max(s.embed_params, s.head_params)
    if split:
        vocab_module = min(vocab_module, vocab_block)
    gathered = (2 * max(s.layer_params, vocab_module) + min(live, others) + prefetch) * b \
        if zero_stage == 3 and world > 1 else 0
    # ZeRO-1/2 keep the full .grad tensors until they are reduced into the partition's flat buffer; ZeRO-3 reduces
    # and partitions each gradient as the backward pass produces it.
    gradients = trainable * b // world if zero_stage == 3 else \
        trainable * b + (trainable * b // (world if zero_stage == 2 else 1) if zero_stage else 0)
    optimizer = (3 if zero_stage >= 1 else 2) * trainable * b // (world if zero_stage >= 1 else 1)
    n = batch * seq
    attn = n * s.hidden + 2 * n * (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * n * s.heads * s.head_dim \
        + 2 * batch * s.heads * seq * seq + batch * seq * seq
    per_layer = (2 * n * s.hidden + attn + n * s.hidden + 3 * n * s.intermediate) * b
    acts = (s.num_layers * n * s.hidden * b + per_layer) if gradient_checkpointing else s.num_layers * per_layer
    logits = ((6 if distill else 5) + split) * n * s.vocab * b
    return RecoveryEstimate(weights, gathered, gradients, optimizer, acts, logits, base_bytes)


__all__ = ["BASE_BYTES", "MemoryEstimate", "ModelSizes", "RecoveryEstimate", "activation_bytes", "dtype_bytes",
           "lora_params", "model_sizes", "peak_rss_mib", "predict_memory", "predict_recovery", "report_peaks",
           "status_mib"]
