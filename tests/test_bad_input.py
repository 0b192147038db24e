"""Bad input: one clear line on stderr, exit status 2, before expensive work, and no new files in the output folder."""

import pytest
import yaml

from minigpt.cli import main
from tests.conftest import make_tiny_llama


@pytest.fixture
def base(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n")
    job = {"name": "bad", "model": str(tmp_path / "model"),
           "domains": {"a": {"sources": [{"kind": "text", "path": str(corpus)}]}},
           "recover": {"enabled": False}, "output_dir": str(tmp_path / "run")}
    return tmp_path, job


def _run(tmp_path, job, capsys, *overrides, raw: str | None = None):
    path = tmp_path / "job.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(job))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(["run", str(path), *overrides])
    err = capsys.readouterr().err.strip()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("minigpt: error: "), err
    assert after == before, "the run left files behind"
    return err


def test_invalid_yaml(base, capsys):
    tmp, job = base
    assert "invalid YAML" in _run(tmp, job, capsys, raw="name: [oops\n")


def test_unknown_key(base, capsys):
    tmp, job = base
    job["prune"] = {"traget": 0.3}
    assert "unknown key 'prune.traget'" in _run(tmp, job, capsys)


def test_missing_source_file(base, capsys):
    tmp, job = base
    job["domains"]["a"]["sources"][0]["path"] = str(tmp / "nope" / "*.txt")
    err = _run(tmp, job, capsys)
    assert "domain 'a'" in err and "nope" in err


def test_missing_job_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "job file not found" in capsys.readouterr().err


def test_duplicate_domain_names(base, capsys):
    tmp, job = base
    text = yaml.safe_dump(job) + ""
    text = text.replace("domains:\n", "domains:\n  a:\n    sources: [{kind: hpo}]\n", 1)
    assert "duplicate key 'a'" in _run(tmp, job, capsys, raw=text)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_ratio_outside_unit_interval(base, capsys, value):
    tmp, job = base
    assert "prune.target must be in (0, 1)" in _run(tmp, job, capsys, f"prune.target={value}")


def test_unknown_model_alias(base, capsys):
    tmp, job = base
    job["model"] = "smollm9-1t"
    assert "unknown model 'smollm9-1t'" in _run(tmp, job, capsys)


def test_unsupported_architecture(base, capsys):
    tmp, job = base
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(tmp / "bloom")
    job["model"] = str(tmp / "bloom")
    err = _run(tmp, job, capsys)
    assert "unsupported architecture 'bloom'" in err and "llama" in err


def test_export_of_an_architecture_llama_cpp_cannot_take_stops_at_validation(base, capsys):
    tmp, job = base
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp / "gpt2")
    job["model"] = str(tmp / "gpt2")
    job["export"] = {"enabled": True}
    err = _run(tmp, job, capsys)
    assert "export.enabled: cannot export model_type 'gpt2' to GGUF; supported: Llama" in err and "Gemma 3" in err


def test_missing_deepspeed_config(base, capsys):
    tmp, job = base
    job["recover"] = {"enabled": True, "deepspeed_config": str(tmp / "nope.json")}
    assert "recover.deepspeed_config" in _run(tmp, job, capsys)


@pytest.mark.ray
@pytest.mark.slow
def test_empty_domain_and_too_many_resources(base, capsys, smollm2_dir, ray_local):
    """Both need Ray and the tokenizer; they share one embedded Ray to keep the suite fast."""
    tmp, job = base
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp / "model")
    job["calibrate"] = {"workers": 1, "cpus_per_worker": 64}
    assert "calibrate: one worker needs 64.0 CPU" in _run(tmp, job, capsys)
    job.pop("calibrate")
    (tmp / "corpus" / "a.txt").write_text("   \n")
    err = _run(tmp, job, capsys)
    assert "domain 'a'" in err
    (tmp / "corpus" / "a.txt").write_text("just a few words\n")
    err = _run(tmp, job, capsys)
    assert "domain 'a'" in err and "calib" in err


def test_statistics_over_the_memory_budget_stop_before_any_model_loads(base, capsys, monkeypatch):
    import minigpt.models as M

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the statistics were sized")

    monkeypatch.setattr(M, "load_model", no_loading)
    tmp, job = base
    job["calibrate"] = {"memory_budget_gb": 0.0001}
    job["prune"] = {**job.get("prune", {}), "sequential": False}  # one-shot: every layer's Gram sums in the profile
    err = _run(tmp, job, capsys)
    assert "GiB, over calibrate.memory_budget_gb=0.0001" in err and "prune.reconstruct=false" in err


@pytest.mark.parametrize("overrides,largest", [
    (["prune.target=0.99"], "cannot be reached by MLP channels alone (at most 0."),
    (["prune.method=depth", "prune.target=0.9"], "cannot be reached by dropping whole layers (at most 0.6"),
])
def test_unreachable_target_stops_before_any_model_loads(base, capsys, monkeypatch, overrides, largest):
    import minigpt.models as M

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded or prepared before the target was checked")

    monkeypatch.setattr(M, "load_model", no_loading)
    monkeypatch.setattr(M, "prepare_alias", no_loading)
    tmp, job = base
    err = _run(tmp, job, capsys, *overrides)  # one line, nothing written
    assert f"prune.target {overrides[-1].split('=')[1]} {largest}" in err, err
    assert main(["validate", str(tmp / "job.yaml"), *overrides]) == 2
    assert largest in capsys.readouterr().err


def test_a_worker_memory_limit_below_the_predicted_peak_stops_before_any_model_loads(base, capsys, monkeypatch):
    import minigpt.models as M
    from minigpt import memory

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the workers' memory was checked")

    monkeypatch.setattr(M, "load_model", no_loading)
    tmp, job = base
    sizes = memory.model_sizes(M.model_config(M.ModelConfig(source=str(tmp / "model"))))
    est = memory.predict_memory(sizes, "float32", 4, 256, 0, 0, memory.BASE_BYTES)
    peak = max(est.streamed_peak, est.runner_peak)  # the job prunes sequentially: its runners are checked too
    job["calibrate"] = {"worker_memory_gb": round(0.9 * peak / 2**30, 4), "stream_memory_gb": 0}
    err = _run(tmp, job, capsys)
    assert "calibrate.worker_memory_gb=" in err and "predicted peak" in err, err
    # Streamed, a limit a little above the predicted peak passes, where the whole model needs more.
    job["calibrate"]["worker_memory_gb"] = round(1.05 * peak / 2**30 + 0.01, 4)
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp / "job.yaml")]) == 0
    # A model that cannot fit even streamed: the predicted peak above every Ray node's memory stops the run once Ray
    # is up, before any stage, naming what to change.
    from minigpt import raylib

    monkeypatch.setattr(raylib, "largest_node_memory", lambda: 0.5 * peak)
    capsys.readouterr()
    assert main(["run", str(tmp / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Ray's own start-up line
    assert err.startswith("minigpt: error: ") and "more than the largest Ray node's memory" in err, err
    assert "calibrate.batch_size" in err and not (tmp / "run").exists()


def test_a_recovery_worker_limit_below_its_predicted_peak_stops_before_anything_runs(base, capsys):
    """recover.worker_memory_gb is checked at validation against a trainer worker's predicted peak (the expert
    sized from the dense config and prune.target), naming the setting and what the worker needs."""
    tmp, job = base
    job["recover"] = {"enabled": True, "mode": "full", "worker_memory_gb": 0.01}
    err = _run(tmp, job, capsys)
    assert "recover.worker_memory_gb=0.01 is below a trainer worker's predicted peak" in err, err
    job["recover"]["worker_memory_gb"] = 8
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp / "job.yaml")]) == 0
    assert "[memory] each recovery worker:" in capsys.readouterr().out
