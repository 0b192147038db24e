"""The job report: eval.json (and the pruning plans) rendered as report.md and a self-contained report.html.

The tables and plots are built once and rendered twice: report.md points at PNG files in report_assets/ next to
it, report.html embeds the same PNGs as base64 data URIs with inline CSS, so it can be mailed or attached to a CI
run as one file. Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so rendering does not
touch global state and needs no display.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = "report_assets"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Plot:
    name: str  # file name in report_assets/
    title: str
    png: bytes


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    text: list[tuple[str, str]] = field(default_factory=list)  # (label, preformatted text)


# ------------------------------------------------------------------------------------------ formatting


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


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


def _cell(models: dict, label: str, domain: str, key: str) -> float | None:
    return ((models.get(label) or {}).get("domains") or {}).get(domain, {}).get(key)


def _domain_rows(eval_data: dict, domain: str) -> list[str]:
    """Models shown in a domain's table: the reference, that domain's experts, else every model."""
    models = eval_data.get("models") or {}
    dense = eval_data.get("dense")
    own = [label for label in models if label.startswith(f"{domain}/")]
    rows = ([dense] if dense in models else []) + own
    return rows if own else list(models)


# ---------------------------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plain_log_ticks(axis) -> None:
    # Log axes over less than a decade would otherwise read "2 x 10^1"; plain numbers are easier to compare.
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _plot_size_vs_ppl(eval_data: dict) -> bytes | None:
    from matplotlib.figure import Figure

    models = eval_data.get("models") or {}
    domains = eval_data.get("domains") or []
    if not models or not domains:
        return None
    ncols = min(3, len(domains))
    nrows = math.ceil(len(domains) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows))
    for k, domain in enumerate(domains):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for label, res in models.items():
            x = (res.get("size") or {}).get("non_embedding_params")
            y = _cell(models, label, domain, "ppl")
            if x is None or y is None:
                continue
            own = label.startswith(f"{domain}/")
            marker = "*" if label == eval_data.get("dense") else ("o" if own else ".")
            ax.scatter([x / 1e6], [y], marker=marker, s=90 if own or marker == "*" else 30,
                       color="C3" if marker == "*" else ("C0" if own else "0.6"), zorder=3)
            if own or marker == "*":  # other domains' experts stay unlabelled grey dots: the matrix names them
                ax.annotate(label, (x / 1e6, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"held-out: {domain}", fontsize=10)
        ax.set_xlabel("non-embedding parameters (M)", fontsize=8)
        ax.set_ylabel("perplexity", fontsize=8)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _plot_heatmap(eval_data: dict) -> tuple[bytes, str] | None:
    from matplotlib.figure import Figure

    models = eval_data.get("models") or {}
    domains = eval_data.get("domains") or []
    dense = eval_data.get("dense")
    if not models or not domains:
        return None
    labels = list(models)
    relative = dense in models
    grid = []
    for label in labels:
        row = []
        for d in domains:
            v = _cell(models, label, d, "ppl")
            if relative:
                v = _ratio(v, _cell(models, dense, d, "ppl"))
            row.append(float("nan") if v is None else v)
        grid.append(row)
    fig = Figure(figsize=(1.3 * len(domains) + 3, 0.45 * len(labels) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    finite = [v for row in grid for v in row if math.isfinite(v) and v > 0]
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=min(finite), vmax=max(max(finite), min(finite) * 1.01)) if finite else None
    im = ax.imshow(grid, cmap="RdYlGn_r", norm=norm, aspect="auto")
    ax.set_xticks(range(len(domains)), domains, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("held-out domain", fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if not math.isfinite(v) else (f"{v:.2f}" if relative else f"{v:.1f}"),
                    ha="center", va="center", fontsize=7)
    what = "perplexity ÷ dense" if relative else "perplexity"
    _plain_log_ticks(fig.colorbar(im, ax=ax, label=what).ax.yaxis)
    ax.set_title(f"cross-domain {what}", fontsize=10)
    fig.tight_layout()
    return _png(fig), what


def _plot_widths(plans: dict[str, dict]) -> bytes | None:
    from matplotlib.figure import Figure

    series = []
    inter = None
    for name, plan in plans.items():
        layers = [layer for layer in (plan.get("layers") or []) if isinstance(layer, dict)]
        pts = sorted((layer.get("index", i), len(layer["mlp_keep"])) for i, layer in enumerate(layers)
                     if isinstance(layer.get("mlp_keep"), list | tuple))
        if pts:
            series.append((plan.get("domain") or name, plan.get("method"), pts))
        inter = inter or plan.get("intermediate_size")
    if not series:
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for domain, method, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                label=f"{domain} ({method})" if method else domain)
    if inter:
        ax.axhline(inter, color="0.5", linestyle="--", linewidth=1, label="dense width")
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("MLP channels kept", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("kept MLP width per layer", fontsize=10)
    fig.tight_layout()
    return _png(fig)


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


def build_sections(eval_data: dict, plans: dict[str, dict] | None = None,
                   extra: dict | None = None, searches: dict[str, dict] | None = None) -> list[Section]:
    """The report's content, independent of the output format."""
    models: dict = eval_data.get("models") or {}
    domains: list = eval_data.get("domains") or []
    dense = eval_data.get("dense")
    has_dense = dense in models
    sections: list[Section] = []

    quality = Section("Held-out quality per domain")
    for d in domains:
        rows = []
        for label in _domain_rows(eval_data, d):
            m = (models[label].get("domains") or {}).get(d) or {}
            rows.append([label, _num(m.get("ppl")), _num(m.get("bits_per_byte"), 4),
                         _times(_ratio(m.get("ppl"), _cell(models, dense, d, "ppl"))) if has_dense else "—",
                         _times(_ratio(m.get("bits_per_byte"), _cell(models, dense, d, "bits_per_byte")))
                         if has_dense else "—",
                         _num(m.get("tokens")), _num(m.get("bytes"))])
        quality.tables.append(Table(f"Domain: {d}", ["model", "perplexity", "bits/byte", "ppl ÷ dense",
                                                     "bits/byte ÷ dense", "tokens", "bytes"], rows))
    quality.text.append(("", "Bits per byte are comparable across models with different vocabularies; perplexity "
                             "is per each model's own tokens."))
    sections.append(quality)

    matrix = Section("Cross-domain matrix")
    heat = _plot_heatmap(eval_data)
    what = heat[1] if heat else "perplexity"
    mrows = []
    for label in models:
        cells = []
        for d in domains:
            v = _cell(models, label, d, "ppl")
            cells.append(_num(_ratio(v, _cell(models, dense, d, "ppl")) if has_dense else v))
        mrows.append([label] + cells)
    matrix.tables.append(Table(f"{what} (rows: models, columns: held-out domains)", ["model"] + list(domains),
                               mrows))
    if heat:
        matrix.plots.append(Plot("cross_domain.png", f"Cross-domain {what}", heat[0]))
    sections.append(matrix)

    size = Section("Size")
    dense_size = (models.get(dense) or {}).get("size") or {}
    srows = []
    for label, res in models.items():
        s = res.get("size") or {}
        srows.append([label, _count(s.get("params")), _count(s.get("non_embedding_params")),
                      _times(_ratio(s.get("non_embedding_params"), dense_size.get("non_embedding_params"))),
                      _mb(s.get("weight_bytes")), _num(s.get("vocab_size")), _num(s.get("intermediate_size")),
                      _num(s.get("num_hidden_layers"))])
    size.tables.append(Table("Parameters and weights on disk", ["model", "params", "non-embedding",
                                                                "non-emb ÷ dense", "weights", "vocab",
                                                                "MLP width", "layers"], srows))
    scatter = _plot_size_vs_ppl(eval_data)
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
                              prow, note=shape))
    sections.append(speed)

    if any(res.get("mcq") for res in models.values()):
        mcq = Section("Multiple choice")
        mcq.tables.append(Table("Zero-shot accuracy by log-likelihood", ["model", "questions", "accuracy",
                                                                        "accuracy (per-byte norm)", "chance"],
                                [[label, _num((res.get("mcq") or {}).get("n")),
                                  _pct((res.get("mcq") or {}).get("accuracy")),
                                  _pct((res.get("mcq") or {}).get("accuracy_norm")),
                                  _pct((res.get("mcq") or {}).get("chance"))] for label, res in models.items()]))
        sections.append(mcq)

    if any(res.get("general") for res in models.values()):
        gen = Section("General text (retention)")
        dense_gen = (models.get(dense) or {}).get("general") or {}
        gen.tables.append(Table("General corpus", ["model", "perplexity", "bits/byte", "bits/byte ÷ dense"],
                                [[label, _num((res.get("general") or {}).get("ppl")),
                                  _num((res.get("general") or {}).get("bits_per_byte"), 4),
                                  _times(_ratio((res.get("general") or {}).get("bits_per_byte"),
                                                dense_gen.get("bits_per_byte")))]
                                 for label, res in models.items()]))
        sections.append(gen)

    if plans:
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
                         _pct(_ratio(mean, inter)) if inter else "—"])
        pl.tables.append(Table("Plans", ["domain", "method", "target", "layers", "MLP kept (min–max)",
                                         "mean MLP kept"], rows))
        widths_png = _plot_widths(plans)
        if widths_png:
            pl.plots.append(Plot("mlp_widths.png", "Kept MLP width per layer", widths_png))
        sections.append(pl)

    samples = Section("Greedy samples")
    prompt = (eval_data.get("config") or {}).get("sample_prompt")
    for label, res in models.items():
        samples.text.append((label, f"{prompt or ''}{res.get('sample') or ''}"))
    sections.append(samples)

    if searches:
        sections.append(_search_section(searches))

    if extra:
        ex = Section("Run")
        ex.tables.append(Table("Details", ["key", "value"], [[str(k), str(v)] for k, v in extra.items()]))
        sections.append(ex)
    return sections


# -------------------------------------------------------------------------------------------- renderers


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for t in sec.tables:
            out += [f"**{t.title}**", "", "| " + " | ".join(_md_escape(h) for h in t.headers) + " |",
                    "|" + "|".join("---" for _ in t.headers) + "|"]
            out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in t.rows]
            out += (["", f"_{t.note}_"] if t.note else []) + [""]
        for p in sec.plots:
            out += [f"![{p.title}]({ASSETS}/{p.name})", ""]
        for label, text in sec.text:
            if label:
                out += [f"**{label}**", "", "```text", text.replace("```", "'''"), "```", ""]
            else:
                out += [text, ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{border-bottom:2px solid #444}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:600;padding:.3em 0}
.note{color:#666;font-size:.85em;margin-top:-.8em}figure{margin:1em 0}figcaption{color:#555;font-size:.85em}
img{max-width:100%}pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap;border-left:3px solid #bbb}
"""


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{e(sec.title)}</h2>")
        for t in sec.tables:
            out.append(f"<table><caption>{e(t.title)}</caption><thead><tr>"
                       + "".join(f"<th>{e(h)}</th>" for h in t.headers) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows]
            out.append("</tbody></table>")
            if t.note:
                out.append(f'<p class="note">{e(t.note)}</p>')
        for p in sec.plots:
            data = base64.b64encode(p.png).decode("ascii")
            out.append(f'<figure><img alt="{e(p.title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(p.title)}</figcaption></figure>")
        for label, text in sec.text:
            out.append((f"<h3>{e(label)}</h3><pre>{e(text)}</pre>") if label else f"<p>{e(text)}</p>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- writing


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_assets_atomic(run_dir: Path, plots: list[Plot]) -> None:
    target = run_dir / ASSETS
    tmp = Path(tempfile.mkdtemp(prefix=f".{ASSETS}-", dir=run_dir))
    try:
        for p in plots:
            (tmp / p.name).write_bytes(p.png)
        old = None
        if target.exists():
            # A folder cannot be replaced in one rename; move the old one aside first, then drop it.
            old = Path(tempfile.mkdtemp(prefix=f".{ASSETS}-old-", dir=run_dir))
            os.rename(target, old / ASSETS)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report(run_dir: Path, eval_data: dict, plans: dict[str, dict] | None = None,
                 extra: dict | None = None, searches: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """Write run_dir/report.md (+ report_assets/*.png) and a self-contained run_dir/report.html.

    `eval_data` is the eval.json dict (minigpt.eval/1); `plans` maps a name (the domain) to a plan JSON dict
    ({"layers": [{"index", "mlp_keep"}], "intermediate_size", "domain", "method", "target"}; missing keys are
    tolerated); `extra` is shown as a key/value table (job name, timings, ...).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sections = build_sections(eval_data, plans, extra, searches)
    title = f"minigpt report: {(extra or {}).get('name') or run_dir.name}"
    _write_assets_atomic(run_dir, [p for sec in sections for p in sec.plots])
    md, page = run_dir / "report.md", run_dir / "report.html"
    _write_text_atomic(md, render_markdown(title, sections))
    _write_text_atomic(page, render_html(title, sections))
    return md, page
