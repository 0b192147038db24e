"""Rendering of the report's content (sections of tables, plots and text) as markdown and as one HTML page.

report.md points at PNG files in report_assets/ next to it; report.html embeds the same PNGs as base64 data URIs
with inline CSS, so it can be mailed or attached to a CI run as one file.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.io import atomic_dir, atomic_write_text

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
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}td{white-space:nowrap}.wide{overflow-x:auto}th{background:#f2f2f2}
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
            out.append(f'<div class="wide"><table><caption>{e(t.title)}</caption><thead><tr>'
                       + "".join(f"<th>{e(h)}</th>" for h in t.headers) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows]
            out.append("</tbody></table></div>")
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


def write_pages(run_dir: Path, title: str, sections: list[Section]) -> tuple[Path, Path]:
    """report_assets/ (replaced whole), report.md and report.html in `run_dir`, each written atomically."""
    with atomic_dir(run_dir / ASSETS) as tmp:
        for sec in sections:
            for p in sec.plots:
                (tmp / p.name).write_bytes(p.png)
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md, render_markdown(title, sections))
    atomic_write_text(page, render_html(title, sections))
    return md, page
