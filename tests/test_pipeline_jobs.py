"""Whole tiny jobs beside test_pipeline.py's: submitted with `ray job submit` to a local cluster (search and int8
quantization riding along), and contrastive pruning with KV groups, vocabulary pruning and distillation under
worker memory limits (the streamed general text, teacher and evaluation, no latency)."""

import json

import pytest

from tests.jobs_tiny import run_cli, write_tiny_job


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_on_a_local_cluster(tmp_path, smollm2_dir):
    from tests.clusterlib import start_local_cluster, stop_local_cluster, submit_job

    # The architecture search (Ray actors) and int8 quantization ride along, so they run on a real cluster too.
    job = write_tiny_job(tmp_path, str(smollm2_dir), recover=False, search__enabled=True,
                         search__population=4, search__generations=2, search__eval_blocks=2, search__workers=1,
                         search__cpus_per_worker=0.5, quantize__enabled=True)
    cluster = start_local_cluster(tmp_path / "ray-local", workers=1, cpus_per_node=2)
    try:
        result = submit_job(cluster, ["python", "-m", "minigpt", "run", str(job)], timeout=400)
        assert result.status == "SUCCEEDED", result.logs[-3000:]
        for line in ("[calibrate]", "[search] alpha", "[pipeline] quantize/beta: done", "[pipeline] evaluate: done"):
            assert line in result.logs, line
        run = tmp_path / "run"
        summary = json.loads((run / "summary.json").read_text())
        assert set(summary["domains"]) == {"alpha", "beta"}
        front = json.loads((run / "search" / "alpha.json").read_text())
        assert front["front"] and (run / "search" / "alpha.png").is_file()
        evaluated = json.loads((run / "eval.json").read_text())["models"]
        assert {"alpha/int8", "beta/int8", "alpha/pruned"} <= set(evaluated)
        html = (run / "report.html").read_text()
        assert "Pareto front" in html and "alpha/int8" in html
    finally:
        stop_local_cluster(cluster)


@pytest.mark.ray
@pytest.mark.slow
def test_contrastive_kv_vocab_pruning_with_distillation(tmp_path, smollm2_dir):
    """cus-prun + KV groups + vocabulary pruning + distillation from the dense teacher, through the whole job, with
    every worker's memory limited."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = write_tiny_job(tmp_path, str(smollm2_dir), steps=2)
    # Worker memory limits: the general text is sampled streamed (a KV cache, one layer resident), the teacher and
    # evaluation stream the models, and recovery's workers ask Ray for the memory checked against their prediction.
    proc = run_cli(job, "prune.method=cus-prun", "prune.kv_groups=1", "prune.vocab=true", "recover.mode=distill",
                   "prune.target=0.3", "calibrate.worker_memory_gb=2", "recover.worker_memory_gb=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("[memory] each recovery worker:", "[general] sampled 8/8 blocks", "[evaluate] speed not measured"):
        assert line in proc.stdout, line
    run = tmp_path / "run"
    assert all(m["speed"] is None for m in json.loads((run / "eval.json").read_text())["models"].values())
    for domain in ("alpha", "beta"):
        plan = json.loads((run / "plans" / f"{domain}.json").read_text())
        assert plan["method"] == "cus-prun" and plan["vocab_keep"] and len(plan["vocab_keep"]) < 49152
        expert = run / "experts" / domain / "recovered"
        model = AutoModelForCausalLM.from_pretrained(expert)
        tok = AutoTokenizer.from_pretrained(expert)
        assert model.config.num_key_value_heads == 1 and model.config.vocab_size == len(plan["vocab_keep"])
        text = "any text at all: ünïcode, 数字 and {code}"
        assert tok.decode(tok(text)["input_ids"]) == text
        assert (run / "experts" / domain / "train").is_dir()  # re-tokenized for the expert's vocabulary
    summary = json.loads((run / "summary.json").read_text())
    assert all(r["recover_status"] == "done" for r in summary["domains"].values())
