"""minigpt from any directory: `python -m minigpt` run from a folder that is neither the repository nor the job's
(nothing installed: the checkout is on PYTHONPATH). Paths in a job file are relative to the job file, output_dir to
the current directory, and the job.yaml a run writes holds absolute paths."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minigpt import config as C
from tests.jobs_tiny import general_sources, write_tiny_job

REPO = Path(__file__).resolve().parents[1]


def _minigpt(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINIGPT_DASHBOARD="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "minigpt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _relative_tiny_job(root: Path, tokenizer_dir: str) -> Path:
    """The tiny job with every path written relative to its file, and a DeepSpeed config of its own beside it."""
    job = write_tiny_job(root, tokenizer_dir, recover__general_sources=general_sources(root))
    raw = yaml.safe_load(job.read_text())
    prefix = f"{root}/"
    raw["model"] = raw["model"].removeprefix(prefix)
    for dom in raw["domains"].values():
        for src in dom["sources"] + dom["eval_sources"]:
            src["path"] = src["path"].removeprefix(prefix)
    for src in raw["recover"]["general_sources"]:
        src["path"] = src["path"].removeprefix(prefix)
    (root / "ds").mkdir()
    shutil.copy(C.packaged_deepspeed("zero2.json"), root / "ds" / "zero2.json")
    raw["recover"]["deepspeed_config"] = "ds/zero2.json"
    raw["output_dir"] = "run"  # relative to the current directory
    assert str(root) not in yaml.safe_dump(raw)
    job.write_text(yaml.safe_dump(raw, sort_keys=False))
    return job


def test_validate_the_demo_job_from_another_directory(tmp_path):
    proc = _minigpt(tmp_path, "validate", str(REPO / "jobs" / "demo.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"output {tmp_path / 'runs' / 'demo'}" in proc.stdout  # output_dir: the current directory
    assert list(tmp_path.iterdir()) == []  # validate writes nothing


@pytest.mark.ray
@pytest.mark.slow
def test_relative_job_validates_and_prepares_from_another_directory(tmp_path, smollm2_dir):
    root, cwd, third = tmp_path / "proj", tmp_path / "cwd", tmp_path / "third"
    for d in (root, cwd, third):
        d.mkdir()
    job = _relative_tiny_job(root, str(smollm2_dir))
    proc = _minigpt(cwd, "validate", str(job))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _minigpt(cwd, "run", str(job), "ray.num_cpus=2", "--until", "prepare")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = cwd / "run"
    assert all((run / "data" / d / "manifest.json").is_file() for d in ("alpha", "beta"))
    written = yaml.safe_load((run / "job.yaml").read_text())
    assert written["model"]["source"] == str(root / "model") and written["output_dir"] == str(run)
    assert written["domains"]["alpha"]["sources"][0]["path"] == str(root / "corpus" / "alpha")
    assert written["domains"]["alpha"]["eval_sources"][0]["path"] == str(root / "corpus" / "alpha-other")
    assert written["recover"]["general_sources"][0]["path"] == str(root / "corpus" / "general")
    assert written["recover"]["deepspeed_config"] == str(root / "ds" / "zero2.json")
    # status reads that job.yaml from anywhere and sees the same run.
    proc = _minigpt(third, "status", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(line.split() for line in proc.stdout.splitlines())
    assert rows["prepare/alpha"] == rows["prepare/beta"] == "done" and rows["calibrate/alpha"] == "pending"
    assert list(third.iterdir()) == []
