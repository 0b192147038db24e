"""The job report: eval.json (and the pruning plans) rendered as report.md and a self-contained report.html.

It answers first: a headline per expert (how much smaller, how much faster, how much worse on its own domain with a
bootstrap interval, how much worse elsewhere), then the details (held-out tables with intervals, the recovery
curves, the cross-domain matrix, samples prompted from held-out documents of each domain, size, speed, multiple
choice, plans). A plot is drawn only when what it plots varies; a flat line or a one-colour matrix is left to the
tables.

The content is built once (minigpt.plots draws, minigpt.render renders) as report.md with PNGs in report_assets/
and as a self-contained report.html.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minigpt.plots import finite, plot_heatmap, plot_recovery_curves, plot_size_vs_ppl, plot_widths, ratio
from minigpt.render import Plot, Section, Table, write_pages


# ------------------------------------------------------------------------------------------ formatting


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _times(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}×"


def _count(n: Any) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _mb(n: Any) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(ci: Any, fmt) -> str:
    """" [lo–hi]" for a two-number interval, "" when there is none (older eval.json, a destroyed model)."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(finite(v) for v in ci):
        return f" [{fmt(ci[0])}–{fmt(ci[1])}]"
    return ""


def _with_ci(x: Any, ci: Any, digits: int = 3, times: bool = False) -> str:
    if finite(x) and abs(x) >= 1000:
        digits = 0  # a destroyed model's perplexity: its decimals say nothing
    fmt = (lambda v: f"{v:.{digits}f}×") if times else (lambda v: f"{v:.{digits}f}")
    return ("—" if not finite(x) else fmt(x)) + (_ci(ci, fmt) if finite(x) else "")


def _ratio_cell(m: dict, key: str, ref: dict | None) -> tuple[float | None, Any]:
    """(model ÷ dense, its interval) of `key` ("ppl" or "bits_per_byte") in one result `m`: eval.json's paired
    ratio when present, else the quotient of the two figures without an interval."""
    if f"{key}_ratio" in m:
        return m[f"{key}_ratio"], m.get(f"{key}_ratio_ci")
    return ratio(m.get(key), (ref or {}).get(key)), None


def _dcell(models: dict, label: str | None, domain: str) -> dict:
    """models[label]["domains"][domain], {} where any level is missing."""
    return ((models.get(label) or {}).get("domains") or {}).get(domain) or {}


def oos_cells(eval_data: dict, label: str, domain: str) -> list[tuple[str, float | None, Any]]:
    """(source, ppl ÷ dense, interval) of a model on each out-of-source text of `domain` (domains.*.eval_sources)."""
    models = eval_data.get("models") or {}
    ref = ((models.get(eval_data.get("dense")) or {}).get("oos") or {}).get(domain) or {}
    cells = ((models.get(label) or {}).get("oos") or {}).get(domain) or {}
    return [(source, *_ratio_cell(cell, "ppl", ref.get(source))) for source, cell in cells.items()]


def worst_oos(eval_data: dict, label: str, domain: str) -> tuple[str, float, Any] | None:
    """The out-of-source text where the model is furthest above dense (the figure a domain expert answers for)."""
    cells = [c for c in oos_cells(eval_data, label, domain) if finite(c[1])]
    return max(cells, key=lambda c: c[1]) if cells else None


def _domain_rows(eval_data: dict, domain: str) -> list[str]:
    """Models shown in a domain's table: the reference, that domain's experts, else every model."""
    models = eval_data.get("models") or {}
    dense = eval_data.get("dense")
    own = [label for label in models if label.startswith(f"{domain}/")]
    rows = ([dense] if dense in models else []) + own
    return rows if own else list(models)


# ---------------------------------------------------------------------------------------------- model


def _search_section(searches: dict[str, dict]) -> Section:
    """The Pareto front of each searched domain: a table of its points and the search's own plot."""
    sec = Section("Architecture search (Pareto fronts)")
    for domain, s in searches.items():
        rows = []
        for p in s.get("front", []):
            shape = p.get("shape") if isinstance(p.get("shape"), dict) else {}
            rows.append([_pct(p.get("removed")), _count(p.get("params")), str(len(shape.get("kept_layers", ()))),
                         str(shape.get("mlp_width", "—")), str(shape.get("kv_groups", "—")),
                         _num(p.get("loss")), _num(p.get("bits_per_byte"), 4)])
        sec.tables.append(Table(f"Front: {domain}", ["removed", "params", "layers", "MLP width", "KV groups",
                                                     "search-slice loss", "bits/byte"], rows,
                                note="Scored on the search slice (train or calib split), not on held-out text."))
        if s.get("png"):
            sec.plots.append(Plot(f"search_{domain}.png", f"Pareto front: {domain}", s["png"]))
    return sec


def final_experts(eval_data: dict) -> dict[str, str]:
    """domain -> label of the expert a user would ship: recovered when there is one, else pruned."""
    models = eval_data.get("models") or {}
    out = {}
    for d in eval_data.get("domains") or []:
        for kind in ("recovered", "pruned"):
            if f"{d}/{kind}" in models:
                out[d] = f"{d}/{kind}"
                break
    return out


def _others(models: dict, label: str, domain: str, domains: list, dense: str | None) -> list[float]:
    """The expert's perplexity ÷ dense on every other domain (its specialisation)."""
    vals = []
    for o in domains:
        if o == domain:
            continue
        r, _ = _ratio_cell(_dcell(models, label, o), "ppl", _dcell(models, dense, o))
        if finite(r):
            vals.append(r)
    return vals


def headline(eval_data: dict) -> Section:
    """Per expert: size, speed, held-out quality on its domain with its interval, and quality elsewhere."""
    models: dict = eval_data.get("models") or {}
    domains: list = eval_data.get("domains") or []
    dense = eval_data.get("dense")
    conf = (eval_data.get("config") or {}).get("confidence", 0.95)
    sec = Section("Headline")
    rows, lines = [], []
    experts = final_experts(eval_data)
    measured_oos = any(oos_cells(eval_data, label, d) for d, label in experts.items())
    for d, label in experts.items():
        res = models[label]
        size = res.get("size") or {}
        own = _dcell(models, label, d)
        own_ratio, ci = _ratio_cell(own, "ppl", _dcell(models, dense, d))
        others = _others(models, label, d, domains, dense)
        spec = "—" if not others else (f"{others[0]:.2f}×" if len(others) == 1 else
                                       f"{min(others):.2f}–{max(others):.2f}×")
        size_ratio = size.get("non_embedding_ratio_vs_dense")
        speedup = (res.get("speed") or {}).get("speedup_vs_dense")
        worst = worst_oos(eval_data, label, d)
        two = lambda v: f"{v:.2f}"  # noqa: E731
        oos_text = "—" if worst is None else f"{_with_ci(worst[1], worst[2], 2, times=True)} ({worst[0]})"
        row = [label, _count(size.get("non_embedding_params")), _times(size_ratio), _times(speedup)]
        row += [oos_text] if measured_oos else []
        rows.append(row + [_with_ci(own_ratio, ci, times=True), spec, _num(own.get("documents_measured"))])
        if finite(own_ratio) and finite(size_ratio):
            where = (f"; on {d} text from other sources {worst[1]:.2f}× dense{_ci(worst[2], two)} at worst "
                     f"({worst[0]}, of {len(oos_cells(eval_data, label, d))} text(s))" if worst else "")
            lines.append(f"{label}: {1 - size_ratio:.0%} fewer non-embedding parameters"
                         + (f", {speedup:.2f}× the dense speed" if finite(speedup) else "") + where
                         + f"; held-out perplexity {own_ratio:.2f}× dense{_ci(ci, two)} on {d}'s own sources"
                         + (f", {spec} dense on the other domains." if others else "."))
    if rows:
        sec.tables.append(Table("Experts against the dense model", [
            "expert", "non-embedding params", "size ÷ dense", "speedup"]
            + ([f"out-of-source ppl ÷ dense, worst text [{conf:.0%} CI]"] if measured_oos else [])
            + [f"own-source held-out ppl ÷ dense [{conf:.0%} CI]", "other domains ppl ÷ dense",
               "held-out documents"], rows,
            note=f"Intervals: bootstrap over documents ({conf:.0%}, paired with the dense model on the same "
                 "documents). A ratio whose interval excludes 1 differs from dense beyond sampling noise."))
        sec.text += [("", line) for line in lines]
        if not measured_oos:
            sec.text.append(("", "Only text from each domain's own sources was measured (its held-out split). An "
                                 "expert can look better than dense there and still have learned its source's form "
                                 "rather than its domain: list text of the domain from other sources under "
                                 "`domains.<name>.eval_sources` to measure that."))
    else:
        sec.text.append(("", "No expert was evaluated."))
    return sec


def _quality_section(eval_data: dict) -> Section:
    models: dict = eval_data.get("models") or {}
    dense = eval_data.get("dense")
    conf = (eval_data.get("config") or {}).get("confidence", 0.95)
    quality = Section("Quality per domain")
    for d in eval_data.get("domains") or []:
        ref = _dcell(models, dense, d) or None
        rows = []
        for label in _domain_rows(eval_data, d):
            m = _dcell(models, label, d)
            ppl_r, ppl_ci = _ratio_cell(m, "ppl", ref)
            bpb_r, bpb_ci = _ratio_cell(m, "bits_per_byte", ref)
            vs = (lambda r, ci: "reference" if label == dense else _with_ci(r, ci, times=True) if ref else "—")
            rows.append([label, _with_ci(m.get("ppl"), m.get("ppl_ci"), 2), vs(ppl_r, ppl_ci),
                         _with_ci(m.get("bits_per_byte"), m.get("bits_per_byte_ci"), 4), vs(bpb_r, bpb_ci),
                         _num(m.get("documents_measured")), _num(m.get("tokens"))])
        quality.tables.append(Table(f"Domain: {d}", [
            "model", f"perplexity [{conf:.0%} CI]", "ppl ÷ dense", "bits/byte", "bits/byte ÷ dense", "documents",
            "tokens"], rows))
        sources = [c[0] for c in oos_cells(eval_data, dense, d)] if dense else []
        if sources:
            dense_cells = ((models.get(dense) or {}).get("oos") or {}).get(d) or {}
            orows = [["dense (perplexity)"] + [_with_ci(dense_cells[s_].get("ppl"), dense_cells[s_].get("ppl_ci"), 2)
                                               for s_ in sources]]
            for label in _domain_rows(eval_data, d):
                if label == dense:
                    continue
                mine = {c[0]: c for c in oos_cells(eval_data, label, d)}
                orows.append([label] + [_with_ci(mine[s_][1], mine[s_][2], times=True) if s_ in mine else "—"
                                        for s_ in sources])
            quality.tables.append(Table(f"Domain: {d}, text of other sources (ppl ÷ dense [{conf:.0%} CI])",
                                        ["model"] + sources, orows))
    quality.text.append(("", "Bits per byte are comparable across models with different vocabularies; perplexity "
                             "is per each model's own tokens. Intervals are bootstrap percentile intervals over "
                             "held-out documents; ratios resample the same documents for both models."))
    return quality


def _samples_section(eval_data: dict) -> Section:
    """Per domain: the prompt (the start of a held-out document) and each model's greedy continuation."""
    models: dict = eval_data.get("models") or {}
    sec = Section("Samples (greedy, prompted with the start of a held-out document)")
    for d in eval_data.get("domains") or []:
        prompt = next((res["samples"][d]["prompt"] for res in models.values()
                       if d in (res.get("samples") or {})), None)
        if prompt is None:
            continue
        sec.text.append((f"{d}: prompt", prompt))
        for label, res in models.items():
            if d in (res.get("samples") or {}):
                sec.text.append((f"{d}: {label}", "…" + (res["samples"][d].get("text") or "")))
    return sec


_MODES = {"full": "full fine-tuning", "lora": "LoRA", "distill": "distillation"}


def recovery_line(domain: str, rec: dict) -> str | None:
    """One plain sentence on a domain's recovery (summary.json's "recovery"), None without a curve to tell."""
    curve = [h for h in (rec.get("curve") or []) if isinstance(h, dict) and finite(h.get("valid_bpb"))]
    if not curve:
        return None
    start = next((h for h in curve if h.get("step") == 0), None)
    chosen = next((h for h in curve if h.get("step") == rec.get("expert_step")), None)
    end = chosen or min(curve, key=lambda h: h["valid_bpb"])
    line = f"{domain}: validation " + (f"{start['valid_bpb']:.3f} → " if start else "") + f"{end['valid_bpb']:.3f}"
    line += " bits/byte"
    if isinstance(rec.get("tokens"), int):
        line += f" in {rec['tokens']:,} tokens"
        if rec.get("mode"):
            line += f" of {_MODES.get(rec['mode'], rec['mode'])}"
    if finite(rec.get("dense_valid_bpb")):
        line += f" (dense {rec['dense_valid_bpb']:.3f})"
    if isinstance(rec.get("expert_step"), int):
        line += f"; expert taken at step {rec['expert_step']:,}"
        if isinstance(rec.get("steps"), int):
            line += f" of {rec['steps']:,}"
    if rec.get("stopped_early"):
        line += ", stopped early" + (f" (planned {rec['total_steps']:,} steps)"
                                     if isinstance(rec.get("total_steps"), int) else "")
    return line + "."


def _recovery_section(summary: dict) -> Section | None:
    """The recovery curves (validation bits/byte vs tokens trained) and one sentence per domain; None without any."""
    rows = (summary or {}).get("domains") or {}
    lines = [recovery_line(d, row["recovery"]) for d, row in rows.items()
             if isinstance(row, dict) and isinstance(row.get("recovery"), dict)]
    lines = [line for line in lines if line]
    png = plot_recovery_curves(summary)
    if not lines and not png:
        return None
    sec = Section("Recovery")
    if png:
        sec.plots.append(Plot("recovery_curves.png", "Recovery: validation bits/byte vs tokens trained", png))
    sec.text += [("", line) for line in lines]
    sec.text.append(("", "Validation bits/byte on each domain's validation split (not the held-out test text), "
                         "measured before training (step 0: the pruned expert) and during recovery; the expert is "
                         "the best-validated step."))
    return sec


def build_sections(eval_data: dict, plans: dict[str, dict] | None = None,
                   extra: dict | None = None, searches: dict[str, dict] | None = None,
                   summary: dict | None = None) -> list[Section]:
    """The report's content, independent of the output format."""
    models: dict = eval_data.get("models") or {}
    domains: list = eval_data.get("domains") or []
    dense = eval_data.get("dense")
    has_dense = dense in models
    sections: list[Section] = [headline(eval_data), _quality_section(eval_data)]
    recovery = _recovery_section(summary) if summary else None
    if recovery:
        sections.append(recovery)

    matrix = Section("Cross-domain matrix")
    heat = plot_heatmap(eval_data)
    what = "perplexity ÷ dense" if has_dense else "perplexity"
    mrows = []
    for label in models:
        cells = []
        for d in domains:
            v = _dcell(models, label, d).get("ppl")
            cells.append(_num(ratio(v, _dcell(models, dense, d).get("ppl")) if has_dense else v))
        mrows.append([label] + cells)
    matrix.tables.append(Table(f"{what} (rows: models, columns: held-out domains)", ["model"] + list(domains),
                               mrows))
    if heat:
        matrix.plots.append(Plot("cross_domain.png", f"Cross-domain {what}", heat[0]))
    sections.append(matrix)
    sections.append(_samples_section(eval_data))

    size = Section("Size")
    dense_size = (models.get(dense) or {}).get("size") or {}
    srows = []
    for label, res in models.items():
        s = res.get("size") or {}
        srows.append([label, _count(s.get("params")), _count(s.get("non_embedding_params")),
                      _times(ratio(s.get("non_embedding_params"), dense_size.get("non_embedding_params"))),
                      _mb(s.get("weight_bytes")), _num(s.get("vocab_size")), _num(s.get("intermediate_size")),
                      _num(s.get("num_hidden_layers"))])
    size.tables.append(Table("Parameters and weights on disk", ["model", "params", "non-embedding",
                                                                "non-emb ÷ dense", "weights", "vocab",
                                                                "MLP width", "layers"], srows))
    scatter = plot_size_vs_ppl(eval_data)
    if scatter:
        size.plots.append(Plot("size_vs_ppl.png", "Size (non-embedding parameters) vs held-out perplexity",
                               scatter))
    sections.append(size)

    speed = Section("Speed")
    prow = []
    shape = ""
    for label, res in models.items():
        s = res.get("speed") or {}
        shape = shape or (f"batch {s.get('batch_size')} × {s.get('seq_len')} tokens, median of "
                          f"{s.get('repeats')}, {s.get('threads')} thread(s) on {s.get('device')}" if s else "")
        prow.append([label, _num(s.get("latency_ms"), 1), _num(s.get("tokens_per_s"), 0),
                     _times(s.get("speedup_vs_dense"))])
    speed.tables.append(Table("Forward latency", ["model", "latency (ms)", "tokens/s", "speedup vs dense"],
                              prow, note=shape or "not measured: the models were evaluated layer-streamed "
                              "(calibrate.worker_memory_gb), and a latency needs the whole model resident"))
    sections.append(speed)

    if any(res.get("mcq") for res in models.values()):
        mcq = Section("Multiple choice")
        rows = []
        for label, res in models.items():
            m = res.get("mcq") or {}
            pct = (lambda v: f"{100 * v:.1f}%")
            rows.append([label, _num(m.get("n")), _pct(m.get("accuracy")) + _ci(m.get("accuracy_ci"), pct),
                         _pct(m.get("accuracy_norm")) + _ci(m.get("accuracy_norm_ci"), pct), _pct(m.get("chance"))])
        harness = next((res["mcq"].get("harness") for res in models.values() if res.get("mcq")), None)
        mcq.tables.append(Table("Zero-shot accuracy by log-likelihood", [
            "model", "questions", "accuracy", "accuracy (length-normalised)", "chance"], rows,
            note=f"Scored by {harness or 'lm-eval'}; intervals: bootstrap over questions."))
        sections.append(mcq)

    if any(res.get("general") for res in models.values()):
        gen = Section("General text (retention)")
        dense_gen = (models.get(dense) or {}).get("general") or {}
        grows = []
        for label, res in models.items():
            g = res.get("general") or {}
            bpb_r, bpb_ci = _ratio_cell(g, "bits_per_byte", dense_gen) if g else (None, None)
            grows.append([label, _with_ci(g.get("ppl"), g.get("ppl_ci"), 2),
                          _with_ci(g.get("bits_per_byte"), g.get("bits_per_byte_ci"), 4),
                          _with_ci(bpb_r, bpb_ci, times=True)])
        gen.tables.append(Table("General corpus", ["model", "perplexity", "bits/byte", "bits/byte ÷ dense"], grows))
        sections.append(gen)

    if plans:
        sections.append(_plans_section(plans))
    if searches:
        sections.append(_search_section(searches))
    if extra:
        ex = Section("Run")
        ex.tables.append(Table("Details", ["key", "value"], [[str(k), str(v)] for k, v in extra.items()]))
        sections.append(ex)
    return sections


def _plans_section(plans: dict[str, dict]) -> Section:
    pl = Section("Pruning plans")
    rows = []
    for name, plan in plans.items():
        layers = [layer for layer in (plan.get("layers") or []) if isinstance(layer, dict)]
        widths = [len(layer["mlp_keep"]) for layer in layers if isinstance(layer.get("mlp_keep"), list | tuple)]
        inter = plan.get("intermediate_size")
        mean = sum(widths) / len(widths) if widths else None
        rows.append([str(plan.get("domain") or name), str(plan.get("method") or "—"),
                     _num(plan.get("target")), _num(len(layers)),
                     f"{min(widths)}–{max(widths)}" if widths else "—",
                     _pct(ratio(mean, inter)) if inter else "—"])
    pl.tables.append(Table("Plans", ["domain", "method", "target", "layers", "MLP kept (min–max)",
                                     "mean MLP kept"], rows))
    widths_png = plot_widths(plans)
    if widths_png:
        pl.plots.append(Plot("mlp_widths.png", "Kept MLP width per layer", widths_png))
    return pl


def console_table(eval_data: dict) -> str:
    """The summary a job prints at the end: per domain, dense perplexity and each expert's ratio, with intervals."""
    models: dict = eval_data.get("models") or {}
    dense = eval_data.get("dense")
    conf = (eval_data.get("config") or {}).get("confidence", 0.95)
    head = (f"{'domain':<12}{'dense ppl':>22}{'pruned ÷ dense':>22}{'recovered ÷ dense':>22}"
            f"{'rec bits/byte':>15}{'removed':>9}")
    oos = {d: {k: worst_oos(eval_data, f"{d}/{k}", d) for k in ("pruned", "recovered")}
           for d in eval_data.get("domains") or []}
    if any(v for row in oos.values() for v in row.values()):
        head += f"{'out of source, worst text: pruned / recovered':>52}"
    out = [f"held-out perplexity [{conf:.0%} bootstrap interval over documents]", head, "-" * len(head)]
    for d in eval_data.get("domains") or []:
        ref = _dcell(models, dense, d)
        cols = [_with_ci(ref.get("ppl"), ref.get("ppl_ci"), 2)]
        for kind in ("pruned", "recovered"):
            m = _dcell(models, f"{d}/{kind}", d)
            cols.append(_with_ci(*_ratio_cell(m, "ppl", ref), 2, times=True) if m else "-")
        rec = _dcell(models, f"{d}/recovered", d)
        expert = final_experts(eval_data).get(d)
        size_ratio = ((models.get(expert) or {}).get("size") or {}).get("non_embedding_ratio_vs_dense")
        removed = f"{1 - size_ratio:.1%}" if finite(size_ratio) else "-"
        line = (f"{d:<12}{cols[0]:>22}{cols[1]:>22}{cols[2]:>22}{_num(rec.get('bits_per_byte'), 4):>15}"
                f"{removed:>9}")
        if any(oos[d].values()):
            cells = [f"{w[1]:.2f}×" if w else "-" for w in oos[d].values()]
            name = next(w[0] for w in oos[d].values() if w)
            line += f"{' / '.join(cells) + f' ({name})':>52}"
        out.append(line)
    if not any(v for row in oos.values() for v in row.values()):
        out.append("(own-source held-out text only: no domain lists eval_sources)")
    return "\n".join(out)


def write_report(run_dir: Path, eval_data: dict, plans: dict[str, dict] | None = None,
                 extra: dict | None = None, searches: dict[str, dict] | None = None,
                 summary: dict | None = None) -> tuple[Path, Path]:
    """Write run_dir/report.md (+ report_assets/*.png) and a self-contained run_dir/report.html.

    `eval_data` is the eval.json dict (minigpt.eval/1); `plans` maps a name (the domain) to a plan JSON dict
    ({"layers": [{"index", "mlp_keep"}], "intermediate_size", "domain", "method", "target"}; missing keys are
    tolerated); `extra` is shown as a key/value table (job name, timings, ...); `summary` is summary.json
    (minigpt.stages.summarize: per domain its "recovery" curve), read from run_dir when not given.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if summary is None and (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except ValueError:
            summary = None
    sections = build_sections(eval_data, plans, extra, searches, summary if isinstance(summary, dict) else None)
    title = f"minigpt report: {(extra or {}).get('name') or run_dir.name}"
    return write_pages(run_dir, title, sections)
