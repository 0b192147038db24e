"""The whole job on a tiny model: end to end, rerun, changed settings, resumable after the driver is killed; the stage
table's bookkeeping. (`ray job submit` and the other whole-job variants: test_pipeline_jobs.py, so that `make test`'s
two workers can run both modules at once.)"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt.pipeline import status
from tests.jobs_tiny import REPO, run_cli, tiny_env, write_tiny_job



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smollm2_dir):
    """One uninterrupted run of the tiny job; other tests compare against it."""
    root = tmp_path_factory.mktemp("tiny-clean")
    job = write_tiny_job(root, str(smollm2_dir))
    proc = run_cli(job)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, job, proc


@pytest.mark.ray
@pytest.mark.slow
def test_end_to_end_outputs(finished_run):
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, proc = finished_run
    run = root / "run"
    summary = json.loads((run / "summary.json").read_text())
    for domain in ("alpha", "beta"):
        row = summary["domains"][domain]
        assert row["recover_status"] == "done"
        # Validation before training and every 2 of the 3 steps, against the dense model's score.
        rec = row["recovery"]
        assert [h["step"] for h in rec["curve"]] == [0, 2, 3] and rec["dense_valid_bpb"] > 0
        manifest = json.loads((run / "experts" / domain / "recovered" / "_manifest.json").read_text())
        assert manifest["general_blocks"] == math.ceil(manifest["train_blocks"] * 0.25 / 0.75)  # replay share
        assert row["pruned_non_embedding"] < row["dense_non_embedding"]
        for kind in ("pruned", "recovered"):
            path = run / "experts" / domain / kind
            model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers, no minigpt
            AutoTokenizer.from_pretrained(path)
            assert model.config.intermediate_size < 64
            # A model card with the measured figures, and the terms (the tiny base states no licence: `other`).
            meta = yaml.safe_load((path / "README.md").read_text().split("---\n")[1])
            assert meta["license"] == "other" and meta["library_name"] == "transformers"
            held = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
            assert held["perplexity"] == round(row[f"{kind}_ppl"], 4)
            assert "modified derivative" in (path / "NOTICE").read_text()
        assert f"{domain}" in proc.stdout and "recovered" in proc.stdout
        # Out-of-source text: every expert scored on it with a paired interval; the worst text named.
        oos = row["oos"]["questions"]
        for kind in ("pruned", "recovered"):
            lo, hi = oos[f"{kind}_ppl_ratio_ci"]
            assert lo <= oos[f"{kind}_ppl_ratio"] <= hi
            assert row[f"{kind}_oos_worst"]["source"] == "questions"
    assert "out of source, worst text" in proc.stdout and "(questions)" in proc.stdout
    assert "[card] warning: the licence of base model" in proc.stdout
    head = (run / "report.md").read_text().split("## Quality per domain")[0]
    assert "out-of-source ppl ÷ dense, worst text" in head and "text from other sources" in head
    assert (run / "report.html").is_file() and (run / "eval.json").is_file()
    assert all(r["status"] == "done" for r in status(run)), status(run)
    # Recovery trains on the domain's train split and must lower perplexity on its held-out split (documents no
    # earlier stage saw) below the pruned expert's, as measured in eval.json and reported in summary.json.
    models = json.loads((run / "eval.json").read_text())["models"]
    for domain in ("alpha", "beta"):
        pruned = models[f"{domain}/pruned"]["domains"][domain]["ppl"]
        recovered = models[f"{domain}/recovered"]["domains"][domain]["ppl"]
        assert recovered < 0.9 * pruned, (domain, pruned, recovered)
        assert summary["domains"][domain]["recovered_ppl"] == recovered


def _manifests(run: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (run / "_stages").glob("*.json")}


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_skips_everything(finished_run):
    root, job, _ = finished_run
    before = _manifests(root / "run")
    proc = run_cli(job)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done (skipped)") >= 9
    assert _manifests(root / "run") == before


@pytest.mark.ray
@pytest.mark.slow
def test_changed_setting_reruns_only_what_depends_on_it(finished_run, tmp_path):
    import shutil

    root, job, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    before = _manifests(copy)
    # An evaluation setting: only evaluate and report run again. (Which stages each setting reaches, recovery's
    # included, is the fake-stage tests' below, on the same stage table; this one runs the real stages.)
    proc = run_cli(job, f"output_dir={copy}", "evaluate.bootstrap_samples=500")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = _manifests(copy)
    for name in before:
        stage = name.split(".")[0]
        same = before[name]["time"] == after[name]["time"]
        assert same == (stage not in ("evaluate", "report")), name
    assert json.loads((copy / "eval.json").read_text())["models"].keys() == \
        json.loads((root / "run" / "eval.json").read_text())["models"].keys()


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_result(finished_run, tmp_path, smollm2_dir):
    root, _, _ = finished_run
    job = write_tiny_job(tmp_path, str(smollm2_dir))
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "run", str(job), "ray.num_cpus=2"], cwd=REPO,
                            env=tiny_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    slim_done = tmp_path / "run" / "_stages" / "slim.beta.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if slim_done.is_file() and json.loads(slim_done.read_text())["status"] == "done":
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        # Kill the driver and everything it started (its embedded Ray), by their own ids.
        victims = [proc.pid] + _descendants(proc.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    done_before = {k: v for k, v in _manifests(tmp_path / "run").items() if v["status"] == "done"}
    assert any(k.startswith("slim.") for k in done_before)
    assert any(r["status"] == "interrupted" for r in status(tmp_path / "run")) or \
        any(r["status"] == "pending" for r in status(tmp_path / "run"))

    resumed = run_cli(job)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    after = _manifests(tmp_path / "run")
    for name, m in done_before.items():
        assert after[name]["time"] == m["time"], f"{name} was redone"
    # Same inputs, same seeds: the outputs equal those of the uninterrupted run.
    clean, resumed_run = root / "run", tmp_path / "run"
    for domain in ("alpha", "beta"):
        plans = [json.loads((r / "plans" / f"{domain}.json").read_text()) for r in (clean, resumed_run)]
        for p in plans:  # paths differ between the two run folders; everything else must not
            p.pop("base_model", None), p.pop("profile", None)
        assert plans[0] == plans[1]
        from safetensors.torch import load_file

        for kind in ("pruned", "recovered"):
            a = load_file(clean / "experts" / domain / kind / "model.safetensors")
            b = load_file(resumed_run / "experts" / domain / kind / "model.safetensors")
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ea = json.loads((clean / "eval.json").read_text())["models"]
    eb = json.loads((resumed_run / "eval.json").read_text())["models"]
    for label in ea:
        for d, m in ea[label]["domains"].items():
            assert abs(m["loss"] - eb[label]["domains"][d]["loss"]) < 1e-4


# ------------------------------------------------------------------ the stage table's bookkeeping, without models


def _fake_stages(monkeypatch, on_run=None):
    """The real stage table with run functions that only create each unit's outputs (and call `on_run`)."""
    import dataclasses

    from minigpt import pipeline as PL

    def make(stage, layout, unit):
        if on_run is not None:
            on_run(stage.name, unit)
        for path in stage.outputs(layout, unit):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix:
                path.write_text("x")
            else:
                path.mkdir(exist_ok=True)

    def run_many(stage):
        def run(p, todo, keys, finish):
            for u in todo:
                make(stage, p.layout, u)
                finish(u)
        return run

    fakes = tuple(dataclasses.replace(s, extra=lambda p, u: None, run_one=None, run_many=run_many(s))
                  for s in PL.STAGES)
    monkeypatch.setattr(PL, "STAGES", fakes)
    monkeypatch.setattr(PL, "STAGE", {s.name: s for s in fakes})
    return fakes


def _run_fake(job: Path, *overrides: str) -> None:
    from minigpt import jobfile as J, pipeline as PL

    p = PL.Pipeline(J.load(job, list(overrides)))
    for stage in PL.STAGES:
        if stage.enabled(p.cfg):
            p.run_stage(stage)
    (p.layout.job_yaml).write_text(J.dump(p.cfg))


def _job(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    job = {"name": "fake", "model": str(tmp_path / "model"),
           "domains": {d: {"sources": [{"kind": "text", "path": str(tmp_path)}]} for d in ("alpha", "beta")},
           "output_dir": str(tmp_path / "run")}
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _states(run: Path) -> dict[str, str]:
    return {(f"{r['stage']}/{r['domain']}" if r["domain"] else r["stage"]): r["status"] for r in status(run)}


def test_status_marks_downstream_stale_when_recovery_is_interrupted(tmp_path, monkeypatch):
    import multiprocessing

    job = _job(tmp_path)
    _fake_stages(monkeypatch)
    _run_fake(job)
    run = tmp_path / "run"
    assert set(_states(run).values()) == {"done"}, _states(run)

    # Re-run with another recovery setting; the process dies (SIGKILL) while recovery runs.
    def die_in_recovery(stage, unit):
        if stage == "recover":
            os.kill(os.getpid(), signal.SIGKILL)

    _fake_stages(monkeypatch, die_in_recovery)
    child = multiprocessing.get_context("fork").Process(target=_run_fake, args=(job, "recover.steps=4"))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    states = _states(run)
    assert {k: v for k, v in states.items() if k.startswith(("prepare", "calibrate", "slim"))} == \
        {f"{s}/{d}": "done" for s in ("prepare", "calibrate", "slim") for d in ("alpha", "beta")}
    assert states["recover/alpha"] == states["recover/beta"] == "interrupted"
    # The evaluation and report describe the previous experts: not done any more.
    assert states["evaluate"] == states["report"] == "stale"

    # Resuming re-runs recovery and everything downstream of it, and nothing upstream.
    ran = []
    _fake_stages(monkeypatch, lambda stage, unit: ran.append(stage))
    _run_fake(job, "recover.steps=4")
    assert sorted(set(ran)) == ["evaluate", "recover", "report"]
    assert set(_states(run).values()) == {"done"}


def test_status_marks_done_units_stale_when_an_upstream_key_changed(tmp_path, monkeypatch):
    job = _job(tmp_path)
    _fake_stages(monkeypatch)
    _run_fake(job)
    run = tmp_path / "run"
    # Recovery of alpha redone with other settings, the job stopped before evaluating: evaluate and report are
    # stale, beta's units and everything upstream of recovery stay done.
    from minigpt import jobfile as J, pipeline as PL

    p = PL.Pipeline(J.load(job, ["recover.lr=0.001"]))
    monkeypatch.setattr(p, "domains", ["alpha"])
    p.run_stage(PL.STAGE["recover"])
    states = _states(run)
    assert states["recover/alpha"] == "done" and states["recover/beta"] == "done"
    assert states["evaluate"] == states["report"] == "stale"
    assert states["slim/alpha"] == "done"


def test_run_until_a_stage_stops_after_it(tmp_path, monkeypatch):
    from minigpt import jobfile as J, models, pipeline as PL, raylib
    from minigpt.config import ConfigError

    job = _job(tmp_path)
    ran = []
    _fake_stages(monkeypatch, lambda stage, unit: ran.append(stage))
    for name in ("validate", "check_statistics", "check_resources"):
        monkeypatch.setattr(PL.Pipeline, name, lambda self: None)
    monkeypatch.setattr(models, "resolve", lambda cfg, prepare=True: tmp_path / "model")
    monkeypatch.setattr(raylib, "ensure_ray", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="unknown stage 'recovery'"):
        PL.Pipeline(J.load(job)).run(until="recovery")
    assert not ran and not (tmp_path / "run").exists()
    assert PL.Pipeline(J.load(job)).run(until="slim") is None
    assert sorted(set(ran)) == ["calibrate", "general", "prepare", "slim"]  # no eval_sources: no evaltext
    states = _states(tmp_path / "run")
    done = {k for k, v in states.items() if v == "done"}
    assert done == {f"{s}/{d}" for s in ("prepare", "calibrate", "slim") for d in ("alpha", "beta")} | {"general"}
    assert {v for k, v in states.items() if k not in done} == {"pending"}
