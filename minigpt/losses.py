"""The pure maths of training and scoring a language model: the LR schedule and data order, next-token NLL,
top-k distillation KL, bits per byte, and the early-stopping rule. Plain torch functions of tensors and numbers (no
Ray, no DeepSpeed), one implementation each: recovery (minigpt.training), the teacher pass (minigpt.teacher), the
allocation's measured loss (minigpt.allocate) and the held-out metrics (minigpt.metrics) all call these.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never 0: a zero-LR first step would be wasted
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(n_blocks: int, step: int, micro: int, rank: int, world: int, micro_batch: int,
                  grad_accum: int, seed: int) -> list[int]:
    """Block indices of one micro batch of one worker.

    The global stream of blocks is a seeded permutation per epoch; optimizer step `step`, micro step `micro` and
    worker `rank` own a fixed slice of it. It depends on nothing but its arguments, so a resumed run sees exactly
    the batches the uninterrupted run would have, and workers never overlap within a step. Step `step` covers
    stream positions [step * G, (step + 1) * G), G = micro_batch x grad_accum x world, however G is split: one
    worker accumulating two micro batches trains on the same blocks as two workers of one micro batch each.
    """
    out = []
    start = ((step * grad_accum + micro) * world + rank) * micro_batch
    for g in range(start, start + micro_batch):
        epoch, pos = divmod(g, n_blocks)
        out.append(int(_epoch_permutation(n_blocks, seed, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=gen)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Next-token NLL in nats (float32) of predicting token t+1 from positions <= t: logits [B, S, V] of `input_ids`
    [B, S]; per predicted position ([B * (S - 1)]) or reduced ("mean", "sum")."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    return token_nll(logits, input_ids, "mean")


def topk_distill_loss(student_logits: torch.Tensor, rows: torch.Tensor, teacher_logprobs: torch.Tensor,
                      input_ids: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL(q || p) + (1 - alpha) * CE(student, next token), KL averaged per predicted token.

    `teacher_logprobs` [B, S, k] are the teacher's log-probabilities AT temperature T of its top-k tokens (cached by
    minigpt.teacher), at student rows `rows` [B, S, k] (-1: a token the student's pruned vocabulary lacks). Both
    distributions are coarse-grained to the same k + 1 outcomes: each cached token, and one bucket for everything
    else (the teacher's tail, 1 - its top-k mass; the student's mass outside those rows). This KL is exact when k
    covers the vocabulary and zero when the student equals the teacher, for any k; renormalising q over the top k
    instead would ask the student to squeeze the teacher's whole tail into k tokens. Tokens the student cannot emit
    are conditioned away: q is renormalised over the tokens it has (the uncached tail counted as emittable).
    """
    logp = torch.log_softmax(student_logits[:, :-1].flatten(0, 1).float() / temperature, dim=-1)
    rows = rows[:, :-1].flatten(0, 1).long()
    present = rows >= 0
    q = teacher_logprobs[:, :-1].flatten(0, 1).double().exp()
    absent_mass = q.masked_fill(present, 0.0).sum(-1, keepdim=True)
    q = q.masked_fill(~present, 0.0) / (1.0 - absent_mass).clamp_min(1e-6)
    logp_at = logp.gather(-1, rows.clamp_min(0)).double()
    p_at = logp_at.exp().masked_fill(~present, 0.0)
    head = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - logp_at), torch.zeros_like(q)).sum(-1)
    q_tail = (1.0 - q.sum(-1)).clamp_min(0.0)
    p_tail = (1.0 - p_at.sum(-1)).clamp_min(1e-12)
    tail = torch.where(q_tail > 0, q_tail * (q_tail.clamp_min(1e-300).log() - p_tail.log()), torch.zeros_like(q_tail))
    kl = (head + tail).mean().float()
    ce = next_token_loss(student_logits, input_ids)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def student_rows(teacher_ids: torch.Tensor, token_ids: tuple[int, ...] | None) -> torch.Tensor:
    """Teacher vocabulary ids -> student rows (int32, -1 where the student's pruned vocabulary lacks the token)."""
    if token_ids is None:
        return teacher_ids.to(torch.int32)
    size = max(int(teacher_ids.max()) + 1 if teacher_ids.numel() else 0, max(token_ids) + 1)
    inverse = torch.full((size,), -1, dtype=torch.int32)
    inverse[torch.tensor(token_ids, dtype=torch.long)] = torch.arange(len(token_ids), dtype=torch.int32)
    return inverse[teacher_ids.long()]


@torch.no_grad()
def validation_nll(module: torch.nn.Module, blocks: torch.Tensor, rank: int, world: int, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """This rank's share (blocks rank, rank + world, ...) of the summed next-token NLL in nats, float64."""
    was_training = module.training
    module.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    mine = blocks[rank::world]
    for lo in range(0, len(mine), batch_size):
        x = mine[lo:lo + batch_size].to(device)
        total += token_nll(module(input_ids=x, use_cache=False).logits, x, "sum").double()
    module.train(was_training)
    return total


def stop_early(history: list[dict[str, float]], patience: int) -> bool:
    """True when the last `patience` scores came after the best one (0: never)."""
    if not patience or not history:
        return False
    best = min(range(len(history)), key=lambda i: history[i]["valid_bpb"])
    return len(history) - 1 - best >= patience


def bits_per_byte(nll_nats, n_bytes):
    """Summed NLL in nats over the UTF-8 bytes of the text it covers, in bits per byte; nan without bytes. Numbers or
    numpy arrays (a bootstrap's resampled sums)."""
    if np.ndim(n_bytes) == 0 and not n_bytes:
        return float("nan")
    return nll_nats / (n_bytes * LN2)
