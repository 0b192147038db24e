"""Recovery: fine-tune each physically slimmed expert on its domain's train split with DeepSpeed, run by Ray Train.
This module is the driver (inputs, resources, checkpoint folders, the Ray Train launch per domain); what each
worker runs is minigpt.training.

One Ray Train `TorchTrainer` per domain (a worker group of `recover.workers` data-parallel processes, gloo on CPU,
NCCL on GPU), each worker running `training.train_loop`: a DeepSpeed engine (ZeRO-2 or ZeRO-3, optionally with the
optimizer state and parameters offloaded to CPU memory, from a JSON file, by default the ones shipped in
minigpt/deepspeed/, its batch/accumulation/clipping/bf16 entries filled from `RecoverConfig`, no "auto" left; under
ZeRO-3 the same dict has the student loaded straight into each rank's partitions), a client
`torch.optim.AdamW` with a warmup + cosine `LambdaLR`, and one of three losses: `full` (next-token cross-entropy),
`lora` (peft adapters on the attention and MLP projections, merged away before saving) or `distill` (KL to the
dense model's top-k next-token distribution, cached once per domain by minigpt.teacher, plus cross-entropy: no
teacher is loaded by the trainers). The budget is `recover.tokens` (or steps); with
`recover.eval_every` the worker scores the validation split, stops early and keeps the best weights (see
minigpt.training).

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
beside the checkpoints; a mismatch discards them, and they are deleted once the domain's expert is final (GBs on
real models): this module is the only place that removes checkpoints. The final expert is gathered (ZeRO-3 included) onto rank 0, put
back into a plain `from_pretrained` model (LoRA merged), and written with its tokenizer and `_manifest.json` to a
temporary sibling folder renamed to `out_dir`; a finished `out_dir` with the same fingerprint is skipped.

Metrics. Rank 0 prints `[recover] <domain> step 3/20 loss 3.412 lr 4.1e-05 tok/s 812` every step, sets
ray.util.metrics gauges (`ray_minigpt_recover_{loss,tokens_per_s,step}`, tagged by domain) and reports the same
metrics through `ray.train.report` at most once per Train controller poll (see `training._report_interval`).

"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt.config import ConfigError, RecoverConfig
from minigpt import memory as MEM
from minigpt.training import MANIFEST, RecoveryTask, run_name, train_loop, zero_stage
from minigpt.raylib import cluster_cpus, cluster_gpus, ensure_ray
from minigpt.targets import load_targets
from minigpt.vocabsplit import block_starts

FINGERPRINT = "_fingerprint.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed keys that RecoverConfig owns; a JSON file may leave them out or set them to "auto".
_FILLED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size")


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
    tokens: int = 0  # trained on (all workers)
    curve: tuple[dict[str, float], ...] = ()  # validation scores: {step, tokens, valid_bpb, valid_loss}
    expert_step: int = 0  # the step whose weights became the expert (the best-validated one with keep_best)
    stopped_early: bool = False
    dense_valid_bpb: float | None = None  # the dense model on the same validation split


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
    if _offloaded(ds, "offload_optimizer", path):
        # recover's optimizer is a client torch AdamW (it compiles no op); DeepSpeed refuses one beside an
        # offloaded optimizer unless told that it may run it on the CPU partitions (slower than its
        # DeepSpeedCPUAdam, which compiles for minutes).
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(f"{path}: zero_force_ds_cpu_optimizer must be false with offload_optimizer: recover "
                              "steps its own torch AdamW on the offloaded partitions")
        if stage == 0:
            raise ConfigError(f"{path}: offload_optimizer needs zero_optimization.stage 1-3")
        ds["zero_force_ds_cpu_optimizer"] = False
    if _offloaded(ds, "offload_param", path) and stage != 3:
        raise ConfigError(f"{path}: offload_param needs zero_optimization.stage 3, got {stage!r}")
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
    # HF's Trainer fills the other "auto"s (bucket sizes from hidden_size, ...); recover does not guess them, and
    # DeepSpeed (zero.Init at load time, then initialize) takes only numbers.
    left = _auto_keys(ds)
    if left:
        raise ConfigError(f"{path}: {', '.join(left)} set to \"auto\"; recover fills only "
                          f"{', '.join(_FILLED_KEYS)}, bf16 and fp16: give a value or remove the key")
    return ds


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the "auto" values left in a DeepSpeed config."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def _offloaded(ds: dict[str, Any], key: str, path: Path) -> bool:
    """Whether zero_optimization.<key> (offload_optimizer / offload_param) moves something off the device."""
    section = ds.get("zero_optimization", {}).get(key)
    if section is None:
        return False
    device = section.get("device", "none") if isinstance(section, dict) else None
    if device not in ("none", "cpu", "nvme"):
        raise ConfigError(f"{path}: zero_optimization.{key}.device must be none, cpu or nvme, got {device!r}")
    if device == "nvme" and not section.get("nvme_path"):
        raise ConfigError(f"{path}: zero_optimization.{key} on nvme needs nvme_path")
    return device != "none"


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
        for shard in (*t.train_shards, *t.valid_shards, *t.general_shards):
            if not Path(shard).is_file():
                raise ConfigError(f"{where}: shard {shard} not found")
            schema = pq.read_schema(shard)
            field = schema.field("input_ids") if "input_ids" in schema.names else None
            if field is None or not pa.types.is_list(field.type) or not pa.types.is_integer(field.type.value_type):
                raise ConfigError(f"{where}: {shard} has no input_ids list<int> column")
        if cfg.eval_every and not sum(pq.read_metadata(s).num_rows for s in t.valid_shards):
            raise ConfigError(f"{where}: recover.eval_every needs a validation split, and this domain's is empty; "
                              "raise data.valid_fraction or set recover.eval_every: 0")
        have = sum(pq.read_metadata(s).num_rows for s in t.general_shards)
        if t.general_blocks > have:
            raise ConfigError(f"{where}: {t.general_blocks} general replay blocks asked, the shards hold {have}")
        if cfg.mode == "distill" and not (t.teacher_file and Path(t.teacher_file).is_file()):
            raise ConfigError(f"{where}: distill needs the teacher's targets file, got {t.teacher_file!r}")
        if not t.out_dir or not t.checkpoint_dir:
            raise ConfigError(f"{where}: out_dir and checkpoint_dir are required")


def check_resources(cfg: RecoverConfig, cluster_cpus: float, cluster_gpus: float) -> None:
    """Raise ConfigError if ONE domain's worker group can never be placed (Ray Train would wait forever)."""
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if need_cpu > cluster_cpus + 1e-9:
        raise ConfigError(f"recover needs {cfg.workers} workers x {cfg.cpus_per_worker:g} CPUs = {need_cpu:g} CPUs "
                          f"per domain, but the Ray cluster has {cluster_cpus:g}; lower recover.workers or "
                          f"recover.cpus_per_worker")
    if cfg.use_gpu and cfg.workers > cluster_gpus + 1e-9:
        raise ConfigError(f"recover needs {cfg.workers} GPUs per domain (recover.use_gpu, one per worker), but the "
                          f"Ray cluster has {cluster_gpus:g}")


def predict_worker(model_config, cfg: RecoverConfig, ds: dict[str, Any], seq: int,
                   removed: float = 0.0) -> MEM.RecoveryEstimate:
    """The predicted peak of one trainer worker (minigpt.memory.predict_recovery) recovering an expert of
    `model_config`'s architecture; `removed` (a fraction of the decoder layers' parameters and MLP width) sizes an
    expert not written yet from its dense model."""
    s = MEM.model_sizes(model_config)
    zero = ds.get("zero_optimization", {})
    if removed:
        s = dataclasses.replace(s, layer_params=round(s.layer_params * (1 - removed)),
                                intermediate=round(s.intermediate * (1 - removed)))
    if cfg.mode == "lora":
        trainable = round(MEM.lora_params(model_config, cfg.lora_targets, cfg.lora_rank) * (1 - removed))
    else:
        trainable = s.total_params
    # DeepSpeed's own defaults where the file leaves them out.
    live = int(min(zero.get("stage3_max_live_parameters", 1e9), zero.get("stage3_max_reuse_distance", 1e9)))
    block = 0
    if cfg.vocab_block_params:  # the largest row block of the embedding and head (training._build_partitioned)
        starts = block_starts(s.vocab, s.hidden, cfg.vocab_block_params)
        block = starts[1] * s.hidden if len(starts) > 1 else 0
    return MEM.predict_recovery(s, trainable=trainable, batch=cfg.batch_size, seq=seq, zero_stage=zero_stage(ds),
                                world=cfg.workers, gradient_checkpointing=cfg.gradient_checkpointing,
                                distill=cfg.mode == "distill", live=live,
                                prefetch=int(zero.get("stage3_prefetch_bucket_size", 5e7)), vocab_block=block)


LESS_MEMORY = ("lower recover.batch_size, or set recover.mode lora, recover.gradient_checkpointing true, or more "
               "recover.workers with a ZeRO-3 deepspeed_config")  # what shrinks a trainer worker's peak


def check_worker_memory(est: MEM.RecoveryEstimate, cfg: RecoverConfig) -> None:
    """One line when recover.worker_memory_gb cannot hold a trainer worker's predicted peak."""
    if cfg.worker_memory_gb and est.peak > cfg.worker_memory_gb * 2**30:
        raise ConfigError(f"recover.worker_memory_gb={cfg.worker_memory_gb:g} is below a trainer worker's predicted "
                          f"peak of {est.peak / 2**30:.2f} GiB ({est.describe()}); raise it, or {LESS_MEMORY}")


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
            "teacher": stamp(task.teacher_file) if cfg.mode == "distill" else None,  # else only the curve's reference
            "teacher_token_ids": hashlib.sha256(json.dumps(task.teacher_token_ids).encode()).hexdigest(),
            "shards": [(s, stamp(s)) for s in (*task.train_shards, *task.valid_shards, *task.general_shards)],
            "general_blocks": task.general_blocks}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the driver


def block_size(task: RecoveryTask) -> int:
    """Tokens per block of the task's train shards (what turns recover.tokens into steps)."""
    import pyarrow.parquet as pq

    first = pq.read_table(task.train_shards[0], columns=["input_ids"]).column("input_ids")
    return len(first[0])


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
                          finished_at=float(manifest.get("finished_at", 0.0)), tokens=int(manifest.get("tokens", 0)),
                          curve=tuple(manifest.get("curve", ())), expert_step=int(manifest.get("expert_step", 0)),
                          stopped_early=bool(manifest.get("stopped_early", False)),
                          dense_valid_bpb=manifest.get("dense_valid_bpb"))


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
    from transformers import AutoConfig

    task = dataclasses.replace(task, student_dir=os.path.abspath(task.student_dir),
                               out_dir=os.path.abspath(task.out_dir),
                               checkpoint_dir=os.path.abspath(task.checkpoint_dir),
                               train_shards=tuple(os.path.abspath(s) for s in task.train_shards),
                               valid_shards=tuple(os.path.abspath(s) for s in task.valid_shards),
                               general_shards=tuple(os.path.abspath(s) for s in task.general_shards),
                               teacher_file=os.path.abspath(task.teacher_file) if task.teacher_file else None)
    try:
        fp = fingerprint(task, cfg, ds)
        manifest = _read_manifest(task.out_dir)
        if manifest is not None and manifest.get("fingerprint") == fp:
            print(f"[recover] {task.domain}: {task.out_dir} is finished, skipping", flush=True)
            shutil.rmtree(task.checkpoint_dir, ignore_errors=True)
            return _result_from_manifest(task, manifest, skipped=True)
        _prepare_checkpoint_dir(task, fp)
        est = predict_worker(AutoConfig.from_pretrained(task.student_dir), cfg, ds, block_size(task))
        print(f"[memory] recover {task.domain}: each of {cfg.workers} trainer worker(s) {est.peak / 2**30:.2f} GiB "
              f"predicted ({est.describe()})", flush=True)
        check_worker_memory(est, cfg)
        memory = {"memory": int(cfg.worker_memory_gb * 2**30)} if cfg.worker_memory_gb else {}
        dense_bpb = None
        if task.teacher_file:
            dense_bpb = load_targets(task.teacher_file, with_tensors=False).dense_valid_bpb
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"task": task, "cfg": cfg, "ds": ds, "fingerprint": fp,
                               "steps": cfg.total_steps(block_size(task)), "dense_valid_bpb": dense_bpb,
                               "abort_after_step": abort_after_step},
            # Ray Train would pick gloo on CPU by itself; DeepSpeed then reuses this process group.
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker, **memory}),
            run_config=RunConfig(name=run_name(task), storage_path=task.checkpoint_dir,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        trainer.fit()
        manifest = _read_manifest(task.out_dir)
        if manifest is None:
            raise RuntimeError(f"training ended but {task.out_dir} holds no finished expert")
        if manifest.get("peak_rss_mib"):
            print(MEM.report_peaks(f"recover {task.domain}: {len(manifest['peak_rss_mib'])} worker(s)",
                                   manifest["peak_rss_mib"]) + f" ({est.peak / 2**20:.0f} predicted)", flush=True)
        # The expert is final; its DeepSpeed checkpoints (GBs on real models) are no longer needed.
        shutil.rmtree(task.checkpoint_dir, ignore_errors=True)
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
    tasks = list(tasks)
    if not tasks:
        return {}
    check_tasks(tasks, cfg)
    ds = deepspeed_config(cfg)
    ensure_ray()
    cpus, gpus = cluster_cpus(), cluster_gpus()
    check_resources(cfg, cpus, gpus)
    parallel = concurrent_domains(len(tasks), cfg, cpus, gpus)
    print(f"[recover] {len(tasks)} domain(s), {parallel} at a time, {cfg.workers} worker(s) x "
          f"{cfg.cpus_per_worker:g} CPU each, mode {cfg.mode}, ZeRO-{zero_stage(ds)}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="recover") as pool:
        futures = {t.domain: pool.submit(_run_domain, t, cfg, ds, abort_after_step) for t in tasks}
        return {domain: fut.result() for domain, fut in futures.items()}
