"""A job's run folder and what every stage shares: the paths (`RunLayout`), the per-stage manifests (`StageBook`)
and the running job (`Run`: its config, the resolved base model, loaded once). minigpt.stages reads and writes only
through these; minigpt.pipeline, above both, decides which stage runs when.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from minigpt import models
from minigpt.jobfile import JobConfig
from minigpt.io import atomic_write_text

@dataclass(frozen=True)
class RunLayout:
    """Every path of a run folder (docs/contracts.md); stages read and write only through it."""

    run_dir: Path

    def data_dir(self, domain: str) -> Path:
        return self.run_dir / "data" / domain

    @property
    def general(self) -> Path:
        """general/: the general text calibrated beside the domains (minigpt.general), as token shards."""
        return self.run_dir / "general"

    @property
    def general_profile(self) -> Path:
        return self.run_dir / "profiles" / "_general.safetensors"

    def evaltext(self, domain: str) -> Path:
        """evaltext/<domain>: the domain's out-of-source evaluation sets (minigpt.evaltext)."""
        return self.run_dir / "evaltext" / domain

    def profile(self, domain: str) -> Path:
        return self.run_dir / "profiles" / f"{domain}.safetensors"

    @property
    def ledger(self) -> Path:
        return self.run_dir / "profiles" / "_ledger"

    def search(self, domain: str) -> Path:
        return self.run_dir / "search" / f"{domain}.json"

    def search_png(self, domain: str) -> Path:
        return self.run_dir / "search" / f"{domain}.png"

    def plan(self, domain: str) -> Path:
        return self.run_dir / "plans" / f"{domain}.json"

    def expert(self, domain: str, kind: str) -> Path:
        """experts/<domain>/<kind>: pruned, recovered, int8, train / valid (re-tokenized shards), search-<k>."""
        return self.run_dir / "experts" / domain / kind

    def teacher(self, domain: str) -> Path:
        """teacher/<domain>: the dense model's targets (minigpt.teacher) and the general replay shards."""
        return self.run_dir / "teacher" / domain

    def checkpoints(self, domain: str) -> Path:
        return self.expert(domain, "checkpoints")

    @property
    def job_yaml(self) -> Path:
        return self.run_dir / "job.yaml"

    @property
    def eval_json(self) -> Path:
        return self.run_dir / "eval.json"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def stages(self) -> Path:
        return self.run_dir / "_stages"


Unit = str | None  # a domain, or None for a stage of the whole job


class StageBook:
    """The `_stages/` folder: one JSON manifest per stage (and domain) with status, key, upstream and outputs."""

    def __init__(self, layout: RunLayout):
        self.dir = layout.stages

    def path(self, stage: str, unit: Unit) -> Path:
        return self.dir / (f"{stage}.{unit}.json" if unit else f"{stage}.json")

    def read(self, stage: str, unit: Unit = None) -> dict | None:
        try:
            return json.loads(self.path(stage, unit).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def mark(self, stage: str, unit: Unit, key: str, status: str, **extra) -> None:
        record = {"stage": stage, "domain": unit, "key": key, "status": status, "time": time.time(),
                  "pid": os.getpid(), **extra}
        atomic_write_text(self.path(stage, unit), json.dumps(record, indent=1, default=str))

    def restore(self, stage: str, unit: Unit, previous: dict | None) -> None:
        if previous is None:
            self.path(stage, unit).unlink(missing_ok=True)
        else:
            atomic_write_text(self.path(stage, unit), json.dumps(previous, indent=1, default=str))

    def all(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]


class Run:
    """The state the stages of one job share: the job, its run folder and stage book, the base model (resolved by
    the pipeline before any stage runs) and its tokenizer and float32 weights, loaded once."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.layout = RunLayout(Path(cfg.output_dir))
        self.book = StageBook(self.layout)
        self.domains = [d.name for d in cfg.domains]
        self.model_dir: Path | None = None
        self.spec = None  # the StatSpec calibration collects (check_statistics)
        self.worker_peak: tuple[int, str, bool] | None = None  # (bytes, whose, streamed): check_worker_memory
        self.summary: dict | None = None  # summary.json, once the evaluation is done (the report's input)
        self._tokenizer = None
        self._dense = None

    def tokenizer(self):
        """The base model's tokenizer (loaded once)."""
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.model_dir, self.cfg.model.trust_remote_code)
        return self._tokenizer

    def dense(self):
        """The base model in float32 and its tokenizer, loaded once for every domain's slimming."""
        if self._dense is None:
            self._dense = models.load_model(self.model_dir, "float32", self.cfg.model.trust_remote_code)
        return self._dense, self.tokenizer()

    def done(self, stage: str, unit: Unit) -> bool:
        return (self.book.read(stage, unit) or {}).get("status") == "done"
