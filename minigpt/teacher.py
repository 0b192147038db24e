"""The dense model's targets for recovery, computed once per domain before any expert trains.

Distillation needs the teacher's next-token distribution on every training block. Keeping the dense model resident
next to every student (and running it on every step of every epoch) doubles recovery's memory and nearly doubles
its compute, so one pass of Ray tasks computes the teacher's top-k log-probabilities on the domain's training blocks
(the expert's own blocks, mapped to the teacher's vocabulary when the expert's was pruned) and writes them to one
file; trainers read that file and never load a teacher (minigpt.training.topk_distill_loss).

The same pass scores the dense model on the domain's validation split in bits per byte: the reference line of the
recovery curve, in a unit that does not depend on the tokenizer (a vocabulary-pruned expert tokenizes the same
text into more tokens).

The file (`targets.safetensors`): `ids` int32 [n_blocks, block_size, k] teacher vocabulary ids, best first, and
`logprobs` float16 [n_blocks, block_size, k] (both only in distill mode; log-softmax of logits / T at the job's
recover.distill_temperature T), with metadata: `k`, `temperature`, `digest` (sha256 of the training blocks, so a
trainer can refuse targets of other blocks), `dense_valid_bpb`, `valid_bytes`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

TARGETS = "targets.safetensors"


@dataclass(frozen=True)
class TeacherTargets:
    digest: str  # of the training blocks the targets were computed on (blocks_digest)
    k: int  # 0 when no log-probabilities were cached (not distilling)
    temperature: float  # the softmax temperature the log-probabilities were taken at
    dense_valid_bpb: float | None  # the dense model on the validation split; None without one
    valid_bytes: int
    ids: torch.Tensor | None = None  # int32 [n_blocks, block_size, k], teacher vocabulary
    logprobs: torch.Tensor | None = None  # float16 [n_blocks, block_size, k]


def blocks_digest(blocks: torch.Tensor) -> str:
    """Identity of a block tensor (shape and ids), independent of its integer dtype."""
    arr = np.ascontiguousarray(blocks.numpy().astype(np.int64))
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ pure maths


@torch.no_grad()
def topk_logprobs(model: torch.nn.Module, blocks: torch.Tensor, k: int, batch_size: int,
                  device: str | torch.device = "cpu", temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's k most likely next tokens at every position and their log-probabilities under the full softmax
    of logits / temperature (what distillation at that temperature compares against)."""
    ids, logps = [], []
    for lo in range(0, len(blocks), batch_size):
        logits = model(input_ids=blocks[lo:lo + batch_size].to(device), use_cache=False).logits.float()
        top = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        ids.append(top.indices.to("cpu", torch.int32))
        logps.append(top.values.to("cpu", torch.float16))
    return torch.cat(ids), torch.cat(logps)


def nll_sum(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int,
            device: str | torch.device = "cpu") -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats, float64) over the blocks, and the tokens predicted: the
    same sum the trainers score their validation with (minigpt.training.validation_nll), on one process."""
    from minigpt.training import validation_nll

    total = validation_nll(model, blocks, 0, 1, batch_size, torch.device(device)).item()
    return total, len(blocks) * max(0, blocks.shape[1] - 1)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


# ------------------------------------------------------------------------------------------------ Ray tasks


@ray.remote
def _teacher_task(model_dir: str, dtype: str, trust_remote_code: bool, blocks: np.ndarray, k: int,
                  batch_size: int, threads: int, nll_only: bool, temperature: float = 1.0) -> tuple:
    from minigpt.models import load_model

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, dtype, trust_remote_code).to(device)
    x = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
    if nll_only:
        return nll_sum(model, x, batch_size, device)
    return tuple(t.numpy() for t in topk_logprobs(model, x, k, batch_size, device, temperature))


def compute_targets(model_dir: Path | str, train_blocks: torch.Tensor, valid_blocks: torch.Tensor,
                    valid_bytes: int, *, digest: str, k: int, temperature: float = 1.0, dtype: str = "float32", trust_remote_code: bool = False,
                    batch_size: int = 4, workers: int = 1, cpus_per_worker: float = 1.0,
                    gpus_per_worker: float = 0.0, label: str = "") -> TeacherTargets:
    """Run the dense model once: top-k on the training blocks (k > 0) over `workers` Ray tasks, each holding a
    contiguous slice (concatenated back in order), and bits per byte on the validation blocks.

    `train_blocks` and `valid_blocks` are in the TEACHER's vocabulary; `digest` is blocks_digest of the training
    blocks as the trainer will read them (the student's vocabulary).
    """
    opts = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
    common = (str(model_dir), dtype, trust_remote_code)
    threads = max(1, round(cpus_per_worker))
    pending = []
    if k > 0 and len(train_blocks):
        for part in torch.tensor_split(train_blocks, min(workers, len(train_blocks))):
            pending.append(_teacher_task.options(**opts).remote(*common, part.numpy(), k, batch_size, threads, False,
                                                                temperature))
    valid_ref = (_teacher_task.options(**opts).remote(*common, valid_blocks.numpy(), 0, batch_size, threads, True)
                 if len(valid_blocks) else None)
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


# ------------------------------------------------------------------------------------------------ the file


def save_targets(path: Path | str, t: TeacherTargets) -> None:
    from minigpt.io import atomic_save_np

    arrays = {} if t.ids is None else {"ids": t.ids.numpy(), "logprobs": t.logprobs.numpy()}
    meta = {"digest": t.digest, "k": str(t.k), "temperature": repr(t.temperature), "valid_bytes": str(t.valid_bytes),
            "dense_valid_bpb": "" if t.dense_valid_bpb is None else repr(t.dense_valid_bpb)}
    atomic_save_np(arrays, path, metadata=meta)


def load_targets(path: Path | str, with_tensors: bool = True) -> TeacherTargets:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()} if with_tensors else {}
    bpb = meta.get("dense_valid_bpb", "")
    return TeacherTargets(digest=meta["digest"], k=int(meta["k"]), temperature=float(meta.get("temperature", 1.0)),
                          dense_valid_bpb=float(bpb) if bpb else None,
                          valid_bytes=int(meta.get("valid_bytes", 0)), ids=tensors.get("ids"),
                          logprobs=tensors.get("logprobs"))
