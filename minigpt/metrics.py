"""Held-out quality as sums per document, and bootstrap confidence intervals over documents.

Everything here is a plain function of a model and texts, or of numbers (no Ray), so it is tested on tiny models.

Quality is compared per byte as well as per token: an expert may carry a pruned vocabulary, so the same text becomes
a different number of tokens. Each model re-tokenizes the raw held-out documents with its OWN tokenizer; bytes per
token come from `tokens.tokenize_documents`, the one implementation the token shards use too.

Every figure is a ratio of sums (NLL over tokens, NLL over bytes), and `lm_metrics` keeps those sums per document.
A bootstrap resample of documents is then a weighted sum of the per-document arrays, so it is exact and cheap: no
model runs again. Intervals are percentile intervals of `samples` resamples drawn with a fixed seed; ratios to the
dense model are paired (the same resampled documents for both models), so the noise the two share cancels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from minigpt.evalpass import Forward, as_forward
from minigpt.losses import bits_per_byte, token_nll
from minigpt.tokens import bos_id, tokenize_documents, with_bos
_TOKENIZE_BATCH = 16  # documents tokenized at a time: a block budget stops early on a large corpus


def safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------- token stream


def token_stream(tokenizer, texts: Sequence[str], need: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, UTF-8 bytes per token, document index per token) of `texts` joined with EOS between them.

    The EOS before document i belongs to document i and covers 0 bytes (its NLL counts: the model must predict
    that a new document starts). Tokenizing stops once `need` tokens exist (0 = every text).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents cannot be joined")
    ids: list[np.ndarray] = []
    nbytes: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    length = 0
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        for k, (t_ids, t_bytes) in enumerate(tokenize_documents(tokenizer, list(texts[start:start + _TOKENIZE_BATCH]))):
            doc = start + k
            if doc:
                t_ids = np.concatenate([[eos], t_ids])
                t_bytes = np.concatenate([[0], t_bytes])
            ids.append(np.asarray(t_ids, dtype=np.int64))
            nbytes.append(np.asarray(t_bytes, dtype=np.int64))
            owner.append(np.full(len(t_ids), doc, dtype=np.int64))
            length += len(t_ids)
            if need and length >= need:
                break
        if need and length >= need:
            break
    if not ids:
        return (np.zeros(0, dtype=np.int64),) * 3
    return np.concatenate(ids), np.concatenate(nbytes), np.concatenate(owner)


# ---------------------------------------------------------------------------------------- LM quality


@torch.inference_mode()
def lm_metrics(model: nn.Module | Forward, tokenizer, texts: Sequence[str], block_size: int, batch_size: int,
               max_blocks: int = 0, prefix_blocks: int = 0) -> dict:
    """Next-token NLL of `model` on `texts`: totals per token and per byte, and the same sums per document.

    The texts are tokenized with the model's own tokenizer, joined with EOS between documents (as the shards are)
    and cut into `block_size` blocks; the tail is dropped and `max_blocks` > 0 keeps the first blocks. Each block
    is scored independently: positions 1..block_size-1 are predicted, so `tokens` = blocks * (block_size - 1).

    `bytes` counts the UTF-8 bytes of document text covered by the predicted tokens (each byte belongs to exactly
    one token; EOS covers 0 bytes; the first token of each block is never predicted and is excluded with its
    bytes). bits_per_byte = NLL in nats / (bytes * ln 2); loss = NLL / tokens; ppl = exp(loss).
    `documents` holds per-document lists `nll`, `tokens`, `bytes` (document order as given; a document the kept
    blocks do not reach has zeros): they sum to the totals and feed `bootstrap`.

    `model` is a loaded model or a minigpt.evalpass Forward (e.g. `Streamed`: one decoder layer resident at a time).
    With `prefix_blocks` > 0 the result also holds "prefix": the same figures on the first `prefix_blocks` blocks
    alone (from the same pass), the reference a model scored with max_blocks=prefix_blocks is paired with.
    """
    if block_size < 2 or batch_size < 1 or max_blocks < 0:
        raise ValueError("block_size must be >= 2, batch_size >= 1, max_blocks >= 0")
    ids, nbytes, owner = token_stream(tokenizer, texts, max_blocks * block_size)
    bos = bos_id(tokenizer)
    body = block_size - (bos is not None)  # stream tokens per block (a BOS opens each block where the model uses one)
    n_blocks = len(ids) // body
    if max_blocks:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one block of {block_size}")
    n = n_blocks * body
    blocks = torch.from_numpy(with_bos(ids[:n], nbytes[:n], block_size, bos)[0]).view(n_blocks, block_size)
    # The predicted positions (1..block_size-1 of each block) in each block's stream part, and the document each
    # belongs to: every stream token after a BOS, all but the first without one.
    skip = 0 if bos is not None else 1
    doc_of = torch.from_numpy(owner[:n]).view(n_blocks, body)[:, skip:]
    bytes_of = torch.from_numpy(nbytes[:n]).view(n_blocks, body)[:, skip:]
    n_docs = int(owner[n - 1]) + 1
    doc_nll = torch.zeros(n_docs, dtype=torch.float64)
    prefix = min(prefix_blocks, n_blocks)
    pre_nll = torch.zeros(n_docs, dtype=torch.float64)
    # One batch's logits at a time, reduced at once (a streamed model runs every block through a layer first).
    for start, logits in as_forward(model).batches(blocks, batch_size):
        x = blocks[start:start + batch_size].to(logits.device)
        nll = token_nll(logits, x).double().cpu()
        # Summed in float64 per document: thousands of tokens keep full precision.
        doc_nll.index_add_(0, doc_of[start:start + batch_size].reshape(-1), nll)
        if start < prefix:
            rows = min(len(x), prefix - start)
            pre_nll.index_add_(0, doc_of[start:start + rows].reshape(-1), nll.view(len(x), -1)[:rows].reshape(-1))
    out = _figures(doc_nll, doc_of, bytes_of, n_docs)
    if prefix:
        out["prefix"] = _figures(pre_nll, doc_of[:prefix], bytes_of[:prefix], n_docs)
    return out


def _figures(doc_nll: torch.Tensor, doc_of: torch.Tensor, bytes_of: torch.Tensor, n_docs: int) -> dict:
    """lm_metrics' figures from per-document NLL sums and the blocks' document and byte maps."""
    doc_tokens = torch.bincount(doc_of.reshape(-1), minlength=n_docs)
    doc_bytes = torch.zeros(n_docs, dtype=torch.long).index_add_(0, doc_of.reshape(-1), bytes_of.reshape(-1))
    total_nll, tokens, total_bytes = float(doc_nll.sum()), int(doc_tokens.sum()), int(doc_bytes.sum())
    if total_bytes == 0:
        raise ValueError("the predicted tokens cover no text bytes")
    loss = total_nll / tokens
    return {"loss": loss, "ppl": safe_exp(loss), "bits_per_byte": bits_per_byte(total_nll, total_bytes), "tokens": tokens,
            "bytes": total_bytes, "blocks": len(doc_of),
            "documents": {"nll": doc_nll.tolist(), "tokens": doc_tokens.tolist(), "bytes": doc_bytes.tolist()}}


# ------------------------------------------------------------------------------------------ bootstrap


def resample_weights(n_docs: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n_docs] counts: how often each document is drawn in each resample (with replacement)."""
    if n_docs < 1 or samples < 1:
        raise ValueError("a bootstrap needs at least one document and one sample")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=samples).astype(np.float64)


def percentile_interval(statistic: Callable[[np.ndarray], np.ndarray], weights: np.ndarray,
                        confidence: float) -> tuple[float, float]:
    """The central `confidence` share of `statistic` over the resamples (rows of `weights`).

    `statistic` maps a [k, n_docs] weight matrix to k values; resamples where it is undefined (NaN: every drawn
    document covers no token) are left out.
    """
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        values = statistic(weights)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def _docs(cell: dict, n: int, key: str) -> np.ndarray:
    vals = np.asarray(cell["documents"][key], dtype=np.float64)
    return np.pad(vals, (0, n - len(vals)))  # a model whose blocks reach fewer documents has zeros beyond


def ppl_statistic(cell: dict, n: int) -> Callable[[np.ndarray], np.ndarray]:
    nll, tok = _docs(cell, n, "nll"), _docs(cell, n, "tokens")
    return lambda w: np.exp((w @ nll) / (w @ tok))


def bpb_statistic(cell: dict, n: int) -> Callable[[np.ndarray], np.ndarray]:
    nll, nb = _docs(cell, n, "nll"), _docs(cell, n, "bytes")
    return lambda w: bits_per_byte(w @ nll, w @ nb)


def intervals(cell: dict, ref: dict | None, samples: int, confidence: float, seed: int) -> dict:
    """Bootstrap intervals of one model's figures on one domain (a lm_metrics result with `documents`).

    Returns {"ppl_ci": [lo, hi], "bits_per_byte_ci": [lo, hi], "documents_measured": int} and, when `ref` (the
    dense model on the same documents) is given, "ppl_ratio", "ppl_ratio_ci", "bits_per_byte_ratio",
    "bits_per_byte_ratio_ci": model ÷ reference with a paired resample. The same seed gives every model the same
    resamples, so the intervals of different models on a domain are comparable.
    """
    cells = [cell] + ([ref] if ref else [])
    n = max(len(c["documents"]["tokens"]) for c in cells)
    weights = resample_weights(n, samples, seed)
    ppl, bpb = ppl_statistic(cell, n), bpb_statistic(cell, n)
    out = {"ppl_ci": list(percentile_interval(ppl, weights, confidence)),
           "bits_per_byte_ci": list(percentile_interval(bpb, weights, confidence)),
           "documents_measured": int(np.count_nonzero(_docs(cell, n, "tokens")))}
    if ref:
        ref_ppl, ref_bpb = ppl_statistic(ref, n), bpb_statistic(ref, n)
        out["ppl_ratio"] = _ratio(cell["ppl"], ref["ppl"])
        out["ppl_ratio_ci"] = list(percentile_interval(lambda w: ppl(w) / ref_ppl(w), weights, confidence))
        out["bits_per_byte_ratio"] = _ratio(cell["bits_per_byte"], ref["bits_per_byte"])
        out["bits_per_byte_ratio_ci"] = list(percentile_interval(lambda w: bpb(w) / ref_bpb(w), weights,
                                                                 confidence))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def add_intervals(models: dict[str, dict], dense: str | None, domains: Sequence[str], samples: int,
                  confidence: float, seed: int = 0) -> None:
    """Add `intervals` in place to every model's cell of every domain, to its "general" result when there is one
    and to its out-of-source cells ("oos": domain -> source -> cell) (eval.json's "models" mapping; ratios are to
    the `dense` model's cell on the same documents)."""
    def ref_of(section: str, key: str | None) -> dict | None:
        res = models.get(dense) if dense else None
        return (res[section] if key is None else res[section][key]) if res else None

    for domain in domains:
        for res in models.values():
            cell, ref = res["domains"][domain], ref_of("domains", domain)
            if ref and "prefix" in ref and ref["prefix"]["blocks"] == cell.get("blocks") < ref["blocks"]:
                ref = ref["prefix"]  # a cell scored on the first blocks only: paired with the reference's same blocks
            cell.update(intervals(cell, ref, samples, confidence, seed))
    for res in models.values():
        if res.get("general"):
            res["general"].update(intervals(res["general"], ref_of("general", None), samples, confidence, seed))
        # Out-of-source cells: paired with the dense model's cell of the same domain and source.
        for domain, cells in (res.get("oos") or {}).items():
            for source, cell in cells.items():
                ref = ((models.get(dense) or {}).get("oos") or {}).get(domain, {}).get(source) if dense else None
                cell.update(intervals(cell, ref, samples, confidence, seed))
