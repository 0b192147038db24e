"""GGUF export of an expert (llama.cpp's file format), written with the `gguf` Python package.

minigpt's experts are stock uniform-width checkpoints, so an expert of a family llama.cpp knows converts the way
llama.cpp's own converter converts the base model: the same tensor names, the same metadata keys, Llama's query and
key rows permuted to GGML's rotary layout, Gemma's norm weights shifted by one (HF scales by 1 + w, GGML by w), and
the tokenizer as metadata: byte-level BPE (vocabulary, merges) for Llama and Qwen2, sentencepiece (pieces, scores,
byte tokens) for Gemma 3, with token types, special ids, BOS flag and chat template. Supported: Llama (without rope
scaling or biases), Qwen2 and Gemma 3 text models in the layout llama.cpp fixes for Gemma 3 (every sixth layer
global); anything else stops with one line naming these, before anything is written. Types: f16 (2-D weights in
float16, norms and biases in float32) and q8_0 (2-D weights whose rows split into 32-value blocks in 8-bit, the rest
f16, as llama.cpp does).

`verify` reads a file back with transformers' GGUF loader and compares it with the expert on token blocks: the
largest logit difference (f16: fp16 rounding only) and the perplexity ratio (q8_0: within 1% of the expert).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.config import ConfigError
from minigpt.ggufconvert import name_maps_cached
from minigpt.optconfig import GGUF_TYPES
from minigpt.io import atomic_file
from minigpt.licence import front_matter
from minigpt.models import load_model, load_tokenizer


@dataclass(frozen=True)
class Family:
    """How one transformers model type maps onto llama.cpp's architecture of the same family."""

    arch: str                 # gguf.MODEL_ARCH member
    permute_qk: bool = False  # Llama: HF's rotary layout (halves) -> GGML's (pairs) in q and k rows
    norm_shift: float = 0.0   # Gemma: HF's RMSNorm scales by (1 + w), GGML's by w
    tokenizer: str = "bpe"    # "bpe": byte-level BPE; "spm": sentencepiece pieces with byte fallback


FAMILIES = {"llama": Family("LLAMA", permute_qk=True), "qwen2": Family("QWEN2"),
            "gemma3_text": Family("GEMMA3", norm_shift=1.0, tokenizer="spm")}
SUPPORTED = ("Llama (LlamaForCausalLM without rope scaling or biases), Qwen2 (Qwen2ForCausalLM) and Gemma 3 "
             "(Gemma3ForCausalLM, llama.cpp's layout: every sixth layer global)")
# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6
# llama.cpp fixes these for Gemma 3 (llama-model.cpp): a global layer after every five sliding ones, the sliding
# layers' rotary base, and attention scaled by 1/sqrt(head size) (but on the 62-layer 27B model).
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0


# ------------------------------------------------------------------------------------------ checks


def read_config(folder: Path) -> dict:
    """config.json of an expert folder that can be exported; ConfigError (one line, nothing written) otherwise."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")) or \
            not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder} is not an expert folder (config.json, *.safetensors and tokenizer.json needed)")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise ConfigError(f"{folder} holds quantized weights ({cfg['quantization_config'].get('quant_method', '?')}); "
                          "export the float expert it was made from")
    return check_config(cfg)


def check_config(cfg: dict) -> dict:
    """`cfg` (a config.json as a dict) when llama.cpp can run it as minigpt writes it; ConfigError naming what
    cannot be exported otherwise. Also run at a job's validation when its export stage is on."""
    mt = cfg.get("model_type", "?")
    if mt not in FAMILIES:
        raise ConfigError(f"cannot export model_type {mt!r} to GGUF; supported: {SUPPORTED}")
    if mt == "gemma3_text":
        variant = _gemma3_variant(cfg)
    else:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type") or rope.get("type") or "default"
        variant = [k for k, bad in ((f"rope scaling {kind}", kind != "default"),
                                    ("attention_bias", mt == "llama" and cfg.get("attention_bias")),
                                    ("mlp_bias", bool(cfg.get("mlp_bias"))),
                                    ("sliding window", bool(cfg.get("use_sliding_window"))),
                                    (f"hidden_act {cfg.get('hidden_act')}", cfg.get("hidden_act", "silu") != "silu"))
                   if bad]
    if variant:
        raise ConfigError(f"cannot export this {mt} variant to GGUF ({', '.join(variant)}); supported: {SUPPORTED}")
    return cfg


def _gemma3_variant(cfg: dict) -> list[str]:
    """What of a Gemma 3 config llama.cpp's fixed Gemma 3 layout cannot express ([] when nothing)."""
    n, hd = int(cfg["num_hidden_layers"]), head_dim(cfg)
    pattern = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(n)]
    rope = cfg.get("rope_parameters") or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    kinds = {(r.get("rope_type") or "default") for r in (full, local)}
    scale = cfg.get("query_pre_attn_scalar") or hd
    checks = (
        (f"layer_types other than every {GEMMA3_PATTERN}th layer global",
         list(cfg.get("layer_types") or pattern) != pattern),
        (f"rope scaling {sorted(kinds - {'default'})}", kinds != {"default"}),
        (f"sliding layers' rope_theta {local.get('rope_theta')} (llama.cpp: {GEMMA3_LOCAL_THETA:g})",
         float(local.get("rope_theta", GEMMA3_LOCAL_THETA)) != GEMMA3_LOCAL_THETA),
        (f"query_pre_attn_scalar {scale} != head_dim {hd}", int(scale) != hd and n != 62),
        ("logit soft-capping", bool(cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"))),
        ("bidirectional attention", bool(cfg.get("use_bidirectional_attention"))),
        (f"hidden_activation {cfg.get('hidden_activation')}",
         cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh"),
    )
    return [name for name, bad in checks if bad]


def _rope_theta(cfg: dict) -> float:
    """The rotary base; for Gemma 3 the global layers' (llama.cpp fixes the sliding layers' at 10,000)."""
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    return float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


# ------------------------------------------------------------------------------------------ tokenizer


def _pre_names() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, as transformers' GGUF reader maps them back."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # pragma: no cover - older transformers
        return {}
    out: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        out.setdefault(regex, name)
    return out


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the expert's pre-tokenizer (tokenizer.ggml.pre), from its tokenizer.json."""
    pt = spec.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt2"  # GPT-2's split regex
    parts = pt.get("pretokenizers") or []
    if pt.get("type") == "Sequence" and parts and parts[-1].get("type") == "ByteLevel":
        head = parts[:-1]
        if len(head) == 1 and head[0].get("type") == "Split" and not parts[-1].get("use_regex", True):
            regex = (head[0].get("pattern") or {}).get("Regex")
            if regex in _pre_names():
                return _pre_names()[regex]
        if len(head) == 1 and head[0].get("type") == "Digits" and head[0].get("individual_digits") \
                and parts[-1].get("use_regex", True):
            return "smollm"  # single digits, then GPT-2's regex (SmolLM's tokenizer)
    raise ConfigError(f"cannot export this tokenizer to GGUF: its pre-tokenizer ({json.dumps(pt)[:120]}) has no "
                      "llama.cpp name minigpt knows (byte-level BPE with GPT-2, Llama-3, Qwen2 or SmolLM splitting)")


def _bpe_vocab(spec: dict) -> tuple[dict[int, str], dict[int, int]]:
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(f"cannot export this tokenizer to GGUF ({model.get('type')} model); supported: byte-level "
                          "BPE tokenizers (GPT-2, Llama-3, SmolLM2, Qwen2 style)")
    tokens = {i: t for t, i in model["vocab"].items()}
    return tokens, {i: NORMAL for i in tokens}


def _spm_vocab(spec: dict) -> tuple[dict[int, str], dict[int, int]]:
    """Sentencepiece pieces (▁ for a space, <0xNN> byte tokens) spelled and typed as llama.cpp's converter writes
    them from tokenizer.model. transformers respells Gemma's runs of two or more spaces, user-defined tokens that
    llama.cpp matches in the raw text, as runs of ▁; they go back to spaces here (Gemma has no other piece that is
    two or more ▁)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ConfigError(f"cannot export this tokenizer to GGUF ({model.get('type')} model without byte fallback); "
                          "a Gemma 3 expert needs its sentencepiece tokenizer (BPE with byte fallback)")
    tokens, types = {}, {}
    for t, i in model["vocab"].items():
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            tokens[i], types[i] = t, BYTE
        elif len(t) > 1 and set(t) == {"\u2581"}:
            tokens[i], types[i] = " " * len(t), USER_DEFINED
        else:
            tokens[i], types[i] = t, NORMAL
    return tokens, types


def tokenizer_metadata(folder: Path, vocab_size: int, kind: str = "bpe") -> dict[str, Any]:
    """An expert folder's tokenizer as GGUF metadata: tokens (padded to the model's vocabulary with unused [PADn]
    tokens, as llama.cpp does), token types, special ids, BOS flag, chat template; for byte-level BPE (`kind`
    "bpe") its merges and pre-tokenizer, for sentencepiece ("spm") the piece scores llama.cpp merges by."""
    folder = Path(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens, types = (_spm_vocab if kind == "spm" else _bpe_vocab)(spec)
    for a in spec.get("added_tokens") or []:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has ids up to {max(tokens)}, the model {vocab_size} rows")
    names, kinds = [], []
    for i in range(vocab_size):
        names.append(tokens.get(i, f"[PAD{i}]"))
        kinds.append(types.get(i, UNUSED))
    conf = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() \
        else {}
    template = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").is_file() \
        else conf.get("chat_template")
    ids = {t: i for i, t in enumerate(names)}

    def special(key: str) -> int | None:
        tok = conf.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return ids.get(tok) if isinstance(tok, str) else None

    post = spec.get("post_processor") or {}
    single = post.get("single") or []
    add_bos = conf.get("add_bos_token")
    if add_bos is None:  # a template that puts a special token first adds BOS
        add_bos = bool(single) and "SpecialToken" in single[0]
    out = {"tokens": names, "types": kinds, "bos": special("bos_token"), "eos": special("eos_token"),
           "unk": special("unk_token"), "pad": special("pad_token"), "add_bos": bool(add_bos),
           "chat_template": template}
    if kind == "spm":
        # llama.cpp merges the adjacent pair whose piece scores highest; sentencepiece's BPE pieces come in merge
        # order, so a normal piece scores minus its rank among them (Gemma's own file: 'put', id 1000, -506), byte
        # tokens 0 and control and user-defined tokens -1000, as in the base model's GGUF.
        rank = iter(range(vocab_size))
        scores = [-float(next(rank)) if k == NORMAL else 0.0 if k == BYTE else -1000.0 for k in kinds]
        return {**out, "model": "llama", "pre": "default", "scores": scores}
    merges = [m if isinstance(m, str) else " ".join(m) for m in (spec.get("model") or {}).get("merges") or []]
    return {**out, "model": "gpt2", "pre": pre_tokenizer(spec), "merges": merges}


# ------------------------------------------------------------------------------------------ tensors


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (halves) -> GGML's (pairs), per head: llama.cpp's converter does this to q and k of Llama."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def gguf_tensors(state: dict[str, torch.Tensor], cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every tensor, in llama.cpp's naming; a tied lm_head is left out."""
    import gguf

    mt = cfg["model_type"]
    fam = FAMILIES[mt]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, fam.arch), int(cfg["num_hidden_layers"]))
    tied = cfg.get("tie_word_embeddings", False)
    for key, t in state.items():
        if key == "lm_head.weight" and tied:
            continue
        stem, _, suffix = key.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise ConfigError(f"cannot export tensor {key!r}: no GGUF name for it in the {mt} layout")
        a = t.detach().to(torch.float32).cpu().numpy()
        if fam.permute_qk and name.endswith(("attn_q", "attn_k")):
            a = _permute(a, int(cfg["num_attention_heads"] if name.endswith("attn_q") else cfg["num_key_value_heads"]))
        if fam.norm_shift and key.endswith("norm.weight"):
            a = a + np.float32(fam.norm_shift)
        yield f"{name}.{suffix}", a


def _encode(a: np.ndarray, outtype: str):
    """(data, raw GGML type or None) of one tensor: 1-D stays f32; q8_0 where rows split into 32-value blocks."""
    import gguf

    if a.ndim < 2:
        return a.astype(np.float32), None
    if outtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


# ------------------------------------------------------------------------------------------ the file


def card_meta(folder: Path) -> dict:
    """The expert card's front matter (license, base_model) for the file's general.* keys; {} without a card."""
    readme = Path(folder) / "README.md"
    return front_matter(readme.read_text(errors="replace")) if readme.is_file() else {}


def export_gguf(folder: Path | str, out: Path | str, outtype: str = "f16", name: str | None = None) -> dict:
    """Write the expert in `folder` as one GGUF file `out` (atomically); returns {file, type, bytes, sha256,
    tensors, quantized}. Every check runs before anything is written."""
    import gguf

    folder, out = Path(folder), Path(out)
    if outtype not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {outtype!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = read_config(folder)
    fam = FAMILIES[cfg["model_type"]]
    tok = tokenizer_metadata(folder, int(cfg["vocab_size"]), fam.tokenizer)
    state = load_state(folder)
    meta = card_meta(folder)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, fam.arch)]
    counts = {"quantized": 0, "tensors": 0}
    with atomic_file(out, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type("model")
        w.add_name(name or out.name.split(".")[0])
        if meta.get("license"):
            w.add_license(str(meta["license"]))
        if meta.get("base_model"):
            w.add_base_model_count(1)
            w.add_base_model_name(0, str(meta["base_model"]))
            w.add_base_model_repo_url(0, f"https://huggingface.co/{meta['base_model']}")
        w.add_description("A domain expert pruned (and possibly recovered) by minigpt from its base model: a modified "
                          "derivative, under the base model's licence (see the card and NOTICE beside this file).")
        w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(int(cfg["num_attention_heads"]))
        w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        hd = head_dim(cfg)
        if cfg["model_type"] == "llama":
            w.add_rope_dimension_count(hd)
        if cfg["model_type"] == "gemma3_text":
            w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_key_length(hd)  # pruned attention keeps its head size while the head count shrinks
        w.add_value_length(hd)
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(tok["model"])
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        if "merges" in tok:
            w.add_token_merges(tok["merges"])
        if "scores" in tok:
            w.add_token_scores(tok["scores"])
            w.add_add_space_prefix(False)  # Gemma's pieces carry their own ▁; nothing is prepended
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                         ("pad", w.add_pad_token_id)):
            if tok[key] is not None:
                add(tok[key])
        w.add_add_bos_token(tok["add_bos"])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for tname, a in gguf_tensors(state, cfg):
            data, raw = _encode(a, outtype)
            w.add_tensor(tname, data, raw_dtype=raw)
            counts["tensors"] += 1
            counts["quantized"] += raw is not None
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"file": out.name, "type": outtype, "bytes": out.stat().st_size, "sha256": _sha256(out), **counts}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ reading it back


def load_gguf(path: Path | str):
    """(model, tokenizer) of a GGUF file through transformers' GGUF loader, dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path)
    with name_maps_cached():  # the same weights, without ~400 rebuilds of gguf's name table (ggufconvert)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@torch.no_grad()
def _logits_nll(model, blocks: torch.Tensor, batch: int = 4) -> tuple[list[torch.Tensor], float, int]:
    out, nll, n = [], 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i:i + batch]
        logits = model(input_ids=x).logits.float()
        out.append(logits)
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, x[:, 1:, None])
        nll -= lp.sum().item()
        n += lp.numel()
    return out, nll, n


def verify(folder: Path | str, paths: list[Path], blocks: torch.Tensor) -> list[dict]:
    """Each GGUF file read back with transformers next to the expert, on token blocks [n, seq] (ids of the expert's
    tokenizer): the largest absolute logit difference and the ratio of perplexities (file ÷ expert)."""
    cfg = read_config(Path(folder))
    if cfg["model_type"] == "qwen2" and head_dim(cfg) != cfg["hidden_size"] // cfg["num_attention_heads"]:
        # The file is right for llama.cpp (attention.key_length), but transformers' GGUF reader derives Qwen2's
        # head size from hidden_size / heads.
        return [{"skipped": "not read back: transformers' GGUF reader cannot load a Qwen2 with pruned heads"}
                for _ in paths]
    expert = load_model(folder)
    ref, nll_ref, n = _logits_nll(expert, blocks)
    del expert
    scale = max(r.abs().max().item() for r in ref)
    out = []
    for path in paths:
        model, _ = load_gguf(path)
        got, nll, _ = _logits_nll(model, blocks)
        del model
        diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
        out.append({"blocks": len(blocks), "max_abs_logit_diff": diff,
                    "max_abs_logit": scale, "ppl_expert": math.exp(nll_ref / n), "ppl_gguf": math.exp(nll / n),
                    "ppl_ratio": math.exp((nll - nll_ref) / n)})
    return out


# The largest logit difference an f16 file may show against the expert, relative to the largest logit: fp16
# rounding of the weights gives ~0.3% (SmolLM2-135M); a wrong tensor layout gives differences of the logits' size.
F16_TOLERANCE = 0.01
Q8_TOLERANCE = 0.01  # q8_0 perplexity within 1% of the expert's


def problem(f: dict) -> tuple[bool, str] | None:
    """(fatal, message) when a file's read-back check fails, else None: f16 logits that are not the expert's mean a
    broken conversion (fatal); q8_0 beyond 1% is reported, not fatal (its error is the quantization's)."""
    v = f.get("verify") or {}
    if "max_abs_logit_diff" not in v:
        return None
    if f["type"] == "f16" and v["max_abs_logit_diff"] > F16_TOLERANCE * max(1.0, v["max_abs_logit"]):
        return True, (f"{f['file']} read back with logits up to {v['max_abs_logit_diff']:.3g} away from the expert's "
                      f"(largest logit {v['max_abs_logit']:.3g}): the conversion is wrong")
    if f["type"] == "q8_0" and abs(v["ppl_ratio"] - 1) > Q8_TOLERANCE:
        return False, f"{f['file']} perplexity is {v['ppl_ratio']:.4f}x the expert's (more than 1% off)"
    return None


# Text `minigpt export` reads a file back on when no held-out text is at hand: plain English prose.
PROBE = ("A model card records what a model is, where it came from and how well it does. It names the base model, "
         "the data the model was shaped on, the method and its settings, and the figures measured on text the model "
         "never saw. Whoever uploads a model should keep its licence and notice files beside the weights, so that "
         "everyone who receives it also receives the terms under which it may be used, copied and changed.")


def probe_blocks(folder: Path | str, length: int = 128) -> torch.Tensor:
    """PROBE in the expert's tokenization, as one block of at most `length` tokens."""
    ids = load_tokenizer(folder)(PROBE)["input_ids"][:length]
    return torch.tensor([ids], dtype=torch.long)


def default_out(expert: Path) -> Path:
    """Where `minigpt export` writes: experts/<domain>/gguf/ inside a run folder, else a sibling <name>-gguf/."""
    expert = Path(expert).resolve()
    return expert.parent / "gguf" if expert.parent.parent.name == "experts" else expert.with_name(expert.name + "-gguf")


def file_name(expert: Path, outtype: str) -> str:
    """<domain>-<kind>.<TYPE>.gguf inside a run folder, else <name>.<TYPE>.gguf (llama.cpp's type spelling)."""
    expert = Path(expert).resolve()
    stem = f"{expert.parent.name}-{expert.name}" if expert.parent.parent.name == "experts" else expert.name
    return f"{stem}.{outtype.upper()}.gguf"


__all__ = ["GGUF_TYPES", "default_out", "export_gguf", "file_name", "gguf_tensors", "load_gguf", "pre_tokenizer",
           "probe_blocks", "problem", "read_config", "tokenizer_metadata", "verify"]
