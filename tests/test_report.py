"""Tests for minigpt.report: report.md + assets and a self-contained report.html from an eval.json dict."""

import base64
import copy
import re
from html.parser import HTMLParser

import pytest

from minigpt.report import write_report

DOMAINS = ["legal", "medical", "code"]


def model(ppls: list[float], non_emb: int, latency: float, speedup: float | None = 1.0) -> dict:
    return {
        "dir": "/x",
        "size": {"params": non_emb + 28_311_552, "non_embedding_params": non_emb, "weight_bytes": 4 * non_emb,
                 "vocab_size": 49152, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "non_embedding_ratio_vs_dense": non_emb / 106_203_456},
        "speed": {"batch_size": 1, "seq_len": 128, "repeats": 3, "threads": 1, "device": "cpu",
                  "latency_ms": latency, "latency_ms_min": latency, "tokens_per_s": 128e3 / latency,
                  "speedup_vs_dense": speedup},
        "domains": {d: {"loss": 2.0, "ppl": p, "bits_per_byte": 0.3 * p ** 0.25, "tokens": 4080, "bytes": 19000,
                        "blocks": 16, "ppl_ci": [0.9 * p, 1.1 * p], "documents_measured": 40}
                    for d, p in zip(DOMAINS, ppls)},
        "mcq": None,
        "general": None,
        "samples": {d: {"prompt": f"The {d} text begins", "text": " a <b>bold</b> | piped ``` sample"}
                    for d in DOMAINS},
        "seconds": 1.0,
    }


def eval_data() -> dict:
    models = {"dense": model([12.0, 15.0, 4.0], 106_203_456, 300.0)}
    for k, d in enumerate(DOMAINS):
        base = [30.0, 40.0, 9.0]
        base[k] = 18.0
        models[f"{d}/pruned"] = model(base, 80_000_000, 240.0, 1.25)
        models[f"{d}/recovered"] = model([b * 0.8 for b in base], 80_000_000, 240.0, 1.25)
    models["legal/recovered"]["domains"]["code"]["ppl"] = None  # a non-finite value written as null
    for label, res in models.items():  # paired ratios to dense, as minigpt.metrics.add_intervals writes them
        for d, cell in res["domains"].items():
            r = cell["ppl"] / models["dense"]["domains"][d]["ppl"] if cell["ppl"] else None
            cell.update(ppl_ratio=r, ppl_ratio_ci=[r * 0.95, r * 1.05] if r else None)
        if label != "dense":
            res["samples"] = {label.split("/")[0]: res["samples"][label.split("/")[0]]}
    return {"schema": "minigpt.eval/1", "domains": DOMAINS, "dense": "dense", "block_size": 256,
            "config": {"confidence": 0.9}, "models": models}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.external: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "table":
            self.tables += 1
        if tag in ("link", "script") or (a.get("href") or "").startswith("http"):
            self.external.append(tag)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def is_png_uri(src: str) -> bool:
    prefix = "data:image/png;base64,"
    return src.startswith(prefix) and base64.b64decode(src[len(prefix):]).startswith(b"\x89PNG\r\n\x1a\n")


def test_full_report(tmp_path):
    plans = {d: {"domain": d, "method": "contextual", "target": 0.25, "intermediate_size": 1536,
                 "layers": [{"index": i, "mlp_keep": list(range(1000 + 10 * i))} for i in range(30)]}
             for d in DOMAINS}
    data = eval_data()
    data["models"]["legal/recovered"]["mcq"] = {"n": 10, "accuracy": 0.3, "accuracy_norm": 0.4, "chance": 0.25,
                                                "accuracy_ci": [0.1, 0.6], "by_subject": {}, "harness": "lm-eval 0.4"}
    md, page = write_report(tmp_path, data, plans, extra={"name": "demo", "wall time": "12 min"})

    html_text = page.read_text()
    doc = parse(html_text)
    assert len(doc.imgs) == 3 and all(is_png_uri(s) for s in doc.imgs)
    assert not doc.external and doc.tables >= len(DOMAINS) + 4
    assert "<b>bold</b>" not in html_text  # model text is escaped
    text = md.read_text()
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[0] == "Headline"
    # The headline: one row per shipped expert (recovered, not pruned), with size, speed, own-domain ratio and its
    # interval, and its ratios on the other domains (code/recovered: 0.8 x 30/12 and 0.8 x 40/15; legal/recovered has
    # no finite perplexity on code, so only medical's 0.8 x 40/15).
    head = text[text.index("## Headline"):text.index("## Quality per domain")]
    assert "| code/recovered | 80.00M | 0.753× | 1.250× | 3.600× [3.420×–3.780×] | 2.00–2.13× | 40 |" in head
    assert "| legal/recovered | 80.00M | 0.753× | 1.250× | 1.200× [1.140×–1.260×] | 2.13× | 40 |" in head
    assert "legal/pruned" not in head and "medical/recovered" in head and "code/recovered" in head
    assert "legal/recovered: 25% fewer non-embedding parameters, 1.25× the dense speed; held-out perplexity " \
           "1.20× dense [1.14–1.26] on legal's own sources, 2.13× dense on the other domains." in head
    # No domain listed text from other sources: the headline says so in words.
    assert "Only text from each domain's own sources was measured" in head
    for d in DOMAINS:
        assert f"Domain: {d}" in text and f"{d}/recovered" in text
        assert f"**{d}: prompt**" in text and f"The {d} text begins" in text
    assert "| legal/pruned | 18.00 [16.20–19.80] | 1.500× [1.425×–1.575×] |" in text  # ppl, ratio to dense (18 / 12)
    assert "[90% CI]" in text and "30.0% [10.0%–60.0%]" in text  # the configured confidence; MCQ interval
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(refs) == 3
    for ref in refs:
        assert (tmp_path / ref).read_bytes().startswith(b"\x89PNG")
    assert "Multiple choice" in text and "demo" in text


def test_console_table_prints_intervals():
    from minigpt.report import console_table

    out = console_table(eval_data()).splitlines()
    assert "90% bootstrap interval" in out[0]
    legal = next(line for line in out if line.startswith("legal"))
    assert "12.00 [10.80–13.20]" in legal and "1.50× [1.42×–1.58×]" in legal and "1.20× [1.14×–1.26×]" in legal
    assert legal.rstrip().endswith("24.7%")


def test_no_plot_of_a_constant(tmp_path):
    data = eval_data()
    uniform = {d: {"domain": d, "intermediate_size": 1536,
                   "layers": [{"index": i, "mlp_keep": list(range(1024))} for i in range(30)]} for d in DOMAINS}
    md, page = write_report(tmp_path, data, uniform)
    assert "mlp_widths.png" not in md.read_text()  # every layer keeps 1024 channels: the table says it
    one = {"schema": "minigpt.eval/1", "domains": ["legal"], "dense": "dense",
           "models": {"dense": data["models"]["dense"]}}
    md, page = write_report(tmp_path, one)
    assert parse(page.read_text()).imgs == []  # one model, one domain: a single point and a single cell


def test_report_tolerates_missing_pieces_and_rewrites(tmp_path):
    data = eval_data()
    data["dense"] = None
    del data["models"]["dense"]
    bad_plans = {"legal": {"layers": [{"mlp_keep": [1, 2]}, {"index": 1}, {"mlp_keep": [1, 2, 3]}]}, "code": {}}
    md, page = write_report(tmp_path, data, bad_plans)
    doc = parse(page.read_text())
    assert len(doc.imgs) == 3 and all(is_png_uri(s) for s in doc.imgs)

    # A second report replaces the first atomically, including its assets.
    md, page = write_report(tmp_path, copy.deepcopy(data), None)
    assert sorted(p.name for p in (tmp_path / "report_assets").iterdir()) == ["cross_domain.png", "size_vs_ppl.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(parse(page.read_text()).imgs) == 2


@pytest.mark.parametrize("empty", [{"schema": "minigpt.eval/1", "models": {}, "domains": []}])
def test_empty_eval_still_renders(tmp_path, empty):
    md, page = write_report(tmp_path, empty)
    assert parse(page.read_text()).imgs == [] and md.read_text().startswith("# minigpt report")


def recovery(start: float, steps: int, dense: float | None, expert_step: int, stopped_early: bool) -> dict:
    # Falls by 0.01 a step up to the expert's (the best-validated) step, then rises again.
    curve = [{"step": s, "tokens": s * 1024, "valid_bpb": start - 0.01 * min(s, expert_step)
              + 0.005 * max(0, s - expert_step), "valid_loss": 2.0} for s in range(0, steps + 1, 8)]
    return {"curve": curve, "dense_valid_bpb": dense, "expert_step": expert_step, "stopped_early": stopped_early,
            "tokens": steps * 1024, "mode": "full", "steps": steps, "total_steps": 128}


def summary_with_curves() -> dict:
    return {"job": "demo", "domains": {
        "legal": {"dense_bpb": 0.95, "recovery": recovery(1.05, 64, 0.95, 40, True)},
        "medical": {"dense_bpb": 0.9, "recovery": recovery(1.2, 16, None, 16, False)},
        "code": {"dense_bpb": 0.5, "recover_status": "disabled"},
    }}


def test_plot_recovery_curves():
    from minigpt.plots import plot_recovery_curves

    png = plot_recovery_curves(summary_with_curves())
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")
    assert plot_recovery_curves({"domains": {}}) is None
    flat = summary_with_curves()
    flat["domains"]["legal"]["recovery"]["curve"] = []  # eval_every 0
    flat["domains"]["medical"]["recovery"]["curve"] = flat["domains"]["medical"]["recovery"]["curve"][:1]
    assert plot_recovery_curves(flat) is None  # a single point is no curve


def test_report_shows_recovery(tmp_path):
    md, page = write_report(tmp_path, eval_data(), summary=summary_with_curves())
    text = md.read_text()
    rec = text[text.index("## Recovery"):]
    rec = rec[:rec.index("\n## ")]
    assert "![Recovery: validation bits/byte vs tokens trained](report_assets/recovery_curves.png)" in rec
    assert (tmp_path / "report_assets" / "recovery_curves.png").read_bytes().startswith(b"\x89PNG")
    # legal: 1.05 at step 0, 1.05 - 0.40 at step 40 (the chosen one), 64 steps of 1,024 tokens.
    assert "legal: validation 1.050 → 0.650 bits/byte in 65,536 tokens of full fine-tuning (dense 0.950); " \
           "expert taken at step 40 of 64, stopped early (planned 128 steps)." in rec
    assert "medical: validation 1.200 → 1.040 bits/byte in 16,384 tokens of full fine-tuning; " \
           "expert taken at step 16 of 16." in rec
    assert "code:" not in rec
    assert len(parse(page.read_text()).imgs) == 3  # cross-domain, size vs perplexity, recovery curves

    # The job's own summary.json next to the report is read when none is passed; none -> no recovery section.
    import json

    (tmp_path / "summary.json").write_text(json.dumps(summary_with_curves()))
    assert "## Recovery" in write_report(tmp_path, eval_data())[0].read_text()
    (tmp_path / "summary.json").unlink()
    assert "## Recovery" not in write_report(tmp_path, eval_data())[0].read_text()
