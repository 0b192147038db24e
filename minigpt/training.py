"""What one Ray Train worker of recovery does: the pure maths (LR schedule, data order, losses, parameter groups),
the DeepSpeed engine, the training loop with its checkpoints and metrics, and saving the finished expert.

minigpt.recover is the driver that launches this loop per domain; the maths here are plain torch functions,
testable without Ray or DeepSpeed.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minigpt.config import RecoverConfig
from minigpt.io import atomic_dir, atomic_write_json

MANIFEST = "_manifest.json"
TAG_PREFIX = "step_"


@dataclass(frozen=True)
class RecoveryTask:
    domain: str
    student_dir: str  # pruned HF folder (model + tokenizer)
    train_shards: tuple[str, ...]  # parquet, column input_ids list<int32> of block_size ids in the STUDENT's vocab
    out_dir: str  # final consolidated HF checkpoint + tokenizer, written atomically
    checkpoint_dir: str  # DeepSpeed checkpoints for resume (also the Ray Train experiment folder)
    teacher_dir: str | None = None  # dense model for distill
    teacher_token_ids: tuple[int, ...] | None = None  # student row i = teacher vocab id teacher_token_ids[i]


# ------------------------------------------------------------------------------------------------ pure maths


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
    the batches the uninterrupted run would have, and workers never overlap within a step.
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


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                 alpha: float, temperature: float, teacher_token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, next token).

    With `teacher_token_ids` (student row i = teacher vocab id ids[i]) the teacher's logits are gathered on the
    student's vocabulary before the softmax, so both distributions live on the same rows. KL is averaged per token.
    """
    if teacher_token_ids is not None:
        teacher_logits = teacher_logits.index_select(-1, teacher_token_ids)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher has {teacher_logits.shape[-1]} logits per token, student "
                         f"{student_logits.shape[-1]}: pass teacher_token_ids for a vocabulary-pruned student")
    s = student_logits[:, :-1].flatten(0, 1).float() / temperature
    t = teacher_logits[:, :-1].flatten(0, 1).float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    ce = next_token_loss(student_logits, input_ids)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; weight decay only on matrices (not norms, biases or 1-D LoRA-free vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def load_blocks(shards: tuple[str, ...] | list[str]) -> torch.Tensor:
    """All blocks of the train shards as one int64 [n_blocks, block_size] tensor (minigpt.corpora.read_blocks)."""
    from minigpt.corpora import read_blocks

    blocks = read_blocks(shards)
    if blocks.shape[0] == 0:
        raise ValueError(f"no token blocks in {len(shards)} train shard(s)")
    return blocks


def _lora_config(cfg: RecoverConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")


def build_student(student_dir: str, cfg: RecoverConfig) -> torch.nn.Module:
    """The model DeepSpeed trains: the pruned checkpoint in fp32, wrapped with LoRA adapters in lora mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    if cfg.mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(cfg))
    model.train()
    return model


def build_engine(model: torch.nn.Module, cfg: RecoverConfig, ds: dict[str, Any]):
    """DeepSpeed engine over `model` with a client AdamW and warmup+cosine LambdaLR (both compile no op)."""
    import deepspeed

    # The shm op would be compiled (~70 s, g++) on the first CPU initialize; gloo alone is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    fused = cfg.use_gpu and torch.cuda.is_available()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=fused)
    schedule = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds)
    return engine, scheduler


def train_step(engine, blocks: torch.Tensor, step: int, rank: int, world: int, cfg: RecoverConfig,
               device: torch.device, teacher: torch.nn.Module | None = None,
               teacher_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step (grad_accum micro batches); returns this worker's mean loss (a detached tensor)."""
    total = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        idx = batch_indices(len(blocks), step, micro, rank, world, cfg.batch_size, cfg.grad_accum, cfg.seed)
        x = blocks[idx].to(device)
        logits = engine(input_ids=x, use_cache=False).logits
        if teacher is None:
            loss = next_token_loss(logits, x)
        else:
            with torch.no_grad():
                t_in = teacher_ids[x] if teacher_ids is not None else x
                t_logits = teacher(input_ids=t_in, use_cache=False).logits
            loss = distill_loss(logits, t_logits, x, cfg.distill_alpha, cfg.distill_temperature, teacher_ids)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / cfg.grad_accum


def run_name(task: RecoveryTask) -> str:
    """The Ray Train run of a domain (what the dashboard lists)."""
    return f"recover-{task.domain}"


def deepspeed_dir(task: RecoveryTask) -> Path:
    """Where DeepSpeed writes its step_NNNNNN tags and `latest`: the Ray Train experiment folder of the domain."""
    return Path(task.checkpoint_dir) / run_name(task)


def latest_tag(task: RecoveryTask) -> str | None:
    """The checkpoint a restarted run continues from (DeepSpeed's `latest` file), if any."""
    latest = deepspeed_dir(task) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _gather_state_dict(engine, stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU weights on rank 0 (ZeRO-3 shards gathered; every rank must call this)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters()) if stage == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage == 3):
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def save_expert(state: dict[str, torch.Tensor], task: RecoveryTask, cfg: RecoverConfig,
                manifest: dict[str, Any]) -> None:
    """Plain HF checkpoint (LoRA merged) + tokenizer + manifest into a temporary sibling, then rename to out_dir."""
    from transformers import AutoTokenizer

    model = build_student(task.student_dir, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if not any(k.endswith(t) for t in tied)]:
        raise RuntimeError(f"trained weights do not match the student: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if cfg.mode == "lora":
        model = model.merge_and_unload()
    model.eval()
    with atomic_dir(task.out_dir) as tmp:  # an unfinished or outdated expert is replaced as a whole
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(task.student_dir).save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, train, checkpoint, and (rank 0) save the expert."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    task: RecoveryTask = config["task"]
    cfg: RecoverConfig = config["cfg"]
    ds: dict[str, Any] = config["ds"]
    abort_after = config.get("abort_after_step")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start equal on every rank
    if cfg.use_gpu:
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cpu")

    blocks = load_blocks(task.train_shards)
    model = build_student(task.student_dir, cfg)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(blocks.max()) >= vocab:
        raise ValueError(f"train shards hold token id {int(blocks.max())} >= the student's vocabulary ({vocab}); "
                         "shards must be tokenized with the student's tokenizer")
    teacher = teacher_ids = None
    if cfg.mode == "distill":
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(task.teacher_dir, dtype=dtype).to(device).eval()
        teacher.requires_grad_(False)
        if task.teacher_token_ids is not None:
            teacher_ids = torch.tensor(task.teacher_token_ids, dtype=torch.long, device=device)
    engine, scheduler = build_engine(model, cfg, ds)
    stage = zero_stage(ds)

    step, losses, resumed_from = 0, [], 0
    ck_dir = str(deepspeed_dir(task))
    if latest_tag(task):
        _, client = engine.load_checkpoint(ck_dir, load_module_strict=cfg.mode != "lora")
        step = resumed_from = int(client["step"])
        losses = list(client["losses"])
        if rank == 0:
            print(f"[recover] {task.domain} resumed from step {step}", flush=True)

    gauges = _gauges() if rank == 0 else None
    tokens_per_step = world * cfg.grad_accum * cfg.batch_size * blocks.shape[1]
    rates: list[float] = []
    report_interval, last_report = _report_interval(), -math.inf
    started_at = time.time()
    while step < cfg.steps:
        lr = scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        loss = train_step(engine, blocks, step, rank, world, cfg, device, teacher, teacher_ids)
        # One all-reduce carries the mean loss and rank 0's decision to report metrics (see _report_interval).
        due = rank == 0 and time.monotonic() - last_report >= report_interval
        packed = torch.stack([loss, torch.tensor(float(due), device=device)])
        dist.all_reduce(packed)
        loss_value, report_now = packed[0].item() / world, packed[1].item() > 0
        rate = tokens_per_step / (time.perf_counter() - t0)
        rates.append(rate)
        step += 1
        losses.append(loss_value)
        metrics = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": rate}
        if rank == 0:
            print(f"[recover] {task.domain} step {step}/{cfg.steps} loss {loss_value:.3f} lr {lr:.1e} "
                  f"tok/s {rate:.0f}", flush=True)
            for name, value in (("loss", loss_value), ("tokens_per_s", rate), ("step", step)):
                gauges[name].set(value, tags={"domain": task.domain})
        if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            tag = f"{TAG_PREFIX}{step:06d}"
            engine.save_checkpoint(ck_dir, tag=tag, client_state={"step": step, "losses": losses},
                                   exclude_frozen_parameters=cfg.mode == "lora")
            ckpt = Checkpoint.from_directory(f"{ck_dir}/{tag}") if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
            last_report = time.monotonic()
        elif report_now:
            ray.train.report(metrics)
            last_report = time.monotonic()
        if abort_after is not None and step >= abort_after:
            raise RuntimeError(f"aborted after step {step} (abort_after_step, a drill for resuming)")
    finished_at = time.time()

    state = _gather_state_dict(engine, stage, rank)
    if rank == 0:
        # The first step of a run pays for allocation and warm-up; leave it out of the rate when there are others.
        steady = rates[1:] or rates
        manifest = {"finished": True, "domain": task.domain, "mode": cfg.mode, "fingerprint": config["fingerprint"],
                    "steps": step, "losses": losses, "tokens_per_s": sum(steady) / len(steady) if steady else 0.0,
                    "resumed_from": resumed_from, "started_at": started_at, "finished_at": finished_at,
                    "world_size": world, "zero_stage": stage, "student_dir": task.student_dir}
        save_expert(state, task, cfg, manifest)


def _report_interval() -> float:
    """Seconds between metric reports to Ray Train.

    Train v2 hands reports to its controller through a queue of one, drained once per controller poll
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): reporting every step would cap training at one step per
    poll. So metrics go to Ray at most once per poll (checkpoints always), while the log line is printed every step.
    """
    return float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


def _gauges() -> dict[str, Any]:
    from ray.util.metrics import Gauge

    return {name: Gauge(f"minigpt_recover_{name}", description=f"recovery {name} of the latest step",
                        tag_keys=("domain",)) for name in ("loss", "tokens_per_s", "step")}
