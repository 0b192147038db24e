"""The Ray layer over minigpt.stats: workers hold model replicas, a coordinator keeps the books.

* Workers (`CalibrationWorker`, one per GPU or CPU slot) load the model once and *pull* shards of any domain from
  the coordinator until none are left, so a slow worker never holds the job (work stealing by construction).
* The coordinator (`Coordinator`) hands out shards, records each shard's partial statistics exactly once by shard
  id (a retried or duplicated shard is ignored), writes them to the on-disk ledger atomically, and puts the shards
  of a dead worker back in the queue. A restarted job finds finished shards in the ledger and skips them.
* A worker sums consecutive shards of one domain and hands them in together (a *flush*): one ledger entry per
  shard by default, one per run of shards when Gram statistics make a record large (hundreds of MB for a 135M
  model, GBs for 7B). A shard is recorded only when its flush arrives, so a worker that dies before flushing loses
  nothing but time: its shards go back in the queue.
* The driver (`calibrate`) reads shards up front (an unreadable one fails with its path before any worker starts),
  watches workers, replaces dead ones, and finally merges the ledger per domain in sorted order, so the profile
  does not depend on which worker did what (with flushes of several shards, only up to the order of fp64 sums).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from safetensors.numpy import load_file as load_np

from minigpt import stats as S
from minigpt.config import CalibrateConfig, ModelConfig
from minigpt.io import atomic_save_np
from minigpt.corpora import read_blocks
from minigpt.models import load_model, resolve
from minigpt.stats import PROFILE_FORMAT, load_profile, save_profile  # noqa: F401 (re-exported)
from minigpt.layerstore import LayerStore
from minigpt.memory import peak_rss_mib
from minigpt.raylib import print_actor_peaks
from minigpt.streamed import StreamedDecoder, accumulate_streamed

class CalibrationError(RuntimeError):
    """Calibration could not finish; finished shards stay in the ledger."""


@dataclass(frozen=True)
class Shard:
    shard_id: str  # "<domain>/<file stem>", unique in a job
    domain: str
    path: str


def _ledger_path(ledger: Path, shard_ids: Sequence[str]) -> Path:
    first = sorted(shard_ids)[0]
    return ledger / (f"{first}.safetensors" if len(shard_ids) == 1 else f"{first}+{len(shard_ids)}.safetensors")


def _save_entry(ledger: Path, shard_ids: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
    """One ledger entry: the summed statistics of `shard_ids`, which it names in its metadata."""
    ids = sorted(shard_ids)
    atomic_save_np(arrays, _ledger_path(ledger, ids), metadata={"shards": json.dumps(ids)})


def ledger_entries(ledger: Path) -> dict[Path, list[str]]:
    """Readable ledger entries -> the shard ids each one sums. A torn or foreign file is removed (recomputed)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(ledger).rglob("*.safetensors")) if Path(ledger).is_dir() else []:
        try:
            with safe_open(str(path), "np") as f:
                out[path] = json.loads((f.metadata() or {})["shards"])
        except Exception:
            path.unlink()
    return out


def finished_shards(ledger: Path, shards: Sequence[Shard]) -> set[str]:
    """Shard ids whose statistics are already in the ledger."""
    wanted = {s.shard_id for s in shards}
    return {sid for ids in ledger_entries(ledger).values() for sid in ids if sid in wanted}


@ray.remote(num_cpus=0)
class Coordinator:
    def __init__(self, shards: list[Shard], refs: dict[str, ray.ObjectRef], ledger: str, done: list[str]):
        self.shards = {s.shard_id: s for s in shards}
        self.refs = refs
        self.ledger = Path(ledger)
        self.recorded: set[str] = set(done)
        self.pending = deque(s.shard_id for s in shards if s.shard_id not in self.recorded)
        self.in_flight: dict[str, str] = {}  # shard id -> worker id
        self.tokens: dict[str, float] = {}
        self.started = time.time()
        from ray.util.metrics import Gauge

        self.g_done = Gauge("minigpt_calib_shards_done", "calibration shards recorded", tag_keys=("job",))
        self.g_total = Gauge("minigpt_calib_shards_total", "calibration shards in the job", tag_keys=("job",))
        self.g_total.set(len(self.shards), tags={"job": "calibrate"})
        self.g_done.set(len(self.recorded), tags={"job": "calibrate"})

    def next_shard(self, worker_id: str):
        if not self.pending:
            return None
        sid = self.pending.popleft()
        self.in_flight[sid] = worker_id
        s = self.shards[sid]
        # A list keeps the ObjectRef unresolved, so blocks travel straight from the store to the worker.
        return s.shard_id, s.domain, [self.refs[sid]]

    def submit(self, worker_id: str, shard_ids: list[str], arrays: dict[str, np.ndarray]) -> bool:
        """Record the summed statistics of some shards once; a flush naming an already recorded shard is ignored
        (its other shards, if any, are queued again so they are counted exactly once)."""
        for sid in shard_ids:
            self.in_flight.pop(sid, None)
        if any(sid in self.recorded for sid in shard_ids):
            self.pending.extendleft(sid for sid in shard_ids if sid not in self.recorded)
            return False
        _save_entry(self.ledger, shard_ids, arrays)
        self.recorded.update(shard_ids)
        self.tokens[worker_id] = self.tokens.get(worker_id, 0.0) + float(arrays["tokens"][0])
        self.g_done.set(len(self.recorded), tags={"job": "calibrate"})
        return True

    def worker_failed(self, worker_id: str) -> list[str]:
        """Put the dead worker's unfinished shards back at the front of the queue."""
        lost = [sid for sid, w in self.in_flight.items() if w == worker_id]
        for sid in lost:
            del self.in_flight[sid]
            if sid not in self.recorded:
                self.pending.appendleft(sid)
        return lost

    def progress(self) -> dict:
        return {"done": len(self.recorded), "total": len(self.shards), "pending": len(self.pending),
                "in_flight": dict(self.in_flight), "tokens": sum(self.tokens.values()),
                "elapsed": time.time() - self.started}


@ray.remote
class CalibrationWorker:
    def __init__(self, worker_id: str, model_cfg: ModelConfig, dtype: str, batch_size: int, threads: int,
                 spec: S.StatSpec = S.StatSpec(), flush_shards: int = 1, streamed: bool = False,
                 hidden_budget: int | None = None):
        torch.set_num_threads(max(1, threads))
        self.worker_id = worker_id
        self.batch_size = batch_size
        self.spec = spec
        self.flush_shards = flush_shards  # 0: one flush per run of shards of a domain
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Each node resolves the model itself (an alias is prepared from its pip package on that node).
        # Streamed (CPU): one decoder layer resident at a time (minigpt.streamed); depth-span moments need every
        # layer's activations of a batch at once, and a GPU worker runs the whole model on its device.
        self.decoder = _streamed_decoder(resolve(model_cfg), dtype, model_cfg.trust_remote_code) \
            if streamed and not spec.depth_spans and self.device == "cpu" else None
        self.hidden_budget = hidden_budget
        self.model = None if self.decoder else \
            load_model(resolve(model_cfg), dtype, model_cfg.trust_remote_code).to(self.device)
        from ray.util.metrics import Counter, Gauge

        self.c_tokens = Counter("minigpt_calib_tokens", "tokens through calibration", tag_keys=("domain", "worker"))
        self.g_speed = Gauge("minigpt_calib_tokens_per_s", "calibration speed", tag_keys=("worker",))

    def ready(self) -> str:
        return self.worker_id

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()

    def run(self, coordinator) -> int:
        """Process shards until the coordinator has none left; returns how many this call processed."""
        n = 0
        acc: S.Stats | None = None
        held: list[str] = []
        held_domain = None

        def flush():
            nonlocal acc, held
            if held:
                ray.get(coordinator.submit.remote(self.worker_id, held, S.to_numpy(acc)))
            acc, held = None, []

        while True:
            item = ray.get(coordinator.next_shard.remote(self.worker_id))
            if item is None:
                flush()
                return n
            shard_id, domain, (ref,) = item
            if domain != held_domain:
                flush()
                held_domain = domain
            blocks = torch.tensor(ray.get(ref), dtype=torch.long)  # copies the read-only store buffer
            t0 = time.perf_counter()
            if self.decoder is not None:
                acc = accumulate_streamed(self.decoder, blocks, self.batch_size, acc, self.spec, self.hidden_budget)
            else:
                acc = S.accumulate(self.model, blocks, self.batch_size, stats=acc, spec=self.spec)
            dt = time.perf_counter() - t0
            held.append(shard_id)
            if self.flush_shards and len(held) >= self.flush_shards:
                flush()
            tokens = float(blocks.numel())
            self.c_tokens.inc(tokens, tags={"domain": domain, "worker": self.worker_id})
            self.g_speed.set(tokens / max(dt, 1e-9), tags={"worker": self.worker_id})
            n += 1


def _streamed_decoder(folder, dtype: str, trust_remote_code: bool):
    return StreamedDecoder(LayerStore(folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code))


def read_shard_blocks(path: str) -> np.ndarray:
    """One shard's blocks (int32, for the object store); a bad shard is a CalibrationError naming its path."""
    try:
        arr = read_blocks([path])
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    if arr.shape[0] == 0:
        raise CalibrationError(f"cannot read shard {path}: it holds no token blocks")
    return arr.numpy().astype(np.int32)


def flush_size(cfg: CalibrateConfig, spec: S.StatSpec) -> int:
    """Shards per flush: calibrate.flush_shards, or auto: 1 (a record per shard) for the small base statistics,
    0 (one record per worker and run of a domain's shards) when second moments make each record large."""
    if cfg.flush_shards:
        return cfg.flush_shards
    return 0 if spec.gram or spec.depth_spans else 1


def run_shards(shards: Sequence[Shard], model_cfg: ModelConfig, cfg: CalibrateConfig, ledger: Path,
               spec: S.StatSpec = S.StatSpec(), on_progress: Callable[[dict, list], None] | None = None,
               max_restarts: int = 3) -> None:
    """Run every shard not yet in the ledger once across `cfg.workers` actors, recording their statistics.

    With calibrate.streamed, CPU workers hold one decoder layer at a time (CalibrationWorker), their stream in
    memory up to calibrate.stream_memory_gb.
    `on_progress(progress, workers)` is called after each event with the coordinator's progress (its `in_flight`
    maps shard id -> worker id) and the live workers by id (tests use it to kill one).
    """
    ledger = Path(ledger)
    done = finished_shards(ledger, shards)
    todo = [s for s in shards if s.shard_id not in done]
    domains = sorted({s.domain for s in shards})
    print(f"[calibrate] {len(shards)} shards over {len(domains)} domain(s); {len(done)} already in the ledger",
          flush=True)
    if todo:
        refs = {s.shard_id: ray.put(read_shard_blocks(s.path)) for s in todo}
        coord = Coordinator.remote(list(shards), refs, str(ledger), sorted(done))
        _run_workers(coord, model_cfg, cfg, spec, on_progress, max_restarts)


def calibrate(shards: Sequence[Shard], model_cfg: ModelConfig, cfg: CalibrateConfig, ledger: Path,
              spec: S.StatSpec = S.StatSpec(), **kw) -> dict[str, S.Stats]:
    """run_shards, then the merged statistics of every domain (one profile per domain held at once by the
    caller; the pipeline merges and saves domain by domain instead)."""
    run_shards(shards, model_cfg, cfg, ledger, spec, **kw)
    domains = sorted({s.domain for s in shards})
    return {d: merge_ledger(ledger, [s for s in shards if s.domain == d]) for d in domains}


def _run_workers(coord, model_cfg: ModelConfig, cfg: CalibrateConfig, spec: S.StatSpec, on_progress,
                 max_restarts: int) -> None:
    threads = max(1, round(cfg.cpus_per_worker)) if cfg.gpus_per_worker == 0 else 1
    opts = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker, "max_restarts": 0,
            **cfg.ray_memory}
    counter = iter(range(10**6))

    def start_worker():
        i = next(counter)
        wid = f"w{i}"
        return wid, CalibrationWorker.options(name=f"minigpt-calib-{wid}-{os.getpid()}", **opts).remote(
            wid, model_cfg, cfg.dtype, cfg.batch_size, threads, spec, flush_size(cfg, spec), cfg.streams,
            cfg.stream_budget), i

    workers = {}
    for _ in range(cfg.workers):
        wid, actor, i = start_worker()
        workers[wid] = (actor, i)
    running = {actor.run.remote(coord): wid for wid, (actor, _) in workers.items()}
    restarts = 0
    last_print = 0.0
    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
        for ref in ready:
            wid = running.pop(ref)
            try:
                ray.get(ref)
                continue  # the queue was empty for this worker
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
                lost = ray.get(coord.worker_failed.remote(wid))
                print(f"[calibrate] worker {wid} died; re-queued {len(lost)} shard(s)", flush=True)
                del workers[wid]
            except ray.exceptions.RayTaskError as e:
                raise CalibrationError(f"calibration worker {wid} failed: {e.cause!r}") from None
        progress = ray.get(coord.progress.remote())
        if on_progress:
            on_progress(progress, {w: a for w, (a, _) in workers.items()})
        remaining = progress["total"] - progress["done"]
        if remaining and progress["pending"]:
            idle = [w for w in workers if w not in running.values()]
            if not workers:
                if restarts >= max_restarts:
                    raise CalibrationError(f"all calibration workers died ({restarts} replacements); "
                                           f"{remaining} shard(s) unfinished, finished ones are kept")
                restarts += 1
                wid, actor, i = start_worker()
                workers[wid] = (actor, i)
                idle = [wid]
            for w in idle:
                actor, i = workers[w]
                running[actor.run.remote(coord)] = w
        now = time.time()
        if now - last_print > 5 or not running:
            last_print = now
            rate = progress["tokens"] / max(progress["elapsed"], 1e-9)
            print(f"[calibrate] {progress['done']}/{progress['total']} shards, {progress['tokens']:.0f} tokens, "
                  f"{rate:.0f} tok/s", flush=True)
    actors = [actor for actor, _ in workers.values()]
    print_actor_peaks("calibration workers", actors)  # measured, beside the prediction validate printed
    for actor in actors:
        ray.kill(actor)


def merge_ledger(ledger: Path, shards: Sequence[Shard]) -> S.Stats:
    """Sum a domain's ledger entries in sorted order; every shard must be covered exactly once."""
    wanted = {s.shard_id for s in shards}
    entries = sorted(((ids, p) for p, ids in ledger_entries(ledger).items() if set(ids) & wanted),
                     key=lambda e: e[0][0])
    covered = [sid for ids, _ in entries for sid in ids]
    missing = sorted(wanted - set(covered))
    if missing:
        raise CalibrationError(f"{len(missing)} shard(s) missing from the ledger, e.g. {missing[0]}")
    if len(covered) != len(set(covered)) or not set(covered) <= wanted:
        raise CalibrationError(f"ledger {ledger} has overlapping or foreign entries for these shards; delete it to "
                               "recalibrate")
    return S.merge(S.from_numpy(load_np(str(p))) for _, p in entries)


def summarize(domain: str, stats: S.Stats) -> str:
    tokens = stats["tokens"].item()
    mean = stats["mlp_abs_sum"] / max(tokens, 1)
    cos = stats["block_cos_sum"] / max(tokens, 1)
    top_vocab = int((stats["token_counts"] > 0).sum().item())
    return (f"[profile] {domain}: {tokens:.0f} tokens, MLP mean|a| {mean.mean():.4f} "
            f"(layer min {mean.mean(1).min():.4f} / max {mean.mean(1).max():.4f}), "
            f"block cos {cos.min():.3f}..{cos.max():.3f}, {top_vocab} distinct token ids")
