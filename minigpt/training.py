"""What one Ray Train worker of recovery does: the pure maths (LR schedule, data order, losses, parameter groups),
the DeepSpeed engine, the training loop with its validation, early stopping and checkpoints, and saving the
finished expert.

minigpt.recover is the driver that launches this loop per domain; the maths here are plain torch functions,
testable without Ray or DeepSpeed.

Training set. The domain's train blocks, then the first `general_blocks` blocks of the general replay corpus; one
seeded permutation per epoch mixes them (batch_indices). Distillation reads the dense model's cached top-k
log-probabilities of exactly these blocks (minigpt.teacher; a digest of the blocks guards the pairing).

Validation. With `recover.eval_every`, the model is scored (bits per byte, all ranks summed) on the validation
split before the first step, every `eval_every` steps and after the last. A better score saves the gathered
weights as `best-<step>.safetensors` beside the checkpoints; `patience` scores without improvement end the run; the
expert is the best weights (`keep_best`). The history travels in the DeepSpeed client state, so a resumed run
continues the same curve and makes the same decisions (and, being bit-identical, writes the same best weights).
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
from minigpt.io import atomic_dir, atomic_file, atomic_write_json

MANIFEST = "_manifest.json"
TAG_PREFIX = "step_"
BEST_PREFIX = "best-"


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


def training_blocks(task: RecoveryTask) -> torch.Tensor:
    """The training set: the domain's train blocks, then the first `general_blocks` replay blocks."""
    from minigpt.corpora import read_blocks

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
    from minigpt.corpora import read_blocks, read_n_bytes

    blocks, n_bytes = read_blocks(task.valid_shards), read_n_bytes(task.valid_shards)
    if max_tokens and len(blocks):
        n = max(1, max_tokens // blocks.shape[1])
        blocks, n_bytes = blocks[:n], n_bytes[:n]
    return blocks, int(n_bytes.sum())


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


def build_engine(model: torch.nn.Module, cfg: RecoverConfig, ds: dict[str, Any], total_steps: int):
    """DeepSpeed engine over `model` with a client AdamW and warmup+cosine LambdaLR (both compile no op)."""
    import deepspeed

    # The shm op would be compiled (~70 s, g++) on the first CPU initialize; gloo alone is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    fused = cfg.use_gpu and torch.cuda.is_available()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  fused=fused)
    schedule = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds)
    return engine, scheduler


@dataclass(frozen=True)
class DistillTargets:
    """The cached teacher signal of every training block, in the student's rows (minigpt.teacher)."""

    rows: torch.Tensor  # int32 [n_blocks, block_size, k]; -1 = not in the student's vocabulary
    logprobs: torch.Tensor  # float16 [n_blocks, block_size, k]


def load_distill_targets(task: RecoveryTask, blocks: torch.Tensor, temperature: float) -> DistillTargets:
    from minigpt.teacher import blocks_digest, load_targets

    if not task.teacher_file:
        raise ValueError(f"{task.domain}: distill needs the teacher's targets (teacher_file)")
    targets = load_targets(task.teacher_file)
    if targets.ids is None or targets.digest != blocks_digest(blocks) or targets.temperature != temperature:
        raise ValueError(f"{task.domain}: {task.teacher_file} holds no top-k targets of these training blocks at "
                         f"temperature {temperature:g} (stale teacher stage?)")
    return DistillTargets(student_rows(targets.ids, task.teacher_token_ids), targets.logprobs)


def train_step(engine, blocks: torch.Tensor, step: int, rank: int, world: int, cfg: RecoverConfig,
               device: torch.device, targets: DistillTargets | None = None) -> torch.Tensor:
    """One optimizer step (grad_accum micro batches); returns this worker's mean loss (a detached tensor)."""
    total = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        idx = batch_indices(len(blocks), step, micro, rank, world, cfg.batch_size, cfg.grad_accum, cfg.seed)
        x = blocks[idx].to(device)
        logits = engine(input_ids=x, use_cache=False).logits
        if targets is None:
            loss = next_token_loss(logits, x)
        else:
            loss = topk_distill_loss(logits, targets.rows[idx].to(device), targets.logprobs[idx].to(device), x,
                                     cfg.distill_alpha, cfg.distill_temperature)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / cfg.grad_accum


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
        logits = module(input_ids=x, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").double()
    module.train(was_training)
    return total


def stop_early(history: list[dict[str, float]], patience: int) -> bool:
    """True when the last `patience` scores came after the best one (0: never)."""
    if not patience or not history:
        return False
    best = min(range(len(history)), key=lambda i: history[i]["valid_bpb"])
    return len(history) - 1 - best >= patience


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


def best_file(task: RecoveryTask, step: int) -> Path:
    return Path(task.checkpoint_dir) / f"{BEST_PREFIX}{step:06d}.safetensors"


def _save_best(state: dict[str, torch.Tensor], task: RecoveryTask, step: int) -> None:
    """Rank 0: the best-validated weights so far, replacing the previous best file."""
    from safetensors.torch import save_file

    path = best_file(task, step)
    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    for old in Path(task.checkpoint_dir).glob(f"{BEST_PREFIX}*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, train with validation and early stopping, checkpoint, and
    (rank 0) save the expert."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    task: RecoveryTask = config["task"]
    cfg: RecoverConfig = config["cfg"]
    ds: dict[str, Any] = config["ds"]
    total_steps: int = config["steps"]
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

    blocks = training_blocks(task)
    model = build_student(task.student_dir, cfg)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(blocks.max()) >= vocab:
        raise ValueError(f"train shards hold token id {int(blocks.max())} >= the student's vocabulary ({vocab}); "
                         "shards must be tokenized with the student's tokenizer")
    targets = load_distill_targets(task, blocks, cfg.distill_temperature) if cfg.mode == "distill" else None
    valid, valid_bytes = validation_blocks(task, cfg.eval_tokens) if cfg.eval_every else (None, 0)
    engine, scheduler = build_engine(model, cfg, ds, total_steps)
    stage = zero_stage(ds)

    step, losses, resumed_from, history = 0, [], 0, []
    ck_dir = str(deepspeed_dir(task))
    if latest_tag(task):
        _, client = engine.load_checkpoint(ck_dir, load_module_strict=cfg.mode != "lora")
        step = resumed_from = int(client["step"])
        losses, history = list(client["losses"]), list(client.get("history", []))
        if rank == 0:
            print(f"[recover] {task.domain} resumed from step {step}", flush=True)

    gauges = _gauges() if rank == 0 else None
    tokens_per_step = world * cfg.grad_accum * cfg.batch_size * blocks.shape[1]

    def validate() -> None:
        """Score, all ranks together; a new best saves its weights (every rank joins the ZeRO-3 gather)."""
        nll = validation_nll(engine.module, valid, rank, world, cfg.batch_size, device)
        dist.all_reduce(nll)
        bpb = nll.item() / (math.log(2) * valid_bytes)
        history.append({"step": step, "tokens": step * tokens_per_step, "valid_bpb": bpb,
                        "valid_loss": nll.item() / (len(valid) * (valid.shape[1] - 1))})
        is_best = all(h["valid_bpb"] > bpb for h in history[:-1])
        if is_best and cfg.keep_best:
            state = _gather_state_dict(engine, stage, rank)
            if rank == 0:
                _save_best(state, task, step)
        if rank == 0:
            print(f"[recover] {task.domain} step {step}/{total_steps} validation {bpb:.4f} bits/byte"
                  + (" (best)" if is_best else ""), flush=True)

    if cfg.eval_every and not history:
        validate()  # the pruned expert: where the curve starts
    rates: list[float] = []
    report_interval, last_report = _report_interval(), -math.inf
    started_at = time.time()
    stopped_early = stop_early(history, cfg.patience)
    while step < total_steps and not stopped_early:
        lr = scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        loss = train_step(engine, blocks, step, rank, world, cfg, device, targets)
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
            print(f"[recover] {task.domain} step {step}/{total_steps} loss {loss_value:.3f} lr {lr:.1e} "
                  f"tok/s {rate:.0f}", flush=True)
            for name, value in (("loss", loss_value), ("tokens_per_s", rate), ("step", step)):
                gauges[name].set(value, tags={"domain": task.domain})
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
            validate()
            metrics["valid_bpb"] = history[-1]["valid_bpb"]
            stopped_early = step < total_steps and stop_early(history, cfg.patience)
            if stopped_early and rank == 0:
                print(f"[recover] {task.domain} stopped early at step {step}: no better validation score in "
                      f"{cfg.patience} evaluation(s)", flush=True)
        if step == total_steps or stopped_early or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            tag = f"{TAG_PREFIX}{step:06d}"
            engine.save_checkpoint(ck_dir, tag=tag, client_state={"step": step, "losses": losses,
                                                                  "history": history},
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

    # With keep_best the best-validated weights are already on disk (the last score always follows the last
    # step, so a best last step saved them too): read them back instead of gathering the engine's again.
    use_best = bool(history) and cfg.keep_best
    expert_step = min(history, key=lambda h: h["valid_bpb"])["step"] if use_best else step
    state = None if use_best else _gather_state_dict(engine, stage, rank)
    if rank == 0:
        if use_best:
            from safetensors.torch import load_file

            state = load_file(str(best_file(task, expert_step)))
        # The first step of a run pays for allocation and warm-up; leave it out of the rate when there are others.
        steady = rates[1:] or rates
        manifest = {"finished": True, "domain": task.domain, "mode": cfg.mode, "fingerprint": config["fingerprint"],
                    "steps": step, "total_steps": total_steps, "tokens": step * tokens_per_step, "losses": losses,
                    "tokens_per_s": sum(steady) / len(steady) if steady else 0.0, "resumed_from": resumed_from,
                    "started_at": started_at, "finished_at": finished_at, "world_size": world, "zero_stage": stage,
                    "student_dir": task.student_dir, "train_blocks": len(blocks) - task.general_blocks,
                    "general_blocks": task.general_blocks, "curve": history, "expert_step": expert_step,
                    "stopped_early": stopped_early, "dense_valid_bpb": config.get("dense_valid_bpb")}
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
