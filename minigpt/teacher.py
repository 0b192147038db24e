"""The dense model's targets for recovery, computed once per domain before any expert trains.

Distillation needs the teacher's next-token distribution on every training block. Keeping the dense model resident
next to every student (and running it on every step of every epoch) doubles recovery's memory and nearly doubles
its compute, so one pass of Ray tasks computes the teacher's top-k log-probabilities on the domain's training blocks
(the expert's own blocks, mapped to the teacher's vocabulary when the expert's was pruned) and writes them to one
file; trainers read that file and never load a teacher (minigpt.losses.topk_distill_loss).

The same pass scores the dense model on the domain's validation split in bits per byte: the reference line of the
recovery curve, in a unit that does not depend on the tokenizer (a vocabulary-pruned expert tokenizes the same
text into more tokens).

Streamed (what stages.teacher asks for under calibrate.worker_memory_gb, on a CPU), no task holds the dense model:
each reads it one decoder layer at a time and runs its whole slice of blocks through a layer before the next
(minigpt.evalpass.Streamed); a GPU task loads it whole.

The file and the pure maths are minigpt.targets (re-exported here); this module is the Ray pass that fills it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from minigpt.evalpass import nll_sum, open_forward, streams
from minigpt.losses import bits_per_byte
from minigpt.targets import (TARGETS, TeacherTargets, blocks_digest, load_targets, save_targets,  # noqa: F401
                             topk_logprobs)

# ------------------------------------------------------------------------------------------------ Ray tasks


@ray.remote
def _teacher_task(model_dir: str, dtype: str, trust_remote_code: bool, blocks: np.ndarray, k: int,
                  batch_size: int, threads: int, nll_only: bool, temperature: float = 1.0, streamed: bool = False,
                  hidden_budget: int | None = None) -> tuple:
    torch.set_num_threads(max(1, threads))
    gpu = torch.cuda.is_available()
    # Streamed on the CPU: the task holds one decoder layer, not the dense model.
    model = open_forward(model_dir, dtype, trust_remote_code, streamed=streams(streamed, gpu),
                         device="cuda" if gpu else "cpu", hidden_budget=hidden_budget)
    x = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
    if nll_only:
        return nll_sum(model, x, batch_size)
    return tuple(t.numpy() for t in topk_logprobs(model, x, k, batch_size, temperature))


def compute_targets(model_dir: Path | str, train_blocks: torch.Tensor, valid_blocks: torch.Tensor,
                    valid_bytes: int, *, digest: str, k: int, temperature: float = 1.0, dtype: str = "float32", trust_remote_code: bool = False,
                    batch_size: int = 4, workers: int = 1, cpus_per_worker: float = 1.0,
                    gpus_per_worker: float = 0.0, label: str = "", streamed: bool = False,
                    hidden_budget: int | None = None) -> TeacherTargets:
    """Run the dense model once: top-k on the training blocks (k > 0) over `workers` Ray tasks, each holding a
    contiguous slice (concatenated back in order), and bits per byte on the validation blocks. With `streamed`, a
    task on the CPU reads the model one decoder layer at a time (minigpt.evalpass.Streamed), its slice's residual
    stream in memory up to `hidden_budget` bytes.

    `train_blocks` and `valid_blocks` are in the TEACHER's vocabulary; `digest` is blocks_digest of the training
    blocks as the trainer will read them (the student's vocabulary).
    """
    opts = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
    common = (str(model_dir), dtype, trust_remote_code)
    threads = max(1, round(cpus_per_worker))
    stream = {"streamed": streamed, "hidden_budget": hidden_budget}
    pending = []
    if k > 0 and len(train_blocks):
        for part in torch.tensor_split(train_blocks, min(workers, len(train_blocks))):
            pending.append(_teacher_task.options(**opts).remote(*common, part.numpy(), k, batch_size, threads, False,
                                                                temperature, **stream))
    valid_ref = (_teacher_task.options(**opts).remote(*common, valid_blocks.numpy(), 0, batch_size, threads, True,
                                                      **stream) if len(valid_blocks) else None)
    parts = ray.get(pending)
    ids = torch.from_numpy(np.concatenate([p[0] for p in parts])) if parts else None
    logprobs = torch.from_numpy(np.concatenate([p[1] for p in parts])) if parts else None
    dense_bpb = None
    if valid_ref is not None:
        nll, _ = ray.get(valid_ref)
        dense_bpb = bits_per_byte(nll, valid_bytes)
    tokens = train_blocks.numel() if k > 0 else 0
    print(f"[teacher] {label}: top-{k} targets on {tokens:,} training tokens" if tokens else f"[teacher] {label}:",
          f"dense validation {dense_bpb:.4f} bits/byte" if dense_bpb is not None else "no validation split",
          flush=True)
    return TeacherTargets(digest=digest, k=k if ids is not None else 0, temperature=temperature,
                          dense_valid_bpb=dense_bpb, valid_bytes=int(valid_bytes), ids=ids, logprobs=logprobs)
