"""The dense model's targets for recovery, as data: the top-k log-probabilities of a model on token blocks (pure
torch) and the file they are kept in. minigpt.teacher computes them on Ray; the trainers read them
(minigpt.trainset) and never load a teacher.

The file (`targets.safetensors`): `ids` int32 [n_blocks, block_size, k] teacher vocabulary ids, best first, and
`logprobs` float16 [n_blocks, block_size, k] (both only in distill mode; log-softmax of logits / T at the job's
recover.distill_temperature T), with metadata: `k`, `temperature`, `digest` (sha256 of the training blocks, so a
trainer can refuse targets of other blocks), `dense_valid_bpb`, `valid_bytes`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from minigpt.evalpass import Forward, as_forward
from minigpt.io import atomic_save_np

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


@torch.no_grad()
def topk_logprobs(model: torch.nn.Module | Forward, blocks: torch.Tensor, k: int, batch_size: int,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's k most likely next tokens at every position and their log-probabilities under the full softmax
    of logits / temperature (what distillation at that temperature compares against). `model`: a loaded model
    (batches go to its device) or a minigpt.evalpass Forward; one batch's logits exist at a time either way."""
    ids, logps = [], []
    for _, logits in as_forward(model).batches(blocks, batch_size):
        top = torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
        ids.append(top.indices.to("cpu", torch.int32))
        logps.append(top.values.to("cpu", torch.float16))
    return torch.cat(ids), torch.cat(logps)


def save_targets(path: Path | str, t: TeacherTargets) -> None:
    arrays = {} if t.ids is None else {"ids": t.ids.numpy(), "logprobs": t.logprobs.numpy()}
    meta = {"digest": t.digest, "k": str(t.k), "temperature": repr(t.temperature), "valid_bytes": str(t.valid_bytes),
            "dense_valid_bpb": "" if t.dense_valid_bpb is None else repr(t.dense_valid_bpb)}
    atomic_save_np(arrays, path, metadata=meta)


def load_targets(path: Path | str, with_tensors: bool = True) -> TeacherTargets:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()} if with_tensors else {}
    bpb = meta.get("dense_valid_bpb", "")
    return TeacherTargets(digest=meta["digest"], k=int(meta["k"]), temperature=float(meta.get("temperature", 1.0)),
                          dense_valid_bpb=float(bpb) if bpb else None,
                          valid_bytes=int(meta.get("valid_bytes", 0)), ids=tensors.get("ids"),
                          logprobs=tensors.get("logprobs"))
