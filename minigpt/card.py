"""Model cards: the README.md every expert folder holds, in the Hugging Face hub format (YAML front matter, then
Markdown), rendered from the figures the report uses.

`render` is a pure function of `CardFacts` (the plan, the job's settings, the base model's licence, and, once the
evaluation has run, the expert's summary.json row and eval.json speed): what was removed and how, recovery, held-out
and out-of-source quality with their intervals, speed, how to load it, where it came from. The stage that writes an
expert writes its card (before any figure exists: "not measured yet"), and the job rewrites every card when the
evaluation is summarised, so a card never states a figure that summary.json / eval.json do not hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from minigpt.licence import GEMMA_NOTICE, GEMMA_POLICY, Licence, front_matter
from minigpt.plandata import PruningPlan


def _article(word: str) -> str:
    """The indefinite article for a domain name, by its first letter: "an alpha expert", "a legal expert"."""
    return "An" if word[:1].lower() in "aeiou" else "A"


def _recovered(f: CardFacts) -> bool:
    """Trained back after pruning: the recovered expert, or an int8 one quantized from it."""
    return f.kind == "recovered" or (f.kind == "int8" and f.recovery is not None)


def _words(f: CardFacts) -> str:
    base = "pruned and recovered" if _recovered(f) else "pruned"
    return base + (" then int8-quantized" if f.kind == "int8" else "")


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states. `figures` and `speed` are None until the evaluation has run."""

    name: str  # <job>-<domain>-<kind>
    job: str
    domain: str
    kind: str  # pruned, recovered, int8, search-<k>
    base: str  # the base model as the job names it (alias, folder or hub id)
    architecture: str  # the expert's transformers class, e.g. LlamaForCausalLM
    licence: Licence
    plan: PruningPlan
    prune: Mapping[str, Any]  # the job's prune section
    recover: Mapping[str, Any] | None = None  # the job's recover section, when this expert was recovered
    calib: Mapping[str, Any] | None = None  # {"tokens", "documents", "sources": [labels]} of the calibration split
    heldout: Mapping[str, Any] | None = None  # {"tokens", "documents", "sources"} of the held-out split
    recovery: Mapping[str, Any] | None = None  # the expert's recovery manifest (curve, tokens, mode, ...)
    figures: Mapping[str, Any] | None = None  # figures(summary row, kind) or eval_figures(eval.json, ...)
    speed: Mapping[str, Any] | None = None  # eval.json models[label]["speed"]
    confidence: float = 0.95
    job_hash: str = ""
    version: str = ""
    gguf: Sequence[Mapping[str, Any]] = field(default_factory=tuple)  # GGUF files exported from this expert


# ------------------------------------------------------------------------------------------ figures


def figures(row: Mapping[str, Any] | None, kind: str) -> dict | None:
    """An expert's figures from its domain's summary.json row (minigpt.stages.summarize); None if not measured."""
    if not row or row.get(f"{kind}_ppl") is None:
        return None
    return {"dense_ppl": row.get("dense_ppl"), "dense_ppl_ci": row.get("dense_ppl_ci"),
            "dense_bpb": row.get("dense_bpb"),
            "ppl": row.get(f"{kind}_ppl"), "ppl_ratio": row.get(f"{kind}_ppl_ratio"),
            "ppl_ratio_ci": row.get(f"{kind}_ppl_ratio_ci"), "bpb": row.get(f"{kind}_bpb"),
            "non_embedding": row.get(f"{kind}_non_embedding"), "dense_non_embedding": row.get("dense_non_embedding"),
            "oos": {src: {"dense_ppl": r.get("dense_ppl"), "dense_ppl_ci": r.get("dense_ppl_ci"),
                          "documents": r.get("documents"), "ppl_ratio": r.get(f"{kind}_ppl_ratio"),
                          "ppl_ratio_ci": r.get(f"{kind}_ppl_ratio_ci")}
                    for src, r in (row.get("oos") or {}).items()},
            "oos_worst": row.get(f"{kind}_oos_worst")}


def eval_figures(eval_data: Mapping[str, Any], label: str, domain: str) -> dict | None:
    """The same figures for an expert summary.json has no row for (int8, search-k), from eval.json."""
    models = eval_data.get("models") or {}
    mine, dense = (models.get(label) or {}), (models.get(eval_data.get("dense") or "dense") or {})
    cell, ref = (mine.get("domains") or {}).get(domain), (dense.get("domains") or {}).get(domain) or {}
    if not cell:
        return None
    oos = {}
    for src, r in ((dense.get("oos") or {}).get(domain) or {}).items():
        m = ((mine.get("oos") or {}).get(domain) or {}).get(src) or {}
        oos[src] = {"dense_ppl": r.get("ppl"), "dense_ppl_ci": r.get("ppl_ci"),
                    "documents": r.get("documents_measured"),
                    "ppl_ratio": m.get("ppl_ratio"), "ppl_ratio_ci": m.get("ppl_ratio_ci")}
    worst = max(((s, r["ppl_ratio"], r["ppl_ratio_ci"]) for s, r in oos.items() if _finite(r["ppl_ratio"])),
                key=lambda c: c[1], default=None)
    return {"dense_ppl": ref.get("ppl"), "dense_ppl_ci": ref.get("ppl_ci"), "dense_bpb": ref.get("bits_per_byte"),
            "ppl": cell.get("ppl"), "ppl_ratio": cell.get("ppl_ratio"), "ppl_ratio_ci": cell.get("ppl_ratio_ci"),
            "bpb": cell.get("bits_per_byte"), "non_embedding": (mine.get("size") or {}).get("non_embedding_params"),
            "dense_non_embedding": (dense.get("size") or {}).get("non_embedding_params"), "oos": oos,
            "oos_worst": {"source": worst[0], "ppl_ratio": worst[1], "ppl_ratio_ci": worst[2]} if worst else None}


# ------------------------------------------------------------------------------------------ formatting


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _r(x: Any, digits: int = 4) -> Any:
    """A figure for the front matter: rounded, None when missing or not finite."""
    return round(float(x), digits) if _finite(x) else None


def _ci(ci: Any) -> list | None:
    return [_r(ci[0]), _r(ci[1])] if isinstance(ci, list | tuple) and len(ci) == 2 and all(map(_finite, ci)) else None


def _num(x: Any, digits: int = 2) -> str:
    return f"{x:,.{digits}f}" if _finite(x) else "—"


def _times(x: Any, ci: Any = None) -> str:
    if not _finite(x):
        return "—"
    c = _ci(ci)
    return f"{x:.3f}×" + (f" [{c[0]:.3f}–{c[1]:.3f}]" if c else "")


def _count(n: Any) -> str:
    return "—" if not _finite(n) else (f"{n / 1e6:.1f}M" if n >= 1e5 else f"{int(n):,}")


# ------------------------------------------------------------------------------------------ front matter


def _metrics_index(f: CardFacts) -> list[dict]:
    fig = f.figures
    if not fig:
        return []
    ci_key = f"ci_{round(100 * f.confidence)}"
    sources = ", ".join((f.heldout or f.calib or {}).get("sources") or []) or f.domain

    def ratio(value, ci, dense_ppl):
        args = {k: v for k, v in ((ci_key, _ci(ci)), ("dense_perplexity", _r(dense_ppl))) if v is not None}
        return {"name": "perplexity ÷ dense", "type": "perplexity_ratio", "value": _r(value), **({"args": args} if args
                                                                                                 else {})}

    results = [{"task": {"type": "text-generation", "name": "Causal language modeling"},
                "dataset": {"name": f"{f.domain} held-out ({sources})", "type": f"minigpt/{f.domain}/heldout"},
                "metrics": [m for m in ({"name": "perplexity", "type": "perplexity", "value": _r(fig.get("ppl"))},
                                        ratio(fig.get("ppl_ratio"), fig.get("ppl_ratio_ci"), fig.get("dense_ppl")),
                                        {"name": "bits per byte", "type": "bits_per_byte", "value": _r(fig.get("bpb"))})
                            if m["value"] is not None]}]
    for src, r in (fig.get("oos") or {}).items():
        if _finite(r.get("ppl_ratio")):
            results.append({"task": {"type": "text-generation", "name": "Causal language modeling"},
                            "dataset": {"name": f"{f.domain} out of source: {src}",
                                        "type": f"minigpt/{f.domain}/oos/{src}"},
                            "metrics": [ratio(r["ppl_ratio"], r.get("ppl_ratio_ci"), r.get("dense_ppl"))]})
    return [{"name": f.name, "results": [r for r in results if r["metrics"]]}]


def front(f: CardFacts, library: str = "transformers") -> dict:
    """The card's YAML front matter as a mapping (hub fields first)."""
    lic = f.licence
    meta: dict[str, Any] = {}
    if lic.base_model:
        meta["base_model"] = lic.base_model
    meta["license"] = lic.id
    if lic.id == "other":
        meta["license_name"] = lic.name if lic.known else "unknown"
        if lic.link:
            meta["license_link"] = lic.link
    meta["library_name"] = library
    meta["pipeline_tag"] = "text-generation"
    tags = ["minigpt", "pruned", "domain-expert", f.domain, f.plan.method, f.plan.model_type]
    tags += ["recovered"] if _recovered(f) else []
    tags += ["int8"] if f.kind == "int8" else []
    tags += ["gguf"] if f.gguf or library == "gguf" else []
    meta["tags"] = list(dict.fromkeys(tags))
    index = _metrics_index(f)
    if index:
        meta["model-index"] = index
    return meta


# ------------------------------------------------------------------------------------------ body


def _removed(f: CardFacts) -> list[str]:
    p = f.plan
    pr = p.params or {}
    kv = p.kv_width or p.kv_groups
    layers = len(p.layers)
    rows = [("MLP width", f"{p.intermediate_size:,}", f"{p.mlp_width:,}")]
    if p.kv_groups:
        rows.append(("KV groups per layer", str(p.kv_groups), str(kv)))
    if p.q_width:
        rows.append(("query heads per KV group", "—", str(p.q_width)))
    rows.append(("layers", str(p.num_layers), str(layers) + (f" (dropped {list(p.dropped_layers)})"
                                                             if p.dropped_layers else "")))
    if p.vocab_keep is not None:
        rows.append(("vocabulary", f"{p.vocab_size:,}", f"{len(p.vocab_keep):,}"))
    dne, ne = pr.get("dense_non_embedding"), pr.get("non_embedding")
    if dne and ne:
        rows.append(("non-embedding parameters", _count(dne), f"{_count(ne)} (−{1 - ne / dne:.1%})"))
    if pr.get("dense_total") and pr.get("total"):
        rows.append(("total parameters", _count(pr["dense_total"]), _count(pr["total"])))
    lines = ["| | base | expert |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    how = [f"Method: `{p.method}`, target {p.target:.0%} of non-embedding parameters"
           + (", chosen and refit layer by layer on the pruned model's own activations" if p.sequential else "")
           + (", kept weights refit by least squares" if p.reconstruct and not p.replace else "")
           + (", dropped layers replaced by a linear map" if p.replace else "") + "."]
    if f.calib:
        how += ["", f"Calibration: {f.calib.get('tokens', 0):,} tokens from {f.calib.get('documents', '?')} "
                    "documents of "
                   f"{', '.join(f.calib.get('sources') or []) or '?'} (the domain's calibration split, chosen by a "
                   "hash of each document; never used for evaluation)."]
    settings = yaml.safe_dump({"prune": dict(f.prune)}, sort_keys=False).strip()
    return ["## What was removed", "", *lines, "", *how, "", "The job's prune settings:", "", "```yaml", settings,
            "```", ""]


def _recovery(f: CardFacts) -> list[str]:
    if not _recovered(f):
        return ["## Recovery", "", "None: this is the expert as slimmed (its recovered sibling, when the job "
                "recovers, is in `../recovered`).", ""]
    rec = f.recovery or {}
    out = ["## Recovery", ""]
    mode, tokens = rec.get("mode") or (f.recover or {}).get("mode"), rec.get("tokens")
    out.append(f"Mode `{mode}`" + (f", {tokens:,} training tokens" if isinstance(tokens, int) else "")
               + (f" in {rec['steps']} of {rec.get('total_steps', rec['steps'])} steps" if rec.get("steps") else "")
               + (" (stopped early)" if rec.get("stopped_early") else "") + ", on the domain's train split"
               + ("" if mode != "distill" else " against the dense model's cached top-k log-probabilities") + ".")
    curve = [c for c in rec.get("curve") or [] if _finite(c.get("valid_bpb"))]
    if curve:
        best = min(curve, key=lambda c: c["valid_bpb"])
        out.append(f"Validation bits per byte: {curve[0]['valid_bpb']:.4f} at step {curve[0]['step']} → "
                   f"{curve[-1]['valid_bpb']:.4f} at step {curve[-1]['step']}; the weights kept are step "
                   f"{rec.get('expert_step', best['step'])}'s ({best['valid_bpb']:.4f})"
                   + (f"; dense model {rec['dense_valid_bpb']:.4f}" if _finite(rec.get("dense_valid_bpb")) else "")
                   + ".")
    if f.recover:
        settings = yaml.safe_dump({"recover": {k: v for k, v in dict(f.recover).items() if k not in
                                               ("deepspeed_config", "keep_checkpoints", "max_failures",
                                                "checkpoint_every")}}, sort_keys=False).strip()
        out += ["", "```yaml", settings, "```"]
    return out + [""]


def _evaluation(f: CardFacts) -> list[str]:
    fig = f.figures
    out = ["## Evaluation", ""]
    if not fig:
        return out + ["Not measured yet: this card is rewritten with the held-out and out-of-source figures when "
                      "the job's evaluation finishes.", ""]
    level = f"{f.confidence:.0%}"
    held = f.heldout or {}
    out.append(f"Perplexity on text no stage before the evaluation saw, as a ratio to the base model's on the same "
               f"text, with {level} bootstrap intervals over documents (lower is better; 1.000× = as good as the "
               "base model).")
    out += ["", "| text | base ppl | this expert ÷ base | bits/byte |", "|---|---|---|---|"]
    src = ", ".join(held.get("sources") or []) or "own source"
    docs = f", {held['documents']} documents" if held.get("documents") else ""
    dci = _ci(fig.get("dense_ppl_ci"))
    out.append(f"| held-out ({src}{docs}) | {_num(fig.get('dense_ppl'))}"
               + (f" [{dci[0]:.2f}–{dci[1]:.2f}]" if dci else "")
               + f" | **{_times(fig.get('ppl_ratio'), fig.get('ppl_ratio_ci'))}** | {_num(fig.get('bpb'), 3)} |")
    for s, r in (fig.get("oos") or {}).items():
        oci = _ci(r.get("dense_ppl_ci"))
        out.append(f"| out of source: {s}" + (f" ({r['documents']} documents)" if r.get("documents") else "")
                   + f" | {_num(r.get('dense_ppl'))}" + (f" [{oci[0]:.2f}–{oci[1]:.2f}]" if oci else "")
                   + f" | {_times(r.get('ppl_ratio'), r.get('ppl_ratio_ci'))} | — |")
    worst = fig.get("oos_worst")
    out.append("")
    if worst and _finite(worst.get("ppl_ratio")):
        out.append(f"Worst text from another source: {worst['source']}, "
                   f"{_times(worst['ppl_ratio'], worst.get('ppl_ratio_ci'))} the base model's perplexity.")
    else:
        out.append("Only text from the domain's own source was measured (the job set no eval_sources): how the "
                   "expert does on other text of its domain is not known.")
    sp = f.speed
    if sp and _finite(sp.get("latency_ms")):
        out += ["", f"Speed: {sp['latency_ms']:.1f} ms per forward pass of {sp.get('batch_size', '?')}×"
                    f"{sp.get('seq_len', '?')} tokens ({_num(sp.get('tokens_per_s'), 0)} tokens/s"
                    + (f", {sp['speedup_vs_dense']:.2f}× the base model's speed" if _finite(sp.get('speedup_vs_dense'))
                       else "")
                    + f"; {sp.get('device', 'cpu')}, {sp.get('threads', '?')} threads, measured by the job)."]
    return out + [""]


def _loading(f: CardFacts, library: str) -> list[str]:
    out = ["## How to load it", ""]
    if library != "gguf":
        out += ["A stock checkpoint of the base model's architecture with smaller widths (one width for every layer): "
                f"`{f.architecture}`, no custom code, no minigpt.", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```"]
        if f.kind == "int8":
            out += ["", "The weights are torchao int8 tensors: loading needs the torchao package."]
        out.append("")
    if f.gguf:
        out += gguf_section(f.gguf)
    return out


def gguf_section(gguf: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines listing GGUF files exported from an expert, with their read-back check and how to run them."""
    out = ["### GGUF (llama.cpp)", "", "| file | type | size | check |", "|---|---|---|---|"]
    for g in gguf:
        out.append(f"| `{g['file']}` | {g['type']} | {g.get('bytes', 0) / 1e6:.1f} MB | {_gguf_check(g)} |")
    first = gguf[0]["file"]
    return out + ["", "```bash", f'llama-cli -m {first} -p "..."', "```", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("path/to/folder", gguf_file="{first}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("path/to/folder", gguf_file="{first}")', "```", ""]


def with_gguf(card_text: str, gguf: Sequence[Mapping[str, Any]]) -> str:
    """An expert's card for a folder of GGUF files exported from it: the `gguf` tag and the files' section added
    (what `minigpt export` writes beside the files, from the expert's own card)."""
    meta = front_matter(card_text)
    m = re.match(r"\A---\s*\n.*?\n---\s*(\n|\Z)", card_text, re.S)
    body = card_text[m.end():].lstrip("\n") if m else card_text
    # A card exported before lists the old files: its section is replaced, up to the next section.
    body = re.sub(r"^### GGUF \(llama\.cpp\)\n.*?(?=^## |\Z)", "", body, flags=re.S | re.M)
    meta["tags"] = list(dict.fromkeys([*(meta.get("tags") or []), "gguf"]))
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000).strip()
    return f"---\n{head}\n---\n\n" + body.rstrip() + "\n\n" + "\n".join(gguf_section(gguf)).rstrip() + "\n"


def _gguf_check(g: Mapping[str, Any]) -> str:
    v = g.get("verify") or {}
    if not v:
        return "not checked"
    if v.get("skipped"):
        return str(v["skipped"])
    parts = []
    if _finite(v.get("max_abs_logit_diff")):
        parts.append(f"logits within {v['max_abs_logit_diff']:.2g} of the expert's")
    if _finite(v.get("ppl_ratio")):
        parts.append(f"perplexity {v['ppl_ratio']:.4f}× the expert's on {v.get('blocks', '?')} held-out blocks")
    return "; ".join(parts) + " (read back with transformers)"


def _licence(f: CardFacts) -> list[str]:
    lic = f.licence
    base = f"[{lic.base_model}](https://huggingface.co/{lic.base_model})" if lic.base_model else f"`{f.base}`"
    out = ["## Licence", "", f"This model is a **modified derivative** of {base} (its weights were cut and, for a "
           "recovered expert, trained further by minigpt) and is distributed under the base model's terms: "
           + (f"**{lic.name}** (`{lic.id}`)." if lic.known else "**unknown**: the base model states no licence minigpt "
              "could read, so the `license` field says `other`. Find and add its terms before distributing this "
              "model.")]
    if lic.gemma:
        out += ["", "This model is a Gemma Model Derivative under the Gemma Terms of Use: `NOTICE` in this folder "
                f"reads \"{GEMMA_NOTICE}\", "
                "`GEMMA_TERMS.html` is a copy of the terms, and the use restrictions of their Section 3.2 (the Gemma "
                f"Prohibited Use Policy, {GEMMA_POLICY}) apply to everyone who uses or receives this model: pass them "
                "on as an enforceable provision in any agreement under which you distribute it."]
    files = [n for n, _ in lic.files] + ["NOTICE"]
    out += ["", f"Files carrying the terms: {', '.join(f'`{n}`' for n in files)} (source: {lic.source}).",
            "", "Modified files: `config.json`, `generation_config.json` and the weights (`*.safetensors`) were "
            "written "
            "by minigpt and differ from the base model's; the tokenizer files are the base model's"
            + (" with the vocabulary cut to the tokens this domain uses" if f.plan.vocab_keep is not None else "")
            + ".", ""]
    return out


def _provenance(f: CardFacts) -> list[str]:
    return ["## Provenance", "", f"- base model: `{f.base}`" + (f" ({lic})" if (lic := f.licence.base_model) else ""),
            f"- made by minigpt {f.version or '?'} (job `{f.job}`, "
            f"resolved job file sha256 `{f.job_hash or '?'}`), domain `{f.domain}`, expert `{f.kind}`",
            f"- pruning plan: `plans/{f.domain}.json` of the run folder", ""]


def render(f: CardFacts, library: str = "transformers") -> str:
    """README.md text of an expert folder (library "gguf": the card of a folder of GGUF files exported from it)."""
    meta = yaml.safe_dump(front(f, library), sort_keys=False, allow_unicode=True, width=1000).strip()
    title = f"# {f.name}"
    pr = f.plan.params or {}
    cut = (f"{1 - pr['non_embedding'] / pr['dense_non_embedding']:.1%}" if pr.get("non_embedding") and
           pr.get("dense_non_embedding") else f"{f.plan.target:.0%}")
    lead = (f"{_article(f.domain)} {f.domain} expert {_words(f)} from `{f.base}` by minigpt {f.version}: {cut} of the "
            f"non-embedding parameters removed physically by `{f.plan.method}`, chosen on text of the domain"
            + (", then trained back on it" if _recovered(f) else "") + ".")
    body = [title, "", lead, "", *_evaluation(f), *_removed(f), *_recovery(f), *_loading(f, library), *_licence(f),
            *_provenance(f)]
    return f"---\n{meta}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def parse(text: str) -> dict:
    """The front matter of a card (the inverse of `front` for tests and for the GGUF metadata)."""
    return front_matter(text)


__all__ = ["CardFacts", "eval_figures", "figures", "front", "gguf_section", "parse", "render", "with_gguf"]
