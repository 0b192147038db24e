"""Tokenization with byte counts: token ids of texts and the UTF-8 bytes each token covers (so quality can be
compared per byte across tokenizers), windows of a tokenized document, and the BOS convention of a model's blocks.
The one implementation the token shards (minigpt.corpora) and the held-out metrics (minigpt.metrics) both use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

def token_bytes(text: str, offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """UTF-8 bytes per token from character offsets; sums exactly to len(text.encode()).

    A character's bytes go to the first token whose span reaches the character's end; characters no token
    covers (stripped whitespace) go to the next token, trailing ones to the last token.
    """
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.maximum.accumulate(np.asarray(offsets, dtype=np.int64).reshape(n, 2)[:, 1])
    ends = np.minimum(ends, len(text))
    ends[-1] = len(text)
    if text.isascii():
        byte_at = ends
    else:
        prefix = np.zeros(len(text) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(c.encode("utf-8", "surrogatepass")) for c in text), dtype=np.int64,
                              count=len(text)), out=prefix[1:])
        byte_at = prefix[ends]
    return np.diff(byte_at, prepend=0)


def _spread_bytes(n_bytes: int, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    edges = (np.arange(n_tokens + 1, dtype=np.int64) * n_bytes) // n_tokens
    return np.diff(edges)


def tokenize_documents(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids int32, bytes per token int64) for each text, without special tokens."""
    return [doc_window(t, ids, off, 0, len(ids))[:2] for t, (ids, off) in zip(texts, tokenize_offsets(tokenizer, texts))]


def tokenize_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Token ids and character offsets [n, 2] of each text (offsets None for tokenizers without them)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        verbose=False)
        return [(np.asarray(ids, dtype=np.int32), np.asarray(off, dtype=np.int64).reshape(len(ids), 2))
                for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [(np.asarray(ids, dtype=np.int32), None) for ids in enc["input_ids"]]


def doc_window(text: str, ids: np.ndarray, offsets: np.ndarray | None, start: int, end: int
            ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token ids, bytes per token and character span [a, b) of tokens start..end-1 of one document (the whole
    document's characters when the window covers all its tokens)."""
    n = len(ids)
    if offsets is None or n == 0:  # no offsets: characters in proportion, bytes spread evenly
        a = start * len(text) // n if n else 0
        b = end * len(text) // n if end < n else len(text)
        return ids[start:end], _spread_bytes(len(text[a:b].encode("utf-8")), end - start), a, b
    # A window's characters are those token_bytes gives its tokens: from the end of the token before it (what lies
    # between two tokens belongs to the next one) to the end of its last token (the document's end for the last).
    ends = np.maximum.accumulate(offsets[:, 1])
    a = 0 if start == 0 else int(ends[start - 1])
    b = len(text) if end == n else int(ends[end - 1])
    return ids[start:end], token_bytes(text[a:b], np.clip(offsets[start:end] - a, 0, b - a)), a, b


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer starts every text with one (Gemma, Llama 3: such models are far worse without
    it), else None (SmolLM2, GPT-2). Every block of such a model then starts with BOS (build_stream, lm_metrics)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) and ids[0] == bos else None


def with_bos(ids: np.ndarray, n_bytes: np.ndarray, block_size: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of `block_size` from a stream: with a BOS id, each block is BOS (0 bytes) + block_size - 1 stream
    tokens; otherwise block_size stream tokens. The tail that fills no block is dropped."""
    body = block_size - (bos is not None)
    n = len(ids) // body
    ids, n_bytes = ids[: n * body].reshape(n, body), n_bytes[: n * body].reshape(n, body)
    if bos is not None:
        ids = np.concatenate([np.full((n, 1), bos, dtype=ids.dtype), ids], axis=1)
        n_bytes = np.concatenate([np.zeros((n, 1), dtype=n_bytes.dtype), n_bytes], axis=1)
    return ids.reshape(-1), n_bytes.reshape(-1)


