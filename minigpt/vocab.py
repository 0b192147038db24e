"""Vocabulary pruning for byte-level BPE tokenizers (tokenizer.json): keep a subset of ids, renumber them densely.

What is always kept: the byte-level alphabet tokens (so any text the original encodes is still encodable), every
added/special token, and the merge ancestors of every kept token (so a kept token can still be produced). Merges whose parts or
result were removed are deleted. With that closure, a text whose original tokens are all kept tokenizes to exactly
the same tokens (renumbered): every merge the original tokenizer applied to it survives, and a deleted merge was
never the lowest-ranked applicable one. The new ids follow the old ids' order; `keep[new_id] = old_id`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence

_SUPPORTED = "byte-level BPE tokenizers with a tokenizer.json (GPT-2, Llama-3, SmolLM2, Qwen2 style)"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel pre-tokenizers."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _uses_byte_level(node) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(p) for p in node.get("pretokenizers", []))


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"vocabulary pruning needs a fast tokenizer; supported: {_SUPPORTED}")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _uses_byte_level(spec.get("pre_tokenizer")) or model.get("byte_fallback"):
        raise ValueError(f"cannot rewrite this tokenizer ({model.get('type')} model); supported: {_SUPPORTED}")
    return spec


def _merge_pair(m) -> tuple[str, str]:
    return tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1])


def always_kept(tokenizer) -> set[int]:
    """Byte alphabet + added/special tokens: what any pruned vocabulary must contain."""
    spec = _spec(tokenizer)
    vocab = spec["model"]["vocab"]
    # Some vocabularies lack a few byte tokens (SmolLM2: 21, e.g. 0xC0/0xC1/0xF5-0xFF, never valid in UTF-8, and
    # rare control bytes); the original tokenizer cannot emit those either, so keeping every byte token it has
    # preserves exactly its coverage.
    ids = {vocab[c] for c in _bytes_to_unicode().values() if c in vocab}
    if not all(chr(b) in vocab for b in range(ord("!"), ord("~") + 1)):
        raise ValueError(f"tokenizer lacks printable byte tokens; supported: {_SUPPORTED}")
    ids |= {t["id"] for t in spec.get("added_tokens", [])}
    ids |= {i for i in tokenizer.all_special_ids if i is not None}
    return ids


def closure(tokenizer, ids: Iterable[int]) -> list[int]:
    """`ids` plus everything always kept plus the merge ancestors of each; sorted old ids (= new id order)."""
    spec = _spec(tokenizer)
    vocab = spec["model"]["vocab"]
    inv = {i: t for t, i in vocab.items()}
    parts: dict[str, tuple[str, str]] = {}
    for m in spec["model"]["merges"]:
        a, b = _merge_pair(m)
        parts.setdefault(a + b, (a, b))
    keep = set(always_kept(tokenizer)) | {int(i) for i in ids}
    stack = [inv[i] for i in keep if i in inv]
    while stack:
        tok = stack.pop()
        for p in parts.get(tok, ()):
            if vocab[p] not in keep:
                keep.add(vocab[p])
                stack.append(p)
    return sorted(keep)


def _remap_post_processor(node, remap: dict[int, int]):
    if node is None:
        return None
    kind = node.get("type")
    if kind == "Sequence":
        node["processors"] = [_remap_post_processor(p, remap) for p in node["processors"]]
    elif kind == "TemplateProcessing":
        for tok in node.get("special_tokens", {}).values():
            tok["ids"] = [remap[i] for i in tok["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            node[key] = [node[key][0], remap[node[key][1]]]
    elif kind != "ByteLevel":
        raise ValueError(f"cannot rewrite post-processor {kind!r}; supported: {_SUPPORTED}")
    return node


def prune_tokenizer(tokenizer, keep: Sequence[int]):
    """A new tokenizer whose id `i` is the old id `keep[i]`; it can only emit kept tokens and still encodes any text.

    `keep` must be sorted and closed (see `closure`); the result is loaded through AutoTokenizer from a rewritten
    tokenizer.json, so it saves with save_pretrained like the original.
    """
    from transformers import AutoTokenizer

    keep = [int(i) for i in keep]
    if keep != sorted(set(keep)):
        raise ValueError("vocabulary keep list must be sorted old ids without repeats")
    missing = set(closure(tokenizer, keep)) - set(keep)
    if missing:
        raise ValueError(f"vocabulary keep list is not closed: {len(missing)} required ids missing "
                         f"(e.g. {sorted(missing)[:5]}); build it with minigpt.vocab.closure")
    spec = _spec(tokenizer)
    remap = {old: new for new, old in enumerate(keep)}
    inv = {i: t for t, i in spec["model"]["vocab"].items()}
    spec["model"]["vocab"] = {inv[old]: new for old, new in remap.items() if old in inv}
    kept_tokens = set(spec["model"]["vocab"])
    merges = []
    for m in spec["model"]["merges"]:
        a, b = _merge_pair(m)
        if a in kept_tokens and b in kept_tokens and a + b in kept_tokens:
            merges.append(m)
    spec["model"]["merges"] = merges
    for t in spec.get("added_tokens", []):
        t["id"] = remap[t["id"]]
    spec["post_processor"] = _remap_post_processor(spec.get("post_processor"), remap)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/tokenizer.json", "w") as f:
            json.dump(spec, f, ensure_ascii=False)
        cfg_path = f"{tmp}/tokenizer_config.json"
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except FileNotFoundError:
            cfg = None
        if cfg and "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, ensure_ascii=False, indent=1)
        new = AutoTokenizer.from_pretrained(tmp)
    if len(new) != len(keep):
        raise RuntimeError(f"rewritten tokenizer has {len(new)} tokens, expected {len(keep)}")
    return new
