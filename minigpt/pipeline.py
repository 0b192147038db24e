"""Runs a job's stages in order; resumable.

prepare -> calibrate -> [search] -> plan+slim -> recover -> [quantize] -> evaluate -> report ([optional]).
Every stage (per domain where it can be) records a manifest in `<run>/_stages/` with a key: a hash of exactly the
settings and inputs it depends on. A re-run skips a stage whose manifest says done with the same key and whose
outputs exist, so changing `recover.steps` re-runs only recovery, evaluation and the report, while changing the
calibration data re-runs everything downstream of it.

Everything that can be checked cheaply is checked before the run folder is touched or a model is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from minigpt import config as C
from minigpt.config import ConfigError, JobConfig

class JobIncomplete(RuntimeError):
    """Some domains failed; every other domain's outputs, the evaluation and the report were still written."""


STAGES = ("prepare", "calibrate", "search", "slim", "recover", "quantize", "evaluate", "report")


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class StageBook:
    """The `_stages/` folder: one JSON manifest per stage (and domain) with status, key and outputs."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "_stages"

    def path(self, stage: str, domain: str | None) -> Path:
        return self.dir / (f"{stage}.{domain}.json" if domain else f"{stage}.json")

    def read(self, stage: str, domain: str | None = None) -> dict | None:
        p = self.path(stage, domain)
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, stage: str, domain: str | None, key: str, outputs: list[Path]) -> bool:
        m = self.read(stage, domain)
        return bool(m and m.get("status") == "done" and m.get("key") == key and all(p.exists() for p in outputs))

    def mark(self, stage: str, domain: str | None, key: str, status: str, **extra) -> None:
        record = {"stage": stage, "domain": domain, "key": key, "status": status, "time": time.time(),
                  "pid": os.getpid(), **extra}
        _atomic_write(self.path(stage, domain), json.dumps(record, indent=1, default=str))

    def restore(self, stage: str, domain: str | None, previous: dict | None) -> None:
        if previous is None:
            self.path(stage, domain).unlink(missing_ok=True)
        else:
            _atomic_write(self.path(stage, domain), json.dumps(previous, indent=1, default=str))

    def all(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]


class Pipeline:
    def __init__(self, cfg: JobConfig, job_path: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.book = StageBook(self.run_dir)
        self.job_path = job_path
        self.model_dir: Path | None = None
        self.spec = None  # the StatSpec calibration collects (check_statistics)
        self.keys: dict[tuple[str, str | None], str] = {}

    # ------------------------------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Cheap checks that need no model and no Ray; raise ConfigError in one line."""
        from minigpt import models, sources

        cfg = self.cfg
        folder = models.resolve(cfg.model, prepare=False)
        models.check_architecture(folder)
        for d in cfg.domains:
            sources.check_sources(d)
        if cfg.recover.enabled:
            ds = Path(cfg.recover.deepspeed_config)
            if not ds.is_file():
                raise ConfigError(f"recover.deepspeed_config: file not found: {ds}")
            try:
                json.loads(ds.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"recover.deepspeed_config {ds}: invalid JSON ({e.msg} at line {e.lineno})"
                                  ) from None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"output_dir {self.run_dir} exists and is not a folder")

    def check_statistics(self) -> None:
        """Size the profile the prune settings need from the config alone; too big for the budget: one line."""
        from minigpt import models, plan as P, stats as S

        skel = models.skeleton(self.model_dir, self.cfg.model.trust_remote_code)
        self.spec = P.stat_spec(self.cfg.prune, skel)
        size = S.stats_bytes(skel, self.spec)
        extras = ", ".join(filter(None, ["Gram matrices" if self.spec.gram else "",
                                         f"depth spans {list(self.spec.depth_spans)}" if self.spec.depth_spans else ""]))
        print(f"[calibrate] profile: {size / 2**30:.2f} GiB per domain (fp64 sums{', ' + extras if extras else ''})",
              flush=True)
        budget = self.cfg.calibrate.memory_budget_gb
        if size > budget * 2**30:
            raise ConfigError(f"the statistics of one domain need {size / 2**30:.2f} GiB, over "
                              f"calibrate.memory_budget_gb={budget:g}; raise it, or set prune.reconstruct=false")

    def check_resources(self) -> None:
        from minigpt import raylib

        cpus, gpus = raylib.cluster_cpus(), raylib.cluster_gpus()
        c = self.cfg.calibrate
        if c.cpus_per_worker > cpus or c.gpus_per_worker > gpus:
            raise ConfigError(f"calibrate: one worker needs {c.cpus_per_worker} CPU / {c.gpus_per_worker} GPU, "
                              f"the cluster has {cpus:g} CPU / {gpus:g} GPU")
        if self.cfg.recover.enabled:
            from minigpt import recover

            recover.check_resources([], self.cfg.recover, cpus, gpus)

    # ------------------------------------------------------------------------------------------ driver

    def _stage(self, stage: str, domain: str | None, key: str, outputs: list[Path], fn: Callable[[], None]) -> bool:
        """Run `fn` unless already done with this key; returns True if it ran."""
        self.keys[(stage, domain)] = key
        label = f"{stage}/{domain}" if domain else stage
        if self.book.is_done(stage, domain, key, outputs):
            print(f"[pipeline] {label}: done (skipped)", flush=True)
            return False
        print(f"[pipeline] {label}: running", flush=True)
        previous = self.book.read(stage, domain)
        self.book.mark(stage, domain, key, "running")
        t0 = time.time()
        try:
            fn()
        except ConfigError:
            # Bad input is not a stage failure: leave the books as they were before this attempt.
            self.book.restore(stage, domain, previous)
            raise
        except BaseException as e:
            self.book.mark(stage, domain, key, "failed", error=f"{e.__class__.__name__}: {e}")
            raise
        self.book.mark(stage, domain, key, "done", seconds=round(time.time() - t0, 1),
                       outputs=[str(p) for p in outputs])
        print(f"[pipeline] {label}: done in {time.time() - t0:.1f}s", flush=True)
        return True

    def run(self) -> dict:
        from minigpt import models, raylib

        cfg = self.cfg
        self.validate()
        self.model_dir = models.resolve(cfg.model)  # prepares an alias once (cached)
        self.check_statistics()
        raylib.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
        self.check_resources()
        tokenizer = models.load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        created = not self.run_dir.exists()
        try:
            for d in cfg.domains:
                self.prepare(d, tokenizer)
        except ConfigError:
            # A domain turned out empty or too small: a new run folder is removed whole, an old one keeps
            # only the finished work it had.
            if created:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        _atomic_write(self.run_dir / "job.yaml", C.dump(cfg))
        self.calibrate()
        if cfg.search.enabled:
            self.search()
        self.slim()
        if cfg.recover.enabled:
            self.recover()
        if cfg.quantize.enabled:
            self.quantize()
        eval_data = self.evaluate()
        summary = self.summarize(eval_data)
        self.report(eval_data, summary)
        print_table(summary)
        failed = [d for d, r in summary["domains"].items() if r.get("recover_status") == "failed"]
        if failed:
            errors = {d: (self.book.read("recover", d) or {}).get("error") or "?" for d in failed}
            raise JobIncomplete("recovery failed for " + "; ".join(f"{d}: {e.splitlines()[0][:200]}"
                                                                  for d, e in errors.items()))
        return summary

    # ------------------------------------------------------------------------------------------ stages

    def data_dir(self, domain: str) -> Path:
        return self.run_dir / "data" / domain

    def prepare(self, domain: C.DomainConfig, tokenizer) -> None:
        from minigpt import corpora

        key = _hash(self.cfg.model.source, str(self.model_dir), self.cfg.section_hash("data"),
                    C.dump_section(domain))
        out = self.data_dir(domain.name)
        self._stage("prepare", domain.name, key, [out / "manifest.json"],
                    lambda: corpora.prepare_domain(domain, self.cfg.data, tokenizer, out))

    def calibrate(self) -> None:
        from minigpt import calibrate as K, corpora

        cfg = self.cfg
        calib_key = {d.name: _hash(self.keys[("prepare", d.name)], cfg.model.dtype, cfg.calibrate.dtype,
                                   cfg.calibrate.batch_size, self.spec) for d in cfg.domains}
        todo = [d.name for d in cfg.domains
                if not self.book.is_done("calibrate", d.name, calib_key[d.name], [self.profile_path(d.name)])]
        for d in cfg.domains:
            self.keys[("calibrate", d.name)] = calib_key[d.name]
        if not todo:
            print("[pipeline] calibrate: done (skipped)", flush=True)
            return
        shards = []
        for name in todo:
            data = corpora.DomainData.load(self.data_dir(name))
            shards += [K.Shard(f"{name}/{calib_key[name]}/{p.stem}", name, str(p)) for p in data.shards("calib")]
        for name in todo:
            self.book.mark("calibrate", name, calib_key[name], "running")
        ledger = self.run_dir / "profiles" / "_ledger"
        try:
            K.run_shards(shards, self.cfg.model, cfg.calibrate, ledger, self.spec)
        except BaseException as e:
            for name in todo:
                self.book.mark("calibrate", name, calib_key[name], "failed", error=f"{e.__class__.__name__}: {e}")
            raise
        for name in todo:  # one domain's profile in memory at a time (Gram statistics are large)
            mine = [s for s in shards if s.domain == name]
            profile = K.merge_ledger(ledger, mine)
            K.save_profile(self.profile_path(name), profile,
                           {"model": cfg.model.source, "domain": name, "shards": len(mine),
                            "calibrate_dtype": cfg.calibrate.dtype})
            print(K.summarize(name, profile), flush=True)
            del profile
            self.book.mark("calibrate", name, calib_key[name], "done", outputs=[str(self.profile_path(name))])

    def profile_path(self, domain: str) -> Path:
        return self.run_dir / "profiles" / f"{domain}.safetensors"

    def plan_path(self, domain: str) -> Path:
        return self.run_dir / "plans" / f"{domain}.json"

    def expert_dir(self, domain: str, kind: str) -> Path:
        return self.run_dir / "experts" / domain / kind

    def search_path(self, domain: str) -> Path:
        return self.run_dir / "search" / f"{domain}.json"

    def search(self) -> None:
        """NSGA-II over expert shapes per domain, cut from the profile; writes the front and its plot."""
        from minigpt import calibrate as K, corpora, search as SE

        cfg = self.cfg
        for d in cfg.domains:
            key = _hash(self.keys[("calibrate", d.name)], cfg.section_hash("search"))
            out = self.search_path(d.name)

            def work(name=d.name, out=out):
                stats, _ = K.load_profile(self.profile_path(name))
                data = corpora.DomainData.load(self.data_dir(name))
                texts = [t for _, t in data.documents(cfg.search.split)]
                res = SE.search_domain(stats, self.model_dir, texts, cfg.search, domain=name,
                                       block_size=cfg.data.block_size, base_model=cfg.model.source,
                                       profile=str(self.profile_path(name)), dtype=cfg.model.dtype)
                SE.plot_front(res, out.with_suffix(".png"))
                SE.write_front(out, res)
                print(f"[search] {name}: front of {len(res.front)} shape(s), "
                      f"{len(res.history)} evaluated", flush=True)

            self._stage("search", d.name, key, [out, out.with_suffix(".png")], work)

    def picked_plans(self, domain: str):
        """Plans the search picked for this domain (search.points of them, or one within search.budget)."""
        from minigpt import search as SE

        result = SE.SearchResult.from_json(SE.load_front(self.search_path(domain)))
        picked = SE.pick(result, self.cfg.search.points, self.cfg.search.budget)
        if not picked:
            raise ConfigError(f"search found no plan for domain {domain!r} that removes anything; "
                              "widen search.mlp_fractions or raise search.generations")
        return picked

    def slim(self) -> None:
        from minigpt import calibrate as K, corpora, models, slim as SL

        cfg = self.cfg
        dense = None
        tokenizer = None
        contrastive = cfg.prune.method == "cus-prun"
        for d in cfg.domains:
            # cus-prun contrasts a domain with the others, so its plan depends on their profiles too.
            upstream = [self.keys[("calibrate", o.name)] for o in cfg.domains if contrastive or o.name == d.name]
            if cfg.search.enabled:  # the searched shape replaces the fixed-ratio plan
                upstream = [self.keys[("search", d.name)]]
            key = _hash(upstream, cfg.section_hash("prune"), cfg.search.enabled)

            def work(name=d.name):
                nonlocal dense, tokenizer
                if dense is None:
                    dense = models.load_model(self.model_dir, "float32", cfg.model.trust_remote_code)
                    tokenizer = models.load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
                if cfg.search.enabled:
                    # The picked shapes are compensated like fixed-ratio plans when prune.reconstruct is on; the
                    # search itself scores its candidates uncompensated (known limit, see the README).
                    stats, weights = (K.load_profile(self.profile_path(name))[0] if cfg.prune.reconstruct
                                      else None), None
                    picked = [dataclasses.replace(p, reconstruct=cfg.prune.reconstruct, damp=cfg.prune.damp)
                              for p in self.picked_plans(name)]
                    plan = picked[0]
                    for k, extra in enumerate(picked[1:], start=1):  # further front points: slimmed and evaluated
                        small, tok = SL.slim_expert(dense, tokenizer, extra, stats)
                        SL.save_expert(small, tok, self.expert_dir(name, f"search-{k}"))
                elif cfg.prune.sequential:
                    stats = K.load_profile(self.profile_path(name))[0]
                    plan, weights = self._sequential_plan(name, dense, tokenizer, stats)
                else:
                    stats, weights = K.load_profile(self.profile_path(name))[0], None
                    plan = self._fixed_ratio_plan(name, dense, tokenizer, stats)
                small, tok = SL.slim_expert(dense, tokenizer, plan, stats, weights)
                total, non_emb = models.count_parameters(small)
                if (total, non_emb) != (plan.params["total"], plan.params["non_embedding"]):
                    raise RuntimeError(f"slimmed {name} has {total}/{non_emb} parameters, plan predicts "
                                       f"{plan.params['total']}/{plan.params['non_embedding']}")
                SL.save_expert(small, tok, self.expert_dir(name, "pruned"))
                if plan.vocab_keep is not None:
                    # The expert's token ids differ from the base's: its train split is re-tokenized for recovery.
                    data = corpora.DomainData.load(self.data_dir(name))
                    corpora.retokenize(data.documents("train"), tok, cfg.data.block_size, cfg.data.blocks_per_shard,
                                       self.expert_dir(name, "train"))
                plan.save(self.plan_path(name))
                dense_ne = plan.params["dense_non_embedding"]
                print(f"[slim] {name}: {plan.method}, MLP {plan.intermediate_size} -> {plan.mlp_width}, "
                      f"KV groups {plan.kv_groups} -> {plan.kv_width or plan.kv_groups}"
                      + (f" ({plan.q_width} query heads each)" if plan.q_width else "")
                      + f", layers {plan.num_layers} -> "
                      f"{plan.num_layers - len(plan.dropped_layers)}"
                      + (f", vocab {plan.vocab_size} -> {len(plan.vocab_keep)}" if plan.vocab_keep else "")
                      + (", kept weights refit by least squares" if plan.reconstruct and not plan.replace else "")
                      + (f", dropped layers {list(plan.dropped_layers)} replaced by a linear map" if plan.replace
                         else "")
                      + f"; non-embedding {dense_ne / 1e6:.1f}M -> {non_emb / 1e6:.1f}M "
                      f"({1 - non_emb / dense_ne:.1%} removed)", flush=True)

            self._stage("slim", d.name, key, [self.plan_path(d.name), self.expert_dir(d.name, "pruned")], work)

    def _sequential_plan(self, name: str, dense, tokenizer, stats):
        """Layer-by-layer choice and refit on Ray actors that each keep the activations of a share of the domain's
        calibration blocks (minigpt.sequential)."""
        import ray

        from minigpt import corpora, plan as P, sequential as Q
        from minigpt.models import decoder_layers

        cfg = self.cfg
        blocks = corpora.read_blocks(corpora.DomainData.load(self.data_dir(name)).shards("calib"))
        shares = [s for s in blocks.tensor_split(min(cfg.calibrate.workers, len(blocks))) if len(s)]
        runners = Q.ray_runners(str(self.model_dir), shares, cfg.calibrate.batch_size, cfg.calibrate.dtype,
                                cfg.calibrate.cpus_per_worker, cfg.calibrate.gpus_per_worker)
        vocab = P.vocab_keep(stats["token_counts"], tokenizer, cfg.prune.vocab_min_count) if cfg.prune.vocab else None
        n_layers = len(decoder_layers(dense))
        try:
            return Q.prune_sequential(dense, runners, cfg.prune, domain=name, remote=True, vocab=vocab,
                                      base_model=cfg.model.source, profile=str(self.profile_path(name)),
                                      on_layer=lambda i: print(f"[slim] {name}: sequential, layer {i + 1}/{n_layers}"
                                                               " pruned and refit", flush=True))
        finally:
            for r in runners:
                ray.kill(r)

    def _fixed_ratio_plan(self, name: str, dense, tokenizer, stats):
        from minigpt import calibrate as K, corpora, plan as P, stats as S

        cfg = self.cfg
        others = {o.name: K.load_profile(self.profile_path(o.name))[0]
                  for o in cfg.domains if o.name != name} if cfg.prune.method == "cus-prun" else None
        grad = None
        replaced = cfg.prune.reconstruct and (cfg.prune.method == "depth" or cfg.prune.allocate)
        if cfg.prune.method == "taylor" or replaced:
            # Gradients (one backward pass over part of the calibration split): first-order Taylor importance, and
            # the loss gradient of the residual stream that prices the allocation's and the replaced span's errors.
            data = corpora.DomainData.load(self.data_dir(name))
            blocks = corpora.read_blocks(data.shards("calib"))[: cfg.prune.taylor_blocks]
            grad = S.taylor_sums(dense, blocks, cfg.calibrate.batch_size)
        return P.build_plan(stats, dense, cfg.prune, domain=name, other_profiles=others, grad_stats=grad,
                            tokenizer=tokenizer, base_model=cfg.model.source, profile=str(self.profile_path(name)))

    def train_shards(self, domain: str) -> list[Path]:
        """Base-tokenized train shards, or the expert's own when its vocabulary was pruned."""
        from minigpt import corpora

        own = self.expert_dir(domain, "train")
        if own.is_dir():
            return sorted(own.glob("shard-*.parquet"))
        return corpora.DomainData.load(self.data_dir(domain)).shards("train")

    def recover(self) -> dict:
        from minigpt import plan as P, recover as R

        cfg = self.cfg
        tasks, keys = [], {}
        for d in cfg.domains:
            key = _hash(self.keys[("slim", d.name)], cfg.section_hash("recover"))
            keys[d.name] = key
            self.keys[("recover", d.name)] = key
            out = self.expert_dir(d.name, "recovered")
            if self.book.is_done("recover", d.name, key, [out]):
                print(f"[pipeline] recover/{d.name}: done (skipped)", flush=True)
                continue
            ckpt = self.run_dir / "experts" / d.name / "checkpoints"
            prev = self.book.read("recover", d.name)
            if prev and prev.get("key") != key and ckpt.exists():
                shutil.rmtree(ckpt)  # checkpoints of other settings must not be resumed
            plan = P.PruningPlan.load(self.plan_path(d.name))
            distill = cfg.recover.mode == "distill"
            tasks.append(R.RecoveryTask(domain=d.name, student_dir=str(self.expert_dir(d.name, "pruned")),
                                        train_shards=tuple(str(p) for p in self.train_shards(d.name)),
                                        out_dir=str(out), checkpoint_dir=str(ckpt),
                                        teacher_dir=str(self.model_dir) if distill else None,
                                        teacher_token_ids=tuple(plan.vocab_keep)
                                        if distill and plan.vocab_keep is not None else None))
            self.book.mark("recover", d.name, key, "running")
        if not tasks:
            return {}
        results = R.recover_all(tasks, cfg.recover)
        ok, failed = [], []
        for t in tasks:
            r = results.get(t.domain)
            if r is not None and r.ok:
                # The expert is final; its DeepSpeed checkpoints (GBs on real models) are no longer needed.
                shutil.rmtree(t.checkpoint_dir, ignore_errors=True)
                self.book.mark("recover", t.domain, keys[t.domain], "done", outputs=[t.out_dir],
                               steps=r.steps, final_loss=r.losses[-1] if r.losses else None,
                               tokens_per_s=r.tokens_per_s)
                ok.append(t.domain)
            else:
                err = r.error if r is not None else "no result"
                self.book.mark("recover", t.domain, keys[t.domain], "failed", error=err)
                failed.append(f"{t.domain} ({err.splitlines()[0] if err else '?'})")
        print(f"[recover] succeeded: {', '.join(ok) or 'none'}; failed: {', '.join(failed) or 'none'}", flush=True)
        return results

    def quantize(self) -> None:
        """int8 weight quantization of each domain's final expert (recovered when it exists, else pruned)."""
        from minigpt import quantize as Q

        cfg = self.cfg
        for d in cfg.domains:
            rec_ok = (self.book.read("recover", d.name) or {}).get("status") == "done"
            src = self.expert_dir(d.name, "recovered" if rec_ok else "pruned")
            upstream = self.keys.get(("recover", d.name)) if rec_ok else self.keys[("slim", d.name)]
            key = _hash(upstream, str(src), cfg.section_hash("quantize"))
            out = self.expert_dir(d.name, "int8")
            self._stage("quantize", d.name, key, [out],
                        lambda src=src, out=out: Q.quantize_expert(src, out, cfg.quantize))

    def model_table(self) -> dict[str, str]:
        models = {"dense": str(self.model_dir)}
        for d in self.cfg.domains:
            pruned, recovered = self.expert_dir(d.name, "pruned"), self.expert_dir(d.name, "recovered")
            if pruned.is_dir():
                models[f"{d.name}/pruned"] = str(pruned)
            # A recovered folder counts only when its stage is recorded as done (not a leftover of a failed run).
            if self.cfg.recover.enabled and recovered.is_dir() and \
                    (self.book.read("recover", d.name) or {}).get("status") == "done":
                models[f"{d.name}/recovered"] = str(recovered)
            extras = sorted(p for p in (self.run_dir / "experts" / d.name).glob("search-*") if p.is_dir())
            if self.cfg.quantize.enabled:
                extras.append(self.expert_dir(d.name, "int8"))
            for p in extras:
                if p.is_dir():
                    models[f"{d.name}/{p.name}"] = str(p)
        return models

    def evaluate(self) -> dict:
        from minigpt import evaluate as E

        cfg = self.cfg
        models = self.model_table()
        upstream = [self.keys.get((s, d.name)) for d in cfg.domains for s in ("prepare", "slim", "recover",
                                                                              "quantize")]
        key = _hash(upstream, sorted(models), cfg.section_hash("evaluate"))
        out = self.run_dir / "eval.json"
        self._stage("evaluate", None, key, [out], lambda: E.evaluate_run(
            self.run_dir, models, [d.name for d in cfg.domains], cfg.evaluate, cfg.data.block_size))
        self.keys[("evaluate", None)] = key
        return json.loads(out.read_text())

    def summarize(self, eval_data: dict) -> dict:
        rows = {}
        models = eval_data["models"]
        dense = models["dense"]
        for d in self.cfg.domains:
            row = {"dense_ppl": dense["domains"][d.name]["ppl"], "dense_bpb": dense["domains"][d.name]["bits_per_byte"]}
            for kind in ("pruned", "recovered"):
                m = models.get(f"{d.name}/{kind}")
                if m:
                    row[f"{kind}_ppl"] = m["domains"][d.name]["ppl"]
                    row[f"{kind}_bpb"] = m["domains"][d.name]["bits_per_byte"]
                    row[f"{kind}_non_embedding"] = m["size"]["non_embedding_params"]
            row["dense_non_embedding"] = dense["size"]["non_embedding_params"]
            if "pruned_non_embedding" in row:
                row["removed_fraction"] = 1 - row["pruned_non_embedding"] / row["dense_non_embedding"]
            rec = self.book.read("recover", d.name)
            row["recover_status"] = rec.get("status") if rec else ("disabled" if not self.cfg.recover.enabled else "?")
            rows[d.name] = row
        summary = {"job": self.cfg.name, "model": self.cfg.model.source, "method": self.cfg.prune.method,
                   "target": self.cfg.prune.target, "domains": rows}
        _atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def report(self, eval_data: dict, summary: dict) -> None:
        from minigpt import report as RP

        plans = {d.name: json.loads(self.plan_path(d.name).read_text()) for d in self.cfg.domains
                 if self.plan_path(d.name).is_file()}
        searches = {}
        if self.cfg.search.enabled:
            for d in self.cfg.domains:
                path = self.search_path(d.name)
                if path.is_file() and path.with_suffix(".png").is_file():
                    searches[d.name] = {"front": json.loads(path.read_text())["front"],
                                        "png": path.with_suffix(".png").read_bytes()}
        key = _hash(self.keys.get(("evaluate", None)), summary, sorted(searches))
        self._stage("report", None, key, [self.run_dir / "report.md", self.run_dir / "report.html"],
                    lambda: RP.write_report(self.run_dir, eval_data, plans, {"name": self.cfg.name},
                                            searches=searches))


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.2f}"


def print_table(summary: dict) -> None:
    head = f"{'domain':<12}{'dense ppl':>11}{'pruned ppl':>12}{'recovered':>11}{'bpb dense':>11}{'bpb rec':>9}" \
           f"{'removed':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in summary["domains"].items():
        removed = r.get("removed_fraction")
        print(f"{name:<12}{_fmt(r.get('dense_ppl')):>11}{_fmt(r.get('pruned_ppl')):>12}"
              f"{_fmt(r.get('recovered_ppl')):>11}{_fmt(r.get('dense_bpb')):>11}{_fmt(r.get('recovered_bpb')):>9}"
              f"{(f'{removed:.1%}' if removed is not None else '-'):>9}")
    print(flush=True)


def status(run_dir: Path) -> list[dict]:
    """Each stage and domain with its state: done, running, failed, pending (from the manifests)."""
    book = StageBook(Path(run_dir))
    records = book.all()
    job = Path(run_dir) / "job.yaml"
    domains: list[str] = []
    optional = {"search": False, "quantize": False, "recover": True}  # stages a job may leave out
    if job.is_file():
        try:
            cfg = C.load(job)
            domains = [d.name for d in cfg.domains]
            optional = {"search": cfg.search.enabled, "quantize": cfg.quantize.enabled,
                        "recover": cfg.recover.enabled}
        except ConfigError:
            domains = []
    seen = {(r["stage"], r.get("domain")) for r in records}
    rows = []
    for r in records:
        state = r["status"]
        if state == "running" and not _pid_alive(r.get("pid")):
            state = "interrupted"
        rows.append({"stage": r["stage"], "domain": r.get("domain"), "status": state, "error": r.get("error")})
    for stage in STAGES:
        if not optional.get(stage, True):
            continue
        targets = [None] if stage in ("evaluate", "report") else domains
        for d in targets:
            if (stage, d) not in seen:
                rows.append({"stage": stage, "domain": d, "status": "pending", "error": None})
    order = {s: i for i, s in enumerate(STAGES)}
    rows.sort(key=lambda r: (order.get(r["stage"], 99), r["domain"] or ""))
    return rows


def _pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def run_job(cfg: JobConfig, job_path: str | None = None) -> dict:
    return Pipeline(cfg, job_path).run()
