"""What recovery trains a domain's expert on: the task (RecoveryTask), its training set, its validation blocks and
the cached distillation targets in the student's rows. Read from the run folder's shards; no Ray, no DeepSpeed.

Training set. The domain's train blocks, then the first `general_blocks` blocks of the general replay corpus; one
seeded permutation per epoch mixes them (losses.batch_indices). Distillation reads the dense model's cached top-k
log-probabilities of exactly these blocks (minigpt.targets; a digest of the blocks guards the pairing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt.corpora import read_blocks, read_n_bytes
from minigpt.losses import student_rows
from minigpt.targets import blocks_digest, load_targets

@dataclass(frozen=True)
class RecoveryTask:
    domain: str
    student_dir: str  # pruned HF folder (model + tokenizer)
    train_shards: tuple[str, ...]  # parquet, column input_ids list<int32> of block_size ids in the STUDENT's vocab
    out_dir: str  # final consolidated HF checkpoint + tokenizer, written atomically
    checkpoint_dir: str  # DeepSpeed checkpoints for resume (also the Ray Train experiment folder)
    valid_shards: tuple[str, ...] = ()  # validation split in the student's vocab (with recover.eval_every)
    general_shards: tuple[str, ...] = ()  # replay corpus in the student's vocab...
    general_blocks: int = 0  # ...of which the first general_blocks blocks join the training set
    teacher_file: str | None = None  # minigpt.teacher targets: top-k log-probs (distill), dense validation bits/byte
    teacher_token_ids: tuple[int, ...] | None = None  # student row i = teacher vocab id teacher_token_ids[i]


def load_blocks(shards: tuple[str, ...] | list[str]) -> torch.Tensor:
    """All blocks of the train shards as one int64 [n_blocks, block_size] tensor (minigpt.corpora.read_blocks)."""
    blocks = read_blocks(shards)
    if blocks.shape[0] == 0:
        raise ValueError(f"no token blocks in {len(shards)} train shard(s)")
    return blocks


def training_blocks(task: RecoveryTask) -> torch.Tensor:
    """The training set: the domain's train blocks, then the first `general_blocks` replay blocks."""
    blocks = load_blocks(task.train_shards)
    if task.general_blocks:
        general = read_blocks(task.general_shards)[:task.general_blocks]
        if len(general) < task.general_blocks or general.shape[1] != blocks.shape[1]:
            raise ValueError(f"{task.domain}: the general replay shards hold {len(general)} blocks of "
                             f"{general.shape[1]} tokens, the task asks for {task.general_blocks} of {blocks.shape[1]}")
        blocks = torch.cat([blocks, general])
    return blocks


def validation_blocks(task: RecoveryTask, max_tokens: int) -> tuple[torch.Tensor, int]:
    """The validation blocks scored during training (at most max_tokens; 0 = all) and the bytes of text they hold."""
    blocks, n_bytes = read_blocks(task.valid_shards), read_n_bytes(task.valid_shards)
    if max_tokens and len(blocks):
        n = max(1, max_tokens // blocks.shape[1])
        blocks, n_bytes = blocks[:n], n_bytes[:n]
    return blocks, int(n_bytes.sum())


@dataclass(frozen=True)
class DistillTargets:
    """The cached teacher signal of every training block, in the student's rows (minigpt.teacher)."""

    rows: torch.Tensor  # int32 [n_blocks, block_size, k]; -1 = not in the student's vocabulary
    logprobs: torch.Tensor  # float16 [n_blocks, block_size, k]


def load_distill_targets(task: RecoveryTask, blocks: torch.Tensor, temperature: float) -> DistillTargets:
    if not task.teacher_file:
        raise ValueError(f"{task.domain}: distill needs the teacher's targets (teacher_file)")
    targets = load_targets(task.teacher_file)
    if targets.ids is None or targets.digest != blocks_digest(blocks) or targets.temperature != temperature:
        raise ValueError(f"{task.domain}: {task.teacher_file} holds no top-k targets of these training blocks at "
                         f"temperature {temperature:g} (stale teacher stage?)")
    return DistillTargets(student_rows(targets.ids, task.teacher_token_ids), targets.logprobs)
