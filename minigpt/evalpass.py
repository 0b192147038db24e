"""The forward passes evaluation and the teacher score with: a model in memory, or layer-streamed from its folder.

Held-out quality (minigpt.metrics.lm_metrics), the teacher's top-k targets (minigpt.targets.topk_logprobs), the
dense validation reference (`nll_sum`) and the report's samples need the same thing from a model: the logits of a
set of blocks, one batch at a time, in order, a greedy continuation, and (the job's general text) sampled blocks.
`InMemory` does that with a loaded model;
`Streamed` with a minigpt.streamed.StreamedDecoder, which holds the embedding, the head and one decoder layer: all
blocks go through layer 0, then layer 1 (their residual stream in a HiddenBuffer under a byte budget, spilled to a
memory-mapped file beyond it), and the head then runs batch by batch, so only one batch's logits ever exist. The
callers reduce each batch's logits as it comes (per-token NLL, top-k) with the one implementation in
minigpt.losses, so both paths compute the same figures from the same code.

Which path runs is decided where the model is loaded (`open_forward`): streamed when the caller asks for it (the
stages do where calibrate.worker_memory_gb limits a worker: CalibrateConfig.streams_whole_model_stages) and the
model runs on the CPU; a GPU holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from minigpt.layerstore import LayerStore
from minigpt.losses import token_nll
from minigpt.models import DTYPE_MAP, load_model
from minigpt.streamed import StreamedDecoder, streamed_greedy, streamed_logits, streamed_sample

Batches = Iterator[tuple[int, torch.Tensor]]  # (index of the batch's first block, its logits [b, T, V])


class InMemory:
    """A loaded model: each batch moved to the model's device and run through its own forward."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def batches(self, blocks: torch.Tensor, batch_size: int) -> Batches:
        for lo in range(0, len(blocks), batch_size):
            yield lo, self.model(input_ids=blocks[lo:lo + batch_size].to(self.device), use_cache=False).logits

    @torch.inference_mode()
    def greedy(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, eos: int | None) -> list[torch.Tensor]:
        """transformers' greedy search (with its KV cache), one prompt ([1, T]) at a time."""
        from transformers import GenerationConfig

        cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                               pad_token_id=eos if eos is not None else 0)
        out = []
        for ids in prompts:
            ids = ids.to(self.device)
            gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            out.append(gen[:, ids.shape[1]:].cpu())
        return out

    @torch.no_grad()  # not inference_mode: the blocks may feed a backward pass later (taylor sums)
    def sample(self, start: int, n_blocks: int, block_size: int, seed: int, batch: int,
               on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """[n_blocks, block_size] ids from `start` (`on_batch(blocks done, block_size)` after each batch), sampled
        at temperature 1 by transformers' `generate` (no top-k / top-p: the model's own distribution, but never its
        end of text: min_new_tokens holds every eos id of its generation config back), seeded once, `batch`
        sequences at a time."""
        from transformers import GenerationConfig

        gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=block_size - 1,
                               min_new_tokens=block_size - 1, pad_token_id=int(start),
                               eos_token_id=eos_ids(self.model.generation_config) or None)
        torch.manual_seed(seed)
        out = []
        for lo in range(0, n_blocks, batch):
            x = torch.full((min(batch, n_blocks - lo), 1), int(start), dtype=torch.long, device=self.device)
            out.append(self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen).cpu())
            if on_batch:
                on_batch(lo + len(out[-1]), block_size)
        return torch.cat(out)[:, :block_size]


class Streamed:
    """A StreamedDecoder: every pass reads each decoder layer once (see the module docstring); the residual stream
    of the pass's blocks stays in memory up to `hidden_budget` bytes (None: unlimited) and spills beyond it."""

    device = torch.device("cpu")

    def __init__(self, dec: StreamedDecoder, hidden_budget: int | None = None, spill_dir: str | None = None):
        self.dec = dec
        self.hidden_budget = hidden_budget
        self.spill_dir = spill_dir
        self.model = dec.model  # the skeleton: config and parameter shapes, embedding and head resident

    def batches(self, blocks: torch.Tensor, batch_size: int) -> Batches:
        parts = [blocks[lo:lo + batch_size] for lo in range(0, len(blocks), batch_size)]
        for b, logits in streamed_logits(self.dec, parts, self.hidden_budget, self.spill_dir):
            yield b * batch_size, logits

    def greedy(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, eos: int | None) -> list[torch.Tensor]:
        """Every prompt in one streamed pass per new token (minigpt.streamed.streamed_greedy)."""
        return streamed_greedy(self.dec, prompts, max_new_tokens, eos, self.hidden_budget)

    def sample(self, start: int, n_blocks: int, block_size: int, seed: int, batch: int,
               on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The blocks `InMemory.sample` draws (`on_batch` also every 32 tokens of a batch), with a KV cache and one
        layer resident (streamed_sample); the eos ids held back are those of the folder's generation config, as
        from_pretrained reads it."""
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(self.dec.store.folder)
        except OSError:  # no generation_config.json: from_pretrained derives one from the model's config
            gen = GenerationConfig.from_model_config(self.model.config)
        return streamed_sample(self.dec, start, n_blocks, block_size, seed, batch, eos_ids(gen), on_batch)



Forward = InMemory | Streamed


def eos_ids(gen) -> list[int]:
    """The end-of-text ids of a generation config (none, one, or a list)."""
    eos = gen.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def as_forward(model: nn.Module | Forward) -> Forward:
    """A Forward as given, or a loaded model wrapped in one (what the metrics' callers have always passed)."""
    return model if isinstance(model, InMemory | Streamed) else InMemory(model)


def streams(streamed: bool, on_gpu: bool) -> bool:
    """Whether a model is run layer-streamed: asked for, and the model not on a GPU (the rule of calibration
    workers and sequential runners: a GPU worker holds the whole model on its device)."""
    return streamed and not on_gpu


def open_forward(folder: Path | str, dtype: str = "float32", trust_remote_code: bool = False, *,
                 streamed: bool = False, device: str | torch.device = "cpu",
                 hidden_budget: int | None = None) -> Forward:
    """The model of an HF folder as a Forward: streamed from its checkpoint (`streamed`, CPU only), or loaded whole
    onto `device`. A vocabulary-pruned expert is an ordinary folder with a smaller vocabulary: both read it alike."""
    if streamed:
        if torch.device(device).type != "cpu":
            raise ValueError("a streamed forward runs on the CPU")
        return Streamed(StreamedDecoder(LayerStore(folder, dtype=DTYPE_MAP[dtype],
                                                   trust_remote_code=trust_remote_code)), hidden_budget)
    return InMemory(load_model(folder, dtype, trust_remote_code).to(device))


def nll_sum(model: nn.Module | Forward, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) over `blocks` [N, T], and the tokens predicted (N * (T - 1)): the sum
    the trainers score their validation with (minigpt.losses.validation_nll)."""
    total = torch.zeros((), dtype=torch.float64)
    for lo, logits in as_forward(model).batches(blocks, batch_size):
        x = blocks[lo:lo + len(logits)].to(logits.device)
        total += token_nll(logits, x, "sum").double().cpu()
    return total.item(), len(blocks) * max(0, blocks.shape[1] - 1)


__all__ = ["Forward", "InMemory", "Streamed", "as_forward", "nll_sum", "open_forward", "streams"]
