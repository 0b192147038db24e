"""Tests for minigpt.metrics: bytes per token, per-document NLL sums, and bootstrap intervals over documents."""

import math
import random

import numpy as np
import pytest
import torch

from minigpt.metrics import (
    add_intervals,
    intervals,
    lm_metrics,
    percentile_interval,
    ppl_statistic,
    resample_weights,
    token_stream,
)
from tests.conftest import make_tiny_llama

VOCAB = 49152  # the real tokenizer's vocabulary; a tiny hidden size keeps the models small
WORDS = ("the court shall grant license any party agreement software clause warranty liability notice copy "
         "source code distribute modify terms conditions section patent holder contributor work").split()


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50))) + "."
            for i in range(n)]


def tiny(seed: int = 0, inter: int = 32):
    """A tiny Llama over the real tokenizer's vocabulary (shared with test_evaluate)."""
    return make_tiny_llama(seed=seed, vocab=VOCAB, hidden=16, inter=inter, layers=2, heads=2, kv_heads=1)


# ------------------------------------------------------------------------------------------ per byte


def test_token_bytes_cover_every_byte_once(smollm2_tokenizer):
    """Each token is charged exactly the bytes of text it ends: at every token that ends on a character boundary,
    the bytes charged so far are the UTF-8 size of the text the tokens so far decode to."""
    tok = smollm2_tokenizer
    checked = 0
    for text in ["Héllo  wörld 🤖 日本語\n\n  end  ", "plain ascii text.", "  leading", "ß" * 7, "x",
                 "tabs\tand\r\nnewlines  \n"]:
        ids, counts, owner = token_stream(tok, [text])
        assert len(ids) == len(counts) == len(owner) and (owner == 0).all() and (counts >= 0).all()
        assert int(counts.sum()) == len(text.encode("utf-8"))
        charged = np.cumsum(counts)
        for i in range(len(ids)):
            prefix = tok.decode(ids[:i + 1].tolist(), clean_up_tokenization_spaces=False)
            if "\ufffd" in prefix:  # the tokens so far end inside a multi-byte character
                continue
            assert charged[i] == len(prefix.encode("utf-8")), (text, i)
            checked += 1
    assert checked > 30


def test_token_stream_joins_documents_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = ["first doc", "second", "third one here"]
    ids, counts, owner = token_stream(tok, texts)
    eos_at = np.flatnonzero(ids == tok.eos_token_id)
    assert len(eos_at) == 2 and (counts[eos_at] == 0).all()
    # The EOS before a document belongs to it; each document's bytes are its own text's.
    assert owner[eos_at].tolist() == [1, 2]
    for k, t in enumerate(texts):
        assert int(counts[owner == k].sum()) == len(t.encode())
    few = token_stream(tok, texts, need=2)[0]
    assert len(few) == len(tok(texts[0], add_special_tokens=False)["input_ids"])  # stops after the first document


def test_bits_per_byte_matches_independent_computation(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    model = tiny()
    texts = docs(6)
    block = 32
    out = lm_metrics(model, tokenizer, texts, block_size=block, batch_size=3)

    # Independent: the same stream built by hand, HF's own loss, bytes from decoding the predicted tokens.
    ids, doc_of = [], []
    for i, t in enumerate(texts):
        piece = ([tokenizer.eos_token_id] if i else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
        ids += piece
        doc_of += [i] * len(piece)
    n = len(ids) // block
    blocks = torch.tensor(ids[: n * block]).view(n, block)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
        loss = float(model(input_ids=blocks, labels=blocks).loss)
    nbytes = sum(len(tokenizer.decode(b[1:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                     .encode()) for b in blocks.tolist())
    assert out["blocks"] == n and out["tokens"] == n * (block - 1)
    assert out["bytes"] == nbytes
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)
    assert out["bits_per_byte"] == pytest.approx(loss * out["tokens"] / (nbytes * math.log(2)), rel=1e-5)

    # Per document: each predicted token's NLL goes to the document it belongs to.
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), blocks[:, 1:].reshape(-1),
                                            reduction="none").view(n, block - 1)
    owner = torch.tensor(doc_of[: n * block]).view(n, block)[:, 1:]
    per_doc = out["documents"]
    for k in range(len(per_doc["nll"])):
        assert per_doc["nll"][k] == pytest.approx(float(nll[owner == k].double().sum()), rel=1e-5, abs=1e-6)
        assert per_doc["tokens"][k] == int((owner == k).sum())
    assert sum(per_doc["tokens"]) == out["tokens"] and sum(per_doc["bytes"]) == out["bytes"]
    assert sum(per_doc["nll"]) == pytest.approx(out["loss"] * out["tokens"], rel=1e-12)

    few = lm_metrics(model, tokenizer, texts, block_size=block, batch_size=2, max_blocks=2)
    assert few["blocks"] == 2 and few["tokens"] == 2 * (block - 1) and few["bytes"] < out["bytes"]
    # The first blocks' figures from the whole pass equal a pass over those blocks alone (a prefix that ends inside
    # a batch of 2 included): what an expert's off-domain cell is paired with.
    for k in (2, 3):
        whole = lm_metrics(model, tokenizer, texts, block_size=block, batch_size=2, prefix_blocks=k)
        alone = lm_metrics(model, tokenizer, texts, block_size=block, batch_size=2, max_blocks=k)
        assert whole["loss"] == out["loss"] and whole["prefix"]["blocks"] == k
        n = len(alone["documents"]["tokens"])  # the prefix lists every document of the whole pass: zeros beyond
        pre = whole["prefix"]["documents"]
        assert pre["tokens"][:n] == alone["documents"]["tokens"] and not any(pre["tokens"][n:])
        assert pre["bytes"][:n] == alone["documents"]["bytes"]
        assert pre["nll"][:n] == pytest.approx(alone["documents"]["nll"], rel=1e-6)
        assert whole["prefix"]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        models = {"dense": {"domains": {"d": whole}}, "x/pruned": {"domains": {"d": alone}}}
        add_intervals(models, "dense", ["d"], samples=50, confidence=0.9)
        assert models["x/pruned"]["domains"]["d"]["ppl_ratio"] == pytest.approx(1.0, rel=1e-6)  # same blocks
    with pytest.raises(ValueError, match="fewer than one block"):
        lm_metrics(model, tokenizer, ["tiny"], block_size=block, batch_size=1)


def _bos_tokenizer():
    """A tiny byte-level BPE that starts every text with <bos>, as Gemma's and Llama 3's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import LICENCE, TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT, LICENCE] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def test_blocks_open_with_bos_where_the_tokenizer_uses_one(smollm2_tokenizer):
    """Gemma-style tokenizers: every block (shards and scoring alike) is BOS + block_size - 1 stream tokens, and
    every stream token is predicted; SmolLM2's tokenizer adds no BOS, so its blocks are unchanged."""
    from minigpt.corpora import bos_id, build_stream

    tok = _bos_tokenizer()
    assert bos_id(tok) == 1 and bos_id(smollm2_tokenizer) is None
    texts = docs(8)
    block = 16
    stream = build_stream([(str(i), t) for i, t in enumerate(texts)], tok, block, None)
    blocks = stream.ids.reshape(-1, block)
    assert (blocks[:, 0] == 1).all() and (stream.n_bytes.reshape(-1, block)[:, 0] == 0).all()
    plain = []
    for i, t in enumerate(texts):
        plain += ([tok.eos_token_id] if i else []) + tok(t, add_special_tokens=False)["input_ids"]
    assert blocks[:, 1:].reshape(-1).tolist() == plain[: blocks.shape[0] * (block - 1)]

    model = make_tiny_llama(vocab=len(tok), hidden=16, inter=32, layers=2, heads=2, kv_heads=1)
    out = lm_metrics(model, tok, texts, block_size=block, batch_size=4)
    n = out["blocks"]
    body = torch.tensor(plain[: n * (block - 1)]).view(n, block - 1)
    x = torch.cat([torch.ones(n, 1, dtype=torch.long), body], dim=1)
    with torch.no_grad():
        loss = float(model(input_ids=x, labels=x).loss)
    nbytes = sum(len(tok.decode(b, skip_special_tokens=True, clean_up_tokenization_spaces=False).encode())
                 for b in body.tolist())
    assert out["tokens"] == n * (block - 1) and out["bytes"] == nbytes
    assert out["loss"] == pytest.approx(loss, rel=1e-5)


# ----------------------------------------------------------------------------------------- bootstrap


def cell_of(nll, tokens, nbytes) -> dict:
    """An lm_metrics-like result from per-document sums."""
    total, n_tok, n_bytes = float(np.sum(nll)), int(np.sum(tokens)), int(np.sum(nbytes))
    return {"loss": total / n_tok, "ppl": math.exp(total / n_tok), "bits_per_byte": total / (n_bytes * math.log(2)),
            "tokens": n_tok, "bytes": n_bytes,
            "documents": {"nll": list(map(float, nll)), "tokens": list(map(int, tokens)),
                          "bytes": list(map(int, nbytes))}}


def synthetic_cell(n_docs: int, seed: int) -> dict:
    """Per-document sums of a model whose loss per token varies from document to document (as real text does)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 400, n_docs)
    loss = rng.normal(2.5, 0.6, n_docs).clip(0.5)
    return cell_of(loss * tokens, tokens, (tokens * rng.uniform(3.0, 5.0, n_docs)).astype(int))


def worse(cell: dict, factor: float, seed: int) -> dict:
    """Another model on the same documents: `factor` x the loss, with its own per-document noise."""
    d = cell["documents"]
    noise = np.random.default_rng(seed).lognormal(0.0, 0.1, len(d["nll"]))
    return cell_of(np.asarray(d["nll"]) * factor * noise, d["tokens"], d["bytes"])


def width(ci) -> float:
    return ci[1] - ci[0]


def test_bootstrap_interval_contains_the_point_estimate_and_narrows_with_more_documents():
    widths = {}
    for n in (8, 64, 512):
        dense = synthetic_cell(n, seed=n)
        expert = worse(dense, 1.2, seed=n + 1)
        out = intervals(expert, dense, samples=2000, confidence=0.95, seed=0)
        for key, point in (("ppl_ci", expert["ppl"]), ("bits_per_byte_ci", expert["bits_per_byte"]),
                           ("ppl_ratio_ci", out["ppl_ratio"]), ("bits_per_byte_ratio_ci", out["bits_per_byte_ratio"])):
            lo, hi = out[key]
            assert lo <= point <= hi, (n, key, lo, point, hi)
            assert lo < hi
        assert out["bits_per_byte_ratio"] == pytest.approx(expert["bits_per_byte"] / dense["bits_per_byte"])
        assert out["documents_measured"] == n
        widths[n] = out
        assert intervals(expert, dense, samples=2000, confidence=0.95, seed=0) == out  # seeded
    for key in ("ppl_ci", "bits_per_byte_ci", "ppl_ratio_ci"):
        w = [width(widths[n][key]) for n in (8, 64, 512)]
        # The standard error falls like 1/sqrt(documents): 8x the documents, about a third of the width.
        assert w[1] < 0.6 * w[0] and w[2] < 0.6 * w[1], (key, w)
    # A wider confidence level gives a wider interval.
    assert width(intervals(expert, dense, 2000, 0.99, 0)["ppl_ci"]) > width(widths[512]["ppl_ci"])


def test_bootstrap_resamples_are_exact_sums_of_documents():
    cell = synthetic_cell(5, seed=1)
    stat = ppl_statistic(cell, 5)
    assert stat(np.ones((1, 5)))[0] == pytest.approx(cell["ppl"], rel=1e-12)  # every document once
    one = np.zeros((1, 5))
    one[0, 3] = 5  # document 3 drawn five times: its own perplexity
    d = cell["documents"]
    assert stat(one)[0] == pytest.approx(math.exp(d["nll"][3] / d["tokens"][3]), rel=1e-12)
    w = resample_weights(5, 100, seed=0)
    assert w.shape == (100, 5) and (w.sum(axis=1) == 5).all()
    # Paired ratios: a model against itself is exactly 1 in every resample, so its interval is [1, 1].
    same = intervals(cell, cell, samples=500, confidence=0.9, seed=3)
    assert same["ppl_ratio_ci"] == pytest.approx([1.0, 1.0]) and same["ppl_ratio"] == pytest.approx(1.0)
    # Resamples where no drawn document covers a token are left out, not counted as zero.
    lo, hi = percentile_interval(lambda w: np.where(w[:, 0] > 0, np.nan, 1.0), w, 0.9)
    assert lo == hi == 1.0
    with pytest.raises(ValueError):
        percentile_interval(stat, w, 1.0)


def test_add_intervals_pairs_every_model_with_dense():
    dense = synthetic_cell(20, seed=5)
    expert = worse(dense, 1.1, seed=6)
    general = synthetic_cell(10, seed=7)
    models = {"dense": {"domains": {"a": dense}, "general": general},
              "a/pruned": {"domains": {"a": expert}, "general": None}}
    add_intervals(models, "dense", ["a"], samples=300, confidence=0.95)
    assert models["dense"]["domains"]["a"]["ppl_ratio_ci"] == pytest.approx([1.0, 1.0])
    cell = models["a/pruned"]["domains"]["a"]
    assert cell["ppl_ratio"] == pytest.approx(expert["ppl"] / dense["ppl"])
    assert cell["ppl_ratio_ci"][0] <= cell["ppl_ratio"] <= cell["ppl_ratio_ci"][1]
    assert "ppl_ci" in models["dense"]["general"] and models["a/pruned"]["general"] is None
    add_intervals(models, None, ["a"], samples=300, confidence=0.95)  # no dense model: intervals, no ratios
    assert "ppl_ci" in cell
