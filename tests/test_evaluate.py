"""Tests for minigpt.evaluate: the leakage check, samples' prompts, and evaluate_run end to end (on Ray)."""

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minigpt.config import EvaluateConfig
from minigpt.evaluate import (
    SCHEMA,
    LeakageError,
    check_leakage,
    evaluate_run,
    generate_sample,
    sample_domains,
    sample_prompt,
)
from minigpt.metrics import lm_metrics
from tests.test_metrics import docs, tiny
from tests.test_report import is_png_uri, parse


def test_sample_prompts_come_from_held_out_documents():
    texts = ["short one", "  A long enough document about the licence terms and conditions of use. " * 3]
    prompt = sample_prompt(texts, 40)
    assert texts[1].lstrip().startswith(prompt) and 20 < len(prompt) <= 40 and not prompt.endswith(" ")
    assert sample_prompt(["tiny"], 40) == "tiny" and sample_prompt([], 10) == ""
    assert sample_domains("legal/recovered", ["legal", "code"]) == ["legal"]
    assert sample_domains("dense", ["legal", "code"]) == ["legal", "code"]


# ------------------------------------------------------------------------------------------- leakage


def write_split(domain_dir: Path, split: str, texts: list[str]) -> None:
    """A split's documents.parquet, listed in a finished manifest (no shards: evaluation reads the texts)."""
    (domain_dir / split).mkdir(parents=True, exist_ok=True)
    # Hash order, as corpora writes a split's documents (the order of its stream).
    texts = sorted(texts, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    pq.write_table(pa.table({"doc_hash": pa.array(hashes, pa.string()), "text": pa.array(texts, pa.string())}),
                   domain_dir / split / "documents.parquet")
    path = domain_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {
        "finished": True, "domain": domain_dir.name, "block_size": 16, "salt": "", "tokenizer": "", "splits": {}}
    manifest["splits"][split] = {"documents": len(texts), "tokens": 0, "blocks": 0, "bytes": 0, "shards": []}
    path.write_text(json.dumps(manifest))


def test_leakage_check(tmp_path):
    from minigpt.corpora import DomainData

    d = tmp_path / "legal"
    texts = docs(9)
    write_split(d, "calib", texts[:3])
    with pytest.raises(FileNotFoundError, match="no held-out split"):
        check_leakage(DomainData.load(d))
    write_split(d, "train", texts[3:6])
    write_split(d, "heldout", texts[6:])
    check_leakage(DomainData.load(d))
    write_split(d, "calib", texts[:3] + texts[7:9])
    with pytest.raises(LeakageError, match=r"'legal'.*2 held-out.*calib") as err:
        check_leakage(DomainData.load(d))
    assert isinstance(err.value, ValueError) and "train" not in str(err.value)


# ---------------------------------------------------------------------------------------- end to end


def param_counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) counted directly: tied weights once, embeddings and an untied
    lm_head excluded from the second."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    untied = head is not model.get_input_embeddings().weight
    return total, total - emb - (head.numel() if untied else 0)


@pytest.mark.ray
def test_evaluate_run_and_report(tmp_path, smollm2_tokenizer, ray_local):
    from minigpt.report import write_report

    tokenizer = smollm2_tokenizer
    run = tmp_path / "run"
    domains = ["legal", "code"]
    heldout = {}
    for k, domain in enumerate(domains):
        texts = docs(14, seed=10 + k)
        write_split(run / "data" / domain, "calib", texts[:4])
        write_split(run / "data" / domain, "train", texts[4:8])
        write_split(run / "data" / domain, "heldout", texts[8:])
        heldout[domain] = sorted(texts[8:], key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    models, built = {}, {}
    for label, inter, seed in [("dense", 32, 0), ("legal/pruned", 16, 1)]:
        folder = tmp_path / label.replace("/", "_")
        built[label] = tiny(seed=seed, inter=inter)
        built[label].save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        models[label] = str(folder)
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(json.dumps({"question": "Sky?", "choices": ["blue", "green"], "answer": 0}) + "\n")
    general = tmp_path / "general.txt"
    general.write_text(" ".join(docs(3, seed=99)))
    cfg = EvaluateConfig(batch_size=2, max_blocks=3, speed_seq_len=16, speed_repeats=1, sample_tokens=4,
                         sample_prompt_chars=30, bootstrap_samples=300, mcq_file=str(mcq),
                         general_text=str(general), general_max_blocks=1)

    out = evaluate_run(run, models, domains, cfg, block_size=32)

    assert json.loads((run / "eval.json").read_text()) == out
    assert out["schema"] == SCHEMA and out["domains"] == domains and out["dense"] == "dense"
    assert list(out["models"]) == list(models)
    for label, res in out["models"].items():
        model = built[label]
        assert res["dir"] == models[label]
        # Quality: the same figures as scoring the held-out documents (hash order) directly, in this process.
        for d in domains:
            direct = lm_metrics(model, tokenizer, heldout[d], 32, 2, max_blocks=3)
            cell = res["domains"][d]
            assert cell["blocks"] == 3 and cell["tokens"] == direct["tokens"] and cell["bytes"] == direct["bytes"]
            assert cell["loss"] == pytest.approx(direct["loss"], rel=1e-5)
            assert cell["documents"]["tokens"] == direct["documents"]["tokens"]
            lo, hi = cell["ppl_ci"]
            assert lo <= cell["ppl"] <= hi and lo < hi
            dense_cell = out["models"]["dense"]["domains"][d]
            assert cell["ppl_ratio"] == pytest.approx(cell["ppl"] / dense_cell["ppl"], rel=1e-9)
            assert cell["ppl_ratio_ci"][0] <= cell["ppl_ratio"] <= cell["ppl_ratio_ci"][1]
        # Size: parameters counted directly on the model that was saved, bytes of the weight file on disk.
        total, non_emb = param_counts(model)
        assert (res["size"]["params"], res["size"]["non_embedding_params"]) == (total, non_emb)
        assert res["size"]["weight_bytes"] == (Path(models[label]) / "model.safetensors").stat().st_size
        assert res["size"]["intermediate_size"] == model.config.intermediate_size
        # Samples: prompted with the start of a held-out document of the model's domain(s); greedy, so the same
        # continuation as generating here.
        assert list(res["samples"]) == (["legal"] if label == "legal/pruned" else domains)
        for d, sample in res["samples"].items():
            assert sample["prompt"] and heldout[d][0].startswith(sample["prompt"])
            assert sample["text"] == generate_sample(model, tokenizer, sample["prompt"], 4)
        assert res["mcq"]["n"] == 1 and res["mcq"]["harness"].startswith("lm-eval")
        assert res["general"]["blocks"] == 1 and res["general"]["ppl_ci"][0] <= res["general"]["ppl"]
        assert res["speed"]["latency_ms"] > 0 and res["speed"]["seq_len"] == 16
    dense, pruned = out["models"]["dense"], out["models"]["legal/pruned"]
    assert pruned["size"]["non_embedding_ratio_vs_dense"] == pytest.approx(
        param_counts(built["legal/pruned"])[1] / param_counts(built["dense"])[1])
    assert pruned["speed"]["speedup_vs_dense"] == pytest.approx(
        dense["speed"]["latency_ms"] / pruned["speed"]["latency_ms"])
    assert dense["speed"]["speedup_vs_dense"] == 1.0 and dense["domains"]["legal"]["ppl_ratio_ci"] == [1.0, 1.0]

    # The report of that run: the headline first, with the expert's own-domain ratio and its interval;
    # self-contained HTML (every image a PNG data URI). The plan keeps a uniform width: no plot of it.
    plans = {"legal": {"domain": "legal", "method": "contextual", "target": 0.25, "intermediate_size": 32,
                       "layers": [{"index": i, "mlp_keep": list(range(16))} for i in range(2)]}}
    md, page = write_report(run, out, plans)
    imgs = parse(page.read_text()).imgs
    assert len(imgs) == 2 and all(is_png_uri(src) for src in imgs)
    text = md.read_text()
    assert text.index("## Headline") < text.index("## Quality per domain")
    cell = pruned["domains"]["legal"]
    lo, hi = cell["ppl_ratio_ci"]
    assert f"{cell['ppl_ratio']:.3f}× [{lo:.3f}×–{hi:.3f}×]" in text
    assert pruned["samples"]["legal"]["prompt"] in text

    # Leakage stops the run before any model is loaded.
    write_split(run / "data" / "code", "train", docs(14, seed=11)[4:9])
    with pytest.raises(LeakageError, match="'code'"):
        evaluate_run(run, models, domains, cfg, block_size=32)
