"""The report's plots, each drawn only when what it plots varies (a flat line or a one-colour matrix says nothing
the tables do not). matplotlib's object API (Figure + Agg canvas), never pyplot: no global state, no display.
matplotlib is imported inside each function (only a report or a search draws): it stays off every other start-up.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def cell(models: dict, label: str, domain: str, key: str) -> float | None:
    """models[label]["domains"][domain][key], None where any level is missing."""
    return ((models.get(label) or {}).get("domains") or {}).get(domain, {}).get(key)


def varies(values: list) -> bool:
    """Whether the finite numbers among `values` take more than one value (a plot would show something)."""
    return len({round(float(v), 9) for v in values if finite(v)}) > 1


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


def plot_size_vs_ppl(eval_data: dict) -> bytes | None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    models = eval_data.get("models") or {}
    domains = eval_data.get("domains") or []
    if not models or not domains:
        return None
    ncols = min(3, len(domains))
    nrows = math.ceil(len(domains) / ncols)
    points = [((res.get("size") or {}).get("non_embedding_params"), cell(models, label, d, "ppl"))
              for label, res in models.items() for d in domains]
    if not varies([x for x, _ in points]) and not varies([y for _, y in points]):
        return None
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows))
    for k, domain in enumerate(domains):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for label, res in models.items():
            x = (res.get("size") or {}).get("non_embedding_params")
            y = cell(models, label, domain, "ppl")
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
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_ylabel("perplexity", fontsize=8)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_heatmap(eval_data: dict) -> tuple[bytes, str] | None:
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
            v = cell(models, label, d, "ppl")
            if relative:
                v = ratio(v, cell(models, dense, d, "ppl"))
            row.append(float("nan") if v is None else v)
        grid.append(row)
    if not varies([v for row in grid for v in row]):
        return None
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


def plot_widths(plans: dict[str, dict]) -> bytes | None:
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
    # Uniform plans (the default) keep the same width in every layer: a flat line says nothing the table does not.
    if not any(varies([w for _, w in pts]) for _, _, pts in series):
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


def _curve_points(rec: Any) -> list[tuple[int, float, int | None]]:
    """(tokens, valid_bpb, step) of a summary row's recovery curve, finite points only, by tokens."""
    curve = (rec or {}).get("curve") if isinstance(rec, dict) else None
    pts = [(h.get("tokens"), h.get("valid_bpb"), h.get("step")) for h in (curve or []) if isinstance(h, dict)]
    return sorted((t, b, s) for t, b, s in pts if finite(t) and finite(b))


def plot_recovery_curves(summary: dict) -> bytes | None:
    """One panel per domain: the expert's validation bits/byte against tokens trained, the pruned start (step 0)
    and the chosen expert marked, the dense model as a dashed reference. None when no curve has two points."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = (summary or {}).get("domains") or {}
    points = {d: _curve_points(row.get("recovery")) for d, row in rows.items() if isinstance(row, dict)}
    curves = {d: (pts, rows[d]["recovery"]) for d, pts in points.items() if len(pts) >= 2}
    if not curves:
        return None
    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows))
    for k, (domain, (pts, rec)) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        xs, ys = [t for t, _, _ in pts], [b for _, b, _ in pts]
        ax.plot(xs, ys, marker="o", markersize=3, color="C0", label="expert (validation)")
        if pts[0][2] == 0:
            ax.scatter([xs[0]], [ys[0]], marker="s", s=45, color="0.4", zorder=3, label="pruned (step 0)")
            ax.axhline(ys[0], color="0.4", linestyle=":", linewidth=1)
        chosen = next(((t, b) for t, b, s in pts if s == rec.get("expert_step")), None)
        if chosen:
            ax.scatter([chosen[0]], [chosen[1]], marker="*", s=140, color="C2", zorder=4,
                       label=f"expert taken (step {rec.get('expert_step')})")
        if finite(rec.get("dense_valid_bpb")):
            ax.axhline(rec["dense_valid_bpb"], color="C3", linestyle="--", linewidth=1, label="dense")
        ax.set_title(f"{domain}" + (f" ({rec['mode']})" if rec.get("mode") else ""), fontsize=10)
        ax.set_xlabel("tokens trained", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_ylabel("validation bits/byte", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_front(d: dict, baselines=()) -> bytes:
    """A search front (size against bits per byte; search.SearchResult.to_json) with every evaluated generation's
    front faded behind it and optional baseline points ({"label", "params" or "latency_ms", "bits_per_byte"})."""
    from matplotlib.figure import Figure

    key = "latency_ms" if d["objective"] == "latency" else "params"
    scale = 1.0 if key == "latency_ms" else 1e6
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for h in d["history"][:-1]:
        pts = np.array(h["front"])
        ax.plot(pts[:, 0] / scale, pts[:, 1], ".", color="0.8")
    pts = np.array([[p[key], p["bits_per_byte"]] for p in d["front"]], dtype=np.float64)
    ax.step(pts[:, 0] / scale, pts[:, 1], "o-", where="post", label="search front")
    for b in baselines:
        ax.plot(b[key] / scale, b["bits_per_byte"], "x", ms=9, label=b["label"])
    ax.set_xlabel("forward latency (ms)" if key == "latency_ms" else "parameters (M)")
    ax.set_ylabel("bits per byte (search slice)")
    ax.set_title(f"{d['domain']}: Pareto front")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)

