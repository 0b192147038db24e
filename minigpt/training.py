"""What one Ray Train worker of recovery does: the DeepSpeed engine, the training loop with its validation, early
stopping and checkpoints, and saving the finished expert (`save_recovered`).

minigpt.recover is the driver that launches this loop per domain; what it trains on is minigpt.trainset, the maths
(schedule, data order, losses, bits per byte) minigpt.losses, both testable without Ray or DeepSpeed.

Loading. Under ZeRO-3 the student is built and loaded partitioned (`partitioned_loading`: transformers'
DeepSpeed integration, deepspeed.zero.Init over the engine's own config), so each rank materialises about
1 / world of the parameters instead of the whole model before `deepspeed.initialize`; the manifest records what
each rank held after loading (`param_elements_loaded`) and its peak then (`load_peak_rss_mib`).

Validation. With `recover.eval_every`, the model is scored (bits per byte, all ranks summed) on the validation
split before the first step, every `eval_every` steps and after the last. A better score saves the weights as
`best-<step>/` beside the checkpoints; `patience` scores without improvement end the run; the
expert is the best weights (`keep_best`). The history travels in the DeepSpeed client state, so a resumed run
continues the same curve and makes the same decisions (and, being bit-identical, writes the same best weights).

Saving. Best and last weights are gathered one decoder layer at a time and written by rank 0 as they arrive, and
the expert is made from them one layer at a time (minigpt.trainsave): no rank ever holds the whole model, so a
ZeRO-3 group can recover an expert bigger than any one of its workers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minigpt.archs import arch_of
from minigpt.config import RecoverConfig
from minigpt.memory import peak_rss_mib
from minigpt.streamed import pin_mmap_threshold
from minigpt.losses import (batch_indices, bits_per_byte, lr_factor, next_token_loss, stop_early, topk_distill_loss,
                            validation_nll)
from minigpt.trainsave import fill_partitioned, write_engine_weights, write_expert
from minigpt.vocabsplit import block_starts, split_vocabulary, splittable, vocab_rows
from minigpt.trainset import DistillTargets, RecoveryTask, load_distill_targets, training_blocks, validation_blocks

MANIFEST = "_manifest.json"
TAG_PREFIX = "step_"
BEST_PREFIX = "best-"
LAST_DIR = "last"  # the last weights, when they are not the best-validated ones


# ------------------------------------------------------------------------------------------------ the engine


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


def held_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this rank owns, elements of the whole model). Under ZeRO-3 a rank owns its partition of
    each parameter (`ds_tensor`, padded to a multiple of the world size; about 1 / world of the model), whose full
    shape is `ds_numel`; otherwise every rank holds all of it. Parameters below ZeRO-3's
    stage3_param_persistence_threshold are also kept whole on every rank between steps: not counted here."""
    held = total = 0
    for p in module.parameters():
        part = getattr(p, "ds_tensor", None)
        held += part.numel() if part is not None else p.numel()
        total += getattr(p, "ds_numel", p.numel())
    return held, total


def _lora_config(cfg: RecoverConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")


def materialised_parameters(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds in memory now: whole tensors, plus its ZeRO-3 partitions (`ds_tensor`;
    a partitioned parameter's own data is then empty). A model loaded whole counts all of itself on every rank."""
    return sum(p.data.numel() + (p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else 0)
               for p in module.parameters())


def _no_shm_op() -> None:
    """DeepSpeed would compile its shm op (~70 s, g++) on the first CPU communicator set-up; gloo alone is enough
    here. Before `zero.Init` as well as `initialize`: either may set the communicator up first."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def partitioned_loading(ds: dict[str, Any] | None) -> Iterator[None]:
    """Under ZeRO-3, `from_config` inside this block builds the model under `deepspeed.zero.Init(ds)` (transformers'
    DeepSpeed integration): each rank allocates only its partition of every parameter, so no rank materialises the
    whole model's parameters (minigpt.trainsave.fill_partitioned then copies the checkpoint in, layer by layer).
    Elsewhere (another stage, or no `ds`) it does nothing.

    transformers finds the config through a weak reference to an `HfDeepSpeedConfig`: the object must stay alive
    for the whole build, and it is dropped on the way out, since any later `from_pretrained` in this process (one
    rank alone) would otherwise enter zero.Init's collectives alone and hang. `ds` must hold no "auto"
    (recover.deepspeed_config resolves or rejects them) and is the very dict `deepspeed.initialize` gets next, so
    both partition the same way."""
    if ds is None or zero_stage(ds) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _no_shm_op()
    held = HfDeepSpeedConfig(ds)  # the reference that keeps transformers' weak one alive
    try:
        yield
    finally:
        del held
        unset_hf_deepspeed_config()


def build_student(student_dir: str, cfg: RecoverConfig, ds: dict[str, Any] | None = None) -> torch.nn.Module:
    """The model DeepSpeed trains: the pruned checkpoint in fp32, wrapped with LoRA adapters in lora mode. With a
    ZeRO-3 `ds` (every rank of the group calling) it is built partitioned and filled one layer at a time
    (`partitioned_loading`, minigpt.trainsave.fill_partitioned); the adapters, created afterwards whole, are
    partitioned by `deepspeed.initialize` (broadcast from rank 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if ds is not None and zero_stage(ds) == 3:
        import torch.distributed as dist

        config = AutoConfig.from_pretrained(student_dir)
        model = _build_partitioned(config, cfg, ds)
        fill_partitioned(model, student_dir, arch_of(config).layers, dist.get_rank())
    else:
        model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        # Each layer's activations are recomputed in the backward pass instead of kept: a 0.5B model's LoRA worker
        # held 9.5 GB at batch 4 x 256 without it. Non-reentrant, so frozen inputs (LoRA) still get gradients.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.mode == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(cfg))
    model.train()
    return model


def _build_partitioned(config, cfg: RecoverConfig, ds: dict[str, Any]) -> torch.nn.Module:
    """The student's modules under ZeRO-3, empty, every parameter partitioned as it is created; with
    `recover.vocab_block_params`, the embedding and head as row blocks (minigpt.vocabsplit). zero.Init creates each
    parameter whole before partitioning it, so the model is first built with a one-row stand-in vocabulary, which
    the blocks then replace: the whole embedding and head never exist on any rank (on Qwen2.5-1.5B a worker's
    loading peak was 5.0 GiB with them and is 3.5-3.7 GiB without)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    rows, pad = config.vocab_size, getattr(config, "pad_token_id", None)
    split = bool(cfg.vocab_block_params) and len(block_starts(rows, config.hidden_size, cfg.vocab_block_params)) > 1
    if split:
        config.vocab_size, config.pad_token_id = 1, None
    try:
        with partitioned_loading(ds):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        config.vocab_size, config.pad_token_id = rows, pad
    model.config.vocab_size, model.config.pad_token_id = rows, pad  # from_config may have built from a copy
    if not split:
        return model
    if not splittable(model) or _adapts_vocabulary(model, cfg):  # modules split_vocabulary must leave as they are
        with partitioned_loading(ds):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with deepspeed.zero.Init(config_dict_or_path=ds):  # the blocks, too, are created partitioned
        split_vocabulary(model, cfg.vocab_block_params, rows=rows, padding_idx=pad)
    return model


def _adapts_vocabulary(model: torch.nn.Module, cfg: RecoverConfig) -> bool:
    """Whether LoRA targets the embedding or the head by name: peft must then find them as the stock modules."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
    return cfg.mode == "lora" and bool(names & set(cfg.lora_targets))


def build_engine(model: torch.nn.Module, cfg: RecoverConfig, ds: dict[str, Any], total_steps: int):
    """DeepSpeed engine over `model` with a client AdamW and warmup+cosine LambdaLR (both compile no op)."""
    import deepspeed

    _no_shm_op()
    fused = cfg.use_gpu and torch.cuda.is_available()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  fused=fused)
    schedule = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds)
    return engine, scheduler


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


def best_dir(task: RecoveryTask, step: int) -> Path:
    return Path(task.checkpoint_dir) / f"{BEST_PREFIX}{step:06d}"


def _save_weights(engine, stage: int, rank: int, out_dir: Path) -> None:
    """The engine's weights into `out_dir`, one layer gathered at a time (minigpt.trainsave; every rank calls),
    replacing an older folder of the same name (a resumed run saving the same step again)."""
    if rank == 0 and out_dir.exists():
        shutil.rmtree(out_dir)
    write_engine_weights(engine.module, arch_of(engine.module).layers, stage, rank, out_dir)


def _save_best(engine, stage: int, rank: int, task: RecoveryTask, step: int) -> None:
    """The best-validated weights so far, replacing the previous best (every rank calls)."""
    path = best_dir(task, step)
    _save_weights(engine, stage, rank, path)
    if rank == 0:
        for old in Path(task.checkpoint_dir).glob(f"{BEST_PREFIX}*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def save_recovered(weights_dir: Path, task: RecoveryTask, cfg: RecoverConfig, manifest: dict[str, Any]) -> None:
    """The plain expert (LoRA merged) + tokenizer + manifest from the saved engine weights, one layer at a time."""
    from transformers import AutoConfig

    root = arch_of(AutoConfig.from_pretrained(task.student_dir)).layers
    scaling = cfg.lora_alpha / cfg.lora_rank if cfg.mode == "lora" else None
    write_expert(weights_dir, task.student_dir, root, task.out_dir, scaling, {MANIFEST: manifest})


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
    # ZeRO-3's gather / release cycles (and loading's) free large blocks that glibc would otherwise keep in its heap
    # after raising its mmap threshold: the worker's RSS then grows by what it once gathered (README: recovery).
    pin_mmap_threshold()
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start equal on every rank
    if cfg.use_gpu:
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cpu")

    blocks = training_blocks(task)
    model = build_student(task.student_dir, cfg, ds)
    # What loading cost this rank, before DeepSpeed adds its buffers and optimizer state (for the manifest).
    loaded, load_peak = materialised_parameters(model), peak_rss_mib()
    vocab = vocab_rows(model)
    vocab_blocks = len(getattr(model.get_input_embeddings(), "blocks", ()))  # 0: the stock, whole embedding
    if int(blocks.max()) >= vocab:
        raise ValueError(f"train shards hold token id {int(blocks.max())} >= the student's vocabulary ({vocab}); "
                         "shards must be tokenized with the student's tokenizer")
    targets = load_distill_targets(task, blocks, cfg.distill_temperature) if cfg.mode == "distill" else None
    valid, valid_bytes = validation_blocks(task, cfg.eval_tokens) if cfg.eval_every else (None, 0)
    engine, scheduler = build_engine(model, cfg, ds, total_steps)
    stage = zero_stage(ds)
    held, param_elements = held_parameters(engine.module)  # what ZeRO-3 partitioned, for the manifest

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
        bpb = bits_per_byte(nll.item(), valid_bytes)
        history.append({"step": step, "tokens": step * tokens_per_step, "valid_bpb": bpb,
                        "valid_loss": nll.item() / (len(valid) * (valid.shape[1] - 1))})
        is_best = all(h["valid_bpb"] > bpb for h in history[:-1])
        if is_best and cfg.keep_best:
            _save_best(engine, stage, rank, task, step)
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
    weights = best_dir(task, expert_step) if use_best else Path(task.checkpoint_dir) / LAST_DIR
    if not use_best:
        _save_weights(engine, stage, rank, weights)
    # Every rank's own peaks, measured, and its parameters (after loading, and owned in training), for the manifest.
    mine = (peak_rss_mib(), held, loaded, load_peak)
    per_rank = [mine]
    if dist.is_available() and dist.is_initialized() and world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
    peaks = [r[0] for r in per_rank]
    if rank == 0:
        # The first step of a run pays for allocation and warm-up; leave it out of the rate when there are others.
        steady = rates[1:] or rates
        manifest = {"finished": True, "domain": task.domain, "mode": cfg.mode, "fingerprint": config["fingerprint"],
                    "steps": step, "total_steps": total_steps, "tokens": step * tokens_per_step, "losses": losses,
                    "tokens_per_s": sum(steady) / len(steady) if steady else 0.0, "resumed_from": resumed_from,
                    "started_at": started_at, "finished_at": finished_at, "world_size": world, "zero_stage": stage,
                    "student_dir": task.student_dir, "train_blocks": len(blocks) - task.general_blocks,
                    "general_blocks": task.general_blocks, "curve": history, "expert_step": expert_step,
                    "stopped_early": stopped_early, "dense_valid_bpb": config.get("dense_valid_bpb"),
                    "peak_rss_mib": peaks, "param_elements": param_elements,
                    "param_elements_held": [r[1] for r in per_rank],
                    "param_elements_loaded": [r[2] for r in per_rank], "load_peak_rss_mib": [r[3] for r in per_rank],
                    "vocab_blocks": vocab_blocks}
        save_recovered(weights, task, cfg, manifest)


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
