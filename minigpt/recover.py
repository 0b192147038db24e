"""Recovery: fine-tune each physically slimmed expert on its domain's train split with DeepSpeed, run by Ray Train.

One Ray Train `TorchTrainer` per domain (a worker group of `recover.workers` data-parallel processes, gloo on CPU,
NCCL on GPU), each worker running `_train_loop`: a DeepSpeed engine (ZeRO-2 or ZeRO-3 from a JSON file under
jobs/deepspeed/, its batch/accumulation/clipping/bf16 entries filled from `RecoverConfig`), a client
`torch.optim.AdamW` with a warmup + cosine `LambdaLR`, and one of three losses: `full` (next-token cross-entropy),
`lora` (peft adapters on the attention and MLP projections, merged away before saving) or `distill` (KL to a frozen
teacher plus cross-entropy).

Concurrency. Ray Train v2's `fit()` blocks its caller until the run ends and its controller is a zero-CPU actor,
so `recover_all` runs each domain's `fit()` in a driver thread (Train v2 only skips its SIGINT handler off the main
thread). The pool has as many threads as domains fit on the cluster at once (CPUs and GPUs of one worker group), so
the rest queue in the driver instead of in Ray Train, whose worker-group start retries forever on a request that
cannot be placed. `check_resources` rejects a domain that could never fit before anything starts. A domain that
fails only marks its own `RecoveryResult` as failed.

Checkpoints. Each domain's Ray Train run (`recover-<domain>`) keeps its experiment folder inside `checkpoint_dir`
(storage_path = checkpoint_dir), and DeepSpeed writes its `step_NNNNNN/` tags into that folder and reports them with
`CheckpointUploadMode.NO_UPLOAD` (Ray tracks them, keeps `keep_checkpoints` of them and copies nothing). On start a
worker loads DeepSpeed's `latest` tag if there is one and continues from its step; the checkpoint path travels in
the loop config (`resume_from_checkpoint` is deprecated in Train v2). A fingerprint of the config and inputs sits
beside the checkpoints; a mismatch discards them. The final expert is gathered (ZeRO-3 included) onto rank 0, put
back into a plain `from_pretrained` model (LoRA merged), and written with its tokenizer and `_manifest.json` to a
temporary sibling folder renamed to `out_dir`; a finished `out_dir` with the same fingerprint is skipped.

Metrics. Rank 0 prints `[recover] <domain> step 3/20 loss 3.412 lr 4.1e-05 tok/s 812` every step, sets
ray.util.metrics gauges (`ray_minigpt_recover_{loss,tokens_per_s,step}`, tagged by domain) and reports the same
metrics through `ray.train.report` at most once per Train controller poll (see `_report_interval`).

The maths (schedule, data order, losses) are pure torch functions, testable without Ray or DeepSpeed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minigpt.config import ConfigError, RecoverConfig

MANIFEST = "_manifest.json"
FINGERPRINT = "_fingerprint.json"
TAG_PREFIX = "step_"
REPO_ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed keys that RecoverConfig owns; a JSON file may leave them out or set them to "auto".
_FILLED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size")


@dataclass(frozen=True)
class RecoveryTask:
    domain: str
    student_dir: str  # pruned HF folder (model + tokenizer)
    train_shards: tuple[str, ...]  # parquet, column input_ids list<int32> of block_size ids in the STUDENT's vocab
    out_dir: str  # final consolidated HF checkpoint + tokenizer, written atomically
    checkpoint_dir: str  # DeepSpeed checkpoints for resume (also the Ray Train experiment folder)
    teacher_dir: str | None = None  # dense model for distill
    teacher_token_ids: tuple[int, ...] | None = None  # student row i = teacher vocab id teacher_token_ids[i]


@dataclass(frozen=True)
class RecoveryResult:
    domain: str
    ok: bool
    error: str | None
    steps: int
    losses: tuple[float, ...]
    tokens_per_s: float
    out_dir: str | None
    resumed_from: int = 0  # step the last run continued from (0: trained from scratch)
    skipped: bool = False  # out_dir already held a finished expert with the same fingerprint
    started_at: float = 0.0  # wall clock (time.time()) of the first and last optimizer step of the last run
    finished_at: float = 0.0


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


# ------------------------------------------------------------------------------------------- inputs and config


def resolve_deepspeed_path(path: str) -> Path:
    """A relative path is tried against the working directory, then the repository root."""
    p = Path(path).expanduser()
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"recover.deepspeed_config {path!r} not found")


def deepspeed_config(cfg: RecoverConfig) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill what RecoverConfig owns. The optimizer and schedule are always ours."""
    path = resolve_deepspeed_path(cfg.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove {key!r}; recover builds AdamW and its schedule from recover.* settings")
    for key in _FILLED_KEYS:
        if ds.get(key, "auto") != "auto":
            raise ConfigError(f"{path}: {key!r} must be \"auto\" or absent; set it through recover.* instead")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled") not in (None, "auto", False) and not cfg.use_gpu:
            raise ConfigError(f"{path}: {key} needs recover.use_gpu (CPU training runs in float32)")
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from micro batch x accumulation x world size
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(cfg.use_gpu) and ds.get("bf16", {}).get("enabled") in
                  (None, "auto", True)}
    if ds.get("fp16", {}).get("enabled") == "auto":
        ds["fp16"] = {**ds["fp16"], "enabled": False}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def load_blocks(shards: tuple[str, ...] | list[str]) -> torch.Tensor:
    """All blocks of the train shards as one int64 [n_blocks, block_size] tensor (minigpt.corpora.read_blocks)."""
    from minigpt.corpora import read_blocks

    blocks = read_blocks(shards)
    if blocks.shape[0] == 0:
        raise ValueError(f"no token blocks in {len(shards)} train shard(s)")
    return blocks


def check_tasks(tasks: list[RecoveryTask], cfg: RecoverConfig) -> None:
    """Cheap checks of every task before anything starts; ConfigError names the first problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: set[str] = set()
    for t in tasks:
        where = f"recover[{t.domain}]"
        if t.domain in seen:
            raise ConfigError(f"{where}: domain given twice")
        seen.add(t.domain)
        if not (Path(t.student_dir) / "config.json").is_file():
            raise ConfigError(f"{where}: student_dir {t.student_dir} has no config.json")
        if not t.train_shards:
            raise ConfigError(f"{where}: no train shards")
        for shard in t.train_shards:
            if not Path(shard).is_file():
                raise ConfigError(f"{where}: train shard {shard} not found")
            schema = pq.read_schema(shard)
            field = schema.field("input_ids") if "input_ids" in schema.names else None
            if field is None or not pa.types.is_list(field.type) or not pa.types.is_integer(field.type.value_type):
                raise ConfigError(f"{where}: {shard} has no input_ids list<int> column")
        if cfg.mode == "distill":
            if not t.teacher_dir or not (Path(t.teacher_dir) / "config.json").is_file():
                raise ConfigError(f"{where}: distill needs a teacher_dir with config.json, got {t.teacher_dir!r}")
        if not t.out_dir or not t.checkpoint_dir:
            raise ConfigError(f"{where}: out_dir and checkpoint_dir are required")


def check_resources(tasks: list[RecoveryTask], cfg: RecoverConfig, cluster_cpus: float, cluster_gpus: float) -> None:
    """Raise ConfigError if ONE domain's worker group can never be placed (Ray Train would wait forever)."""
    if not tasks:
        return
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if need_cpu > cluster_cpus + 1e-9:
        raise ConfigError(f"recover needs {cfg.workers} workers x {cfg.cpus_per_worker:g} CPUs = {need_cpu:g} CPUs "
                          f"per domain, but the Ray cluster has {cluster_cpus:g}; lower recover.workers or "
                          f"recover.cpus_per_worker")
    if cfg.use_gpu and cfg.workers > cluster_gpus + 1e-9:
        raise ConfigError(f"recover needs {cfg.workers} GPUs per domain (recover.use_gpu, one per worker), but the "
                          f"Ray cluster has {cluster_gpus:g}")


def concurrent_domains(n_tasks: int, cfg: RecoverConfig, cluster_cpus: float, cluster_gpus: float) -> int:
    """How many domains' worker groups fit on the cluster at the same time."""
    slots = math.floor(cluster_cpus / (cfg.workers * cfg.cpus_per_worker) + 1e-9)
    if cfg.use_gpu:
        slots = min(slots, math.floor(cluster_gpus / cfg.workers + 1e-9))
    return max(1, min(n_tasks, slots))


def fingerprint(task: RecoveryTask, cfg: RecoverConfig, ds: dict[str, Any]) -> str:
    """What a checkpoint or finished expert was trained from; anything else means start over."""
    def stamp(path: str | None) -> Any:
        if not path:
            return None
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + [p / "config.json"] if p.is_dir() else [p]
        return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]

    blob = {"cfg": dataclasses.asdict(cfg), "ds": ds, "student": stamp(task.student_dir),
            "teacher": stamp(task.teacher_dir) if cfg.mode == "distill" else None,
            "teacher_token_ids": hashlib.sha256(json.dumps(task.teacher_token_ids).encode()).hexdigest(),
            "shards": [(s, stamp(s)) for s in task.train_shards]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the worker


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
    out = Path(task.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(task.student_dir).save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():  # an unfinished or outdated expert: replaced as a whole
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _train_loop(config: dict[str, Any]) -> None:
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


# ------------------------------------------------------------------------------------------------ the driver


def _read_manifest(out_dir: str) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("finished") else None


def _result_from_manifest(task: RecoveryTask, manifest: dict[str, Any], skipped: bool) -> RecoveryResult:
    return RecoveryResult(domain=task.domain, ok=True, error=None, steps=int(manifest["steps"]),
                          losses=tuple(float(x) for x in manifest["losses"]),
                          tokens_per_s=float(manifest["tokens_per_s"]), out_dir=task.out_dir,
                          resumed_from=int(manifest.get("resumed_from", 0)), skipped=skipped,
                          started_at=float(manifest.get("started_at", 0.0)),
                          finished_at=float(manifest.get("finished_at", 0.0)))


def _prepare_checkpoint_dir(task: RecoveryTask, fp: str) -> None:
    """Keep checkpoints only if they were trained from the same inputs and config."""
    ck = Path(task.checkpoint_dir)
    stamp = ck / FINGERPRINT
    if ck.exists() and (not stamp.is_file() or stamp.read_text().strip() != fp):
        if any(ck.iterdir()):
            print(f"[recover] {task.domain}: discarding checkpoints of a different config in {ck}", flush=True)
        shutil.rmtree(ck)
    ck.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp + "\n")


def _run_domain(task: RecoveryTask, cfg: RecoverConfig, ds: dict[str, Any],
                abort_after_step: int | None) -> RecoveryResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    task = dataclasses.replace(task, student_dir=os.path.abspath(task.student_dir),
                               out_dir=os.path.abspath(task.out_dir),
                               checkpoint_dir=os.path.abspath(task.checkpoint_dir),
                               train_shards=tuple(os.path.abspath(s) for s in task.train_shards),
                               teacher_dir=os.path.abspath(task.teacher_dir) if task.teacher_dir else None)
    try:
        fp = fingerprint(task, cfg, ds)
        manifest = _read_manifest(task.out_dir)
        if manifest is not None and manifest.get("fingerprint") == fp:
            print(f"[recover] {task.domain}: {task.out_dir} is finished, skipping", flush=True)
            return _result_from_manifest(task, manifest, skipped=True)
        _prepare_checkpoint_dir(task, fp)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"task": task, "cfg": cfg, "ds": ds, "fingerprint": fp,
                               "abort_after_step": abort_after_step},
            # Ray Train would pick gloo on CPU by itself; DeepSpeed then reuses this process group.
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(name=run_name(task), storage_path=task.checkpoint_dir,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        trainer.fit()
        manifest = _read_manifest(task.out_dir)
        if manifest is None:
            raise RuntimeError(f"training ended but {task.out_dir} holds no finished expert")
        return _result_from_manifest(task, manifest, skipped=False)
    except Exception as e:  # one domain's failure is its own result, never the others'
        text = f"{type(e).__name__}: {e}".strip()
        print(f"[recover] {task.domain} failed: {text.splitlines()[0] if text else type(e).__name__}", flush=True)
        return RecoveryResult(domain=task.domain, ok=False, error=text[-4000:], steps=0, losses=(),
                              tokens_per_s=0.0, out_dir=None)


def recover_all(tasks: list[RecoveryTask], cfg: RecoverConfig, *,
                abort_after_step: int | None = None) -> dict[str, RecoveryResult]:
    """Recover every domain, as many at once as the cluster holds; returns every domain's result.

    Raises ConfigError before starting anything if the inputs are invalid or one domain can never fit.
    `abort_after_step` is a drill for tests and operators: every domain's run raises after that step (after its
    checkpoint, if one was due), as a killed job would; the next call resumes from the last checkpoint.
    """
    from minigpt.raylib import cluster_cpus, cluster_gpus, ensure_ray

    tasks = list(tasks)
    if not tasks:
        return {}
    check_tasks(tasks, cfg)
    ds = deepspeed_config(cfg)
    ensure_ray()
    cpus, gpus = cluster_cpus(), cluster_gpus()
    check_resources(tasks, cfg, cpus, gpus)
    parallel = concurrent_domains(len(tasks), cfg, cpus, gpus)
    print(f"[recover] {len(tasks)} domain(s), {parallel} at a time, {cfg.workers} worker(s) x "
          f"{cfg.cpus_per_worker:g} CPU each, mode {cfg.mode}, ZeRO-{zero_stage(ds)}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="recover") as pool:
        futures = {t.domain: pool.submit(_run_domain, t, cfg, ds, abort_after_step) for t in tasks}
        return {domain: fut.result() for domain, fut in futures.items()}
