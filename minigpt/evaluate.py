"""Evaluation of the dense model and its experts: held-out quality with intervals, MCQ, size, speed, samples.

The quality metrics and their bootstrap intervals are pure functions in minigpt.metrics, multiple choice goes
through lm-evaluation-harness in minigpt.tasks; this module checks the inputs (leakage, files), runs one Ray task
per model and writes `eval.json`. Streamed (what stages.evaluate asks for under calibrate.worker_memory_gb, on a
CPU), a quality task reads its model one decoder layer at a time (minigpt.evalpass.Streamed: perplexity, bits per
byte, size and samples); multiple choice (lm-eval's HFLM takes a loaded model) and the latency benchmark (the model
as it would be deployed) still load it whole.

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
                   "tokens_per_s", "speedup_vs_dense"} | null,  # null: the models were streamed (no latency)
         "domains": {domain: {"loss", "ppl", "bits_per_byte", "tokens", "bytes", "blocks",
                              "ppl_ci", "bits_per_byte_ci", "documents_measured",       # [lo, hi] intervals
                              "ppl_ratio", "ppl_ratio_ci", "bits_per_byte_ratio", "bits_per_byte_ratio_ci",
                              "documents": {"nll", "tokens", "bytes"},  # per held-out document (bootstrap input)
                              "prefix": {...}}},  # all but experts: the same on the first evaluate.cross_max_blocks
                                                  # blocks, which an expert scores of another domain's split
         "mcq": {"harness", "n", "accuracy", "accuracy_ci", "accuracy_norm", "accuracy_norm_ci", "chance",
                 "by_subject": {...}} | null,
         "general": {same keys as a domain} | null,
         "oos": {domain: {source: {same keys as a domain}}},  # out-of-source text (domains.*.eval_sources):
                                          # the dense model on every domain's, an expert on its own domain's
         "samples": {domain: {"prompt", "text"}},   # greedy continuation of the start of a held-out document
         "sample": str,                   # the first of "samples" (its text)
         "seconds": float}}}              # wall time of the quality task

Ratios and their intervals are to the dense model on the same documents (paired bootstrap, minigpt.metrics).
Non-finite floats (a destroyed model's perplexity) are written as null so the file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minigpt.config import ConfigError, EvaluateConfig
from minigpt.corpora import DomainData
from minigpt.evalpass import Forward, InMemory, as_forward, open_forward, streams
from minigpt.evaltext import EvalSets, LeakageError, check_leakage  # noqa: F401 (LeakageError: re-exported)
from minigpt.io import atomic_write_json, json_safe
from minigpt.memory import peak_rss_mib, report_peaks
from minigpt.metrics import add_intervals, lm_metrics  # lm_metrics: search, quantize and benchmarks use it from here
from minigpt.tasks import MCQItem, mcq_accuracy, read_questions
from minigpt.models import count_parameters, load_model, load_tokenizer
from minigpt.raylib import cluster_cpus, cluster_gpus, ensure_ray

SCHEMA = "minigpt.eval/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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


def generate_samples(model: nn.Module | Forward, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (the new text only). A streamed model continues them all in one pass per
    new token (minigpt.evalpass.Streamed.greedy)."""
    if max_new_tokens <= 0:
        return ["" for _ in prompts]
    ids = [tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
    outs = as_forward(model).greedy(ids, max_new_tokens, tokenizer.eos_token_id)
    return [tokenizer.decode(out[0], skip_special_tokens=True) for out in outs]


def generate_sample(model: nn.Module | Forward, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (the new text only)."""
    return generate_samples(model, tokenizer, [prompt], max_new_tokens)[0]


def sample_prompt(texts: Sequence[str], chars: int) -> str:
    """The first `chars` characters of the first held-out document long enough to continue (twice as long; else
    the longest), cut back to a word boundary, so every model of a domain is prompted with the same domain text."""
    if not texts:
        return ""
    doc = next((t for t in texts if len(t.strip()) >= 2 * chars), max(texts, key=len)).lstrip()
    head = doc[:chars]
    cut = max(head.rfind(" "), head.rfind("\n"))
    return head[:cut] if cut > chars // 2 else head


def sample_domains(label: str, domains: Sequence[str]) -> list[str]:
    """The domains a model is sampled on: an expert ("<domain>/...") its own, any other model every domain."""
    own = label.split("/", 1)[0]
    return [own] if "/" in label and own in domains else list(domains)


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


def _on_gpu(cfg: EvaluateConfig) -> bool:
    return cfg.num_gpus > 0 and torch.cuda.is_available()


def _load(folder: str, cfg: EvaluateConfig):
    model = load_model(folder, cfg.dtype)
    if _on_gpu(cfg):
        model = model.to("cuda")
    return model, load_tokenizer(folder)


def _evaluate_model(label: str, folder: str, domain_texts: dict[str, list[str]], cfg: EvaluateConfig,
                    block_size: int, mcq_items: list[MCQItem] | None, general: list[str] | None,
                    oos_texts: dict[str, dict[str, list[str]]] | None = None, streamed: bool = False,
                    hidden_budget: int | None = None) -> dict:
    """Everything but speed for one model (the body of one Ray task). With `streamed` and the model on the CPU it
    is read one decoder layer at a time (minigpt.evalpass.Streamed), each scored text's residual stream in memory
    up to `hidden_budget` bytes; only multiple choice (lm-eval's HFLM takes a whole model) loads it whole."""
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    t0 = time.perf_counter()
    on_gpu = _on_gpu(cfg)
    model = open_forward(folder, cfg.dtype, streamed=streams(streamed, on_gpu), device="cuda" if on_gpu else "cpu",
                         hidden_budget=hidden_budget)
    tok = load_tokenizer(folder)
    domains = {}
    own = sample_domains(label, list(domain_texts))
    for domain, texts in domain_texts.items():
        # An expert on another domain's text (the cross-domain matrix's off-diagonal) is scored on its first
        # cross_max_blocks blocks; every other model also reports those blocks alone ("prefix"), to pair with.
        cross = cfg.cross_max_blocks if domain not in own else 0
        limit = min(filter(None, (cfg.max_blocks, cross)), default=0)  # the tighter of the two; 0: no limit
        domains[domain] = lm_metrics(model, tok, texts, block_size, cfg.batch_size, limit,
                                     prefix_blocks=0 if len(own) == 1 else cfg.cross_max_blocks)
        print(f"[evaluate] {label} on {domain}: ppl {domains[domain]['ppl']:.3f}, "
              f"{domains[domain]['bits_per_byte']:.4f} bits/byte", flush=True)
    # Out-of-source text: an expert on its own domain's (what it is for), the dense model on all (the reference).
    oos: dict[str, dict] = {}
    for domain in sample_domains(label, list(domain_texts)):
        for source, texts in ((oos_texts or {}).get(domain) or {}).items():
            m = oos.setdefault(domain, {})[source] = lm_metrics(model, tok, texts, block_size, cfg.batch_size,
                                                                cfg.max_blocks)
            print(f"[evaluate] {label} on {domain}/{source} (out of source): ppl {m['ppl']:.3f}", flush=True)
    prompts = {d: sample_prompt(domain_texts[d], cfg.sample_prompt_chars)
               for d in sample_domains(label, list(domain_texts))}
    continued = generate_samples(model, tok, list(prompts.values()), cfg.sample_tokens)
    samples = {d: {"prompt": prompt, "text": text} for (d, prompt), text in zip(prompts.items(), continued)}
    mcq = None
    if mcq_items:
        whole = model.model if isinstance(model, InMemory) else _load(folder, cfg)[0]
        mcq = mcq_accuracy(whole, tok, mcq_items, cfg.batch_size, samples=cfg.bootstrap_samples,
                           confidence=cfg.confidence)
        del whole
        print(f"[evaluate] {label} multiple choice: {mcq['accuracy']:.1%} of {mcq['n']} (chance "
              f"{mcq['chance']:.1%})", flush=True)
    return {
        "dir": folder,
        "size": size_metrics(folder, model.model),  # a streamed model's skeleton has every parameter's shape
        "domains": domains,
        "mcq": mcq,
        "general": (lm_metrics(model, tok, general, block_size, cfg.batch_size, cfg.general_max_blocks)
                    if general else None),
        "oos": oos,
        "samples": samples,
        "sample": next(iter(samples.values()))["text"] if samples else "",
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),  # printed, not written: the task's own only in a fresh process (streamed)
    }


def _speed_model(folder: str, cfg: EvaluateConfig) -> dict:
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    model, _ = _load(folder, cfg)
    return speed_metrics(model, cfg.speed_batch, cfg.speed_seq_len, cfg.speed_repeats)


def _check_inputs(run_dir: Path, models: dict[str, str], domains: list[str], cfg: EvaluateConfig,
                  oos: dict[str, tuple[Path, Sequence[str]]] | None = None
                  ) -> tuple[dict[str, list[str]], list[MCQItem] | None, list[str] | None, dict]:
    """Held-out texts per domain, MCQ items, general texts and out-of-source texts per domain and source, after
    every check that needs no model (leakage of held-out and out-of-source documents included)."""
    if not models:
        raise ConfigError("evaluate: no models to evaluate")
    if not domains:
        raise ConfigError("evaluate: no domains to evaluate on")
    for label, folder in models.items():
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"evaluate: model {label!r}: {folder} has no config.json")
    data = {d: DomainData.load(run_dir / "data" / d) for d in domains}
    oos_texts: dict[str, dict[str, list[str]]] = {}
    for d in domains:
        sets = None
        if d in (oos or {}):
            folder, labels = oos[d]
            sets = EvalSets.load(folder)
            missing = sorted(set(labels) - set(sets.sets))
            if missing:
                raise ConfigError(f"evaluate: domain {d!r}: out-of-source set(s) {', '.join(missing)} not prepared "
                                  f"in {folder}")
            oos_texts[d] = {label: [t for _, t in sets.documents(label)] for label in labels}
        check_leakage(data[d], sets)
    domain_texts = {d: [text for _, text in data[d].documents("heldout")] for d in domains}
    mcq_items = read_questions(cfg.mcq_file, cfg.mcq_subjects, cfg.mcq_limit) if cfg.mcq_file else None
    general = read_general_texts(cfg.general_text) if cfg.general_text else None
    return domain_texts, mcq_items, general, oos_texts



def evaluate_run(run_dir: Path, models: dict[str, str], domains: list[str], cfg: EvaluateConfig,
                 block_size: int, oos: dict[str, tuple[Path, Sequence[str]]] | None = None, streamed: bool = False,
                 hidden_budget: int | None = None) -> dict:
    """Evaluate every model on every domain's held-out documents, and on the out-of-source sets `oos` names
    (domain -> (the folder of its prepared eval sources, their labels)), and write run_dir/eval.json (see module
    doc). `streamed` runs the quality tasks on the CPU layer-streamed (see `_evaluate_model`; the stage asks for it
    under calibrate.worker_memory_gb).

    Inputs are checked (folders, held-out files, leakage, MCQ / general files) before any model is loaded. The
    quality work runs as one Ray task per model, in parallel; the speed benchmark then runs one model at a time
    so that concurrent tasks do not slow each other's timings. Intervals are computed last, on the driver, from
    the per-document sums every task returns (the ratios pair each model with the dense one).
    """
    import ray

    run_dir = Path(run_dir)
    domain_texts, mcq_items, general, oos_texts = _check_inputs(run_dir, models, domains, cfg, oos)
    ensure_ray()
    # A task asking for more than the cluster has would wait forever; say so instead.
    if cluster_cpus() < cfg.num_cpus or cluster_gpus() < cfg.num_gpus:
        raise ConfigError(f"evaluate.num_cpus={cfg.num_cpus}, num_gpus={cfg.num_gpus} per task, but the Ray "
                          f"cluster has {cluster_cpus():g} CPU(s) and {cluster_gpus():g} GPU(s)")
    print(f"[evaluate] {len(models)} model(s) x {len(domains)} domain(s) ("
          + ", ".join(f"{d} {len(domain_texts[d])} held-out documents" for d in domains) + ")"
          + (f", {len(mcq_items)} MCQ questions" if mcq_items else "")
          + (f", general corpus of {len(general)} document(s)" if general else "")
          + "".join(f"; {d} out of source: " + ", ".join(f"{k} {len(v)} documents" for k, v in sets.items())
                    for d, sets in oos_texts.items()), flush=True)
    # Streamed (a memory-bounded job), each model gets a fresh worker process, so the peak it reports is its own.
    fresh = ray.remote(max_calls=1)(_evaluate_model) if streamed else ray.remote(_evaluate_model)
    quality_task = fresh.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    speed_task = ray.remote(_speed_model).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    texts_ref, mcq_ref, general_ref = ray.put(domain_texts), ray.put(mcq_items), ray.put(general)
    oos_ref = ray.put(oos_texts)
    pending = {quality_task.remote(label, str(folder), texts_ref, cfg, block_size, mcq_ref, general_ref,
                                   oos_ref, streamed, hidden_budget): label for label, folder in models.items()}
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
        if streamed:
            print(report_peaks(f"evaluate {label}", [results[label]["peak_rss_mib"]]), flush=True)
    if streamed:  # a latency is the whole model's, resident: what a memory-limited job never loads
        print("[evaluate] speed not measured: the models were streamed (calibrate.worker_memory_gb limits a "
              "worker), and a latency needs the whole model resident", flush=True)
    for label, folder in models.items():
        results[label]["speed"] = None if streamed else ray.get(speed_task.remote(str(folder), cfg))
        if not streamed:
            print(f"[evaluate] {label} speed: {results[label]['speed']['latency_ms']:.1f} ms per "
                  f"{cfg.speed_batch}x{cfg.speed_seq_len} forward", flush=True)

    dense = "dense" if "dense" in results else None
    for res in results.values():
        if res["speed"] is not None:
            res["speed"]["speedup_vs_dense"] = (results[dense]["speed"]["latency_ms"] / res["speed"]["latency_ms"]
                                                if dense else None)
        res["size"]["non_embedding_ratio_vs_dense"] = (
            res["size"]["non_embedding_params"] / results[dense]["size"]["non_embedding_params"] if dense else None)
    add_intervals(results, dense, domains, cfg.bootstrap_samples, cfg.confidence)
    ordered = {label: {k: results[label][k] for k in ("dir", "size", "speed", "domains", "mcq", "general", "oos",
                                                      "samples", "sample", "seconds")} for label in models}
    data = {"schema": SCHEMA, "domains": list(domains), "dense": dense, "block_size": block_size,
            "config": dataclasses.asdict(cfg), "models": ordered}
    atomic_write_json(run_dir / "eval.json", data, indent=2)
    print(f"[evaluate] wrote {run_dir / 'eval.json'}", flush=True)
    return json_safe(data)
