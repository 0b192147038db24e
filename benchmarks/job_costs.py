"""What a finished job cost and gave, from its run folder and its log, as one JSON line.

    python benchmarks/job_costs.py runs/scale-qwen15 [--log job.log]

The scale measurements of issue 28 run whole jobs (`make scale-bench`: jobs/scale-qwen15.yaml on a 2-core CPU with
every worker's memory limited). This reads what the run folder records — each stage's seconds and the driver's
peak RSS (`_stages/*.json`), each recovery worker's peak and share of the parameters (the expert's
`_manifest.json`), the quality figures (`summary.json`) — and, from the job's log, the peaks the Ray workers
reported (`[memory] ...: peak RSS ... MiB` lines) beside the predictions validation printed. Every memory figure
is also given as a ratio to the dense model's fp32 size, which is the point of the run: each process well below it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PEAK = re.compile(r"^\[memory\] (?P<what>.+?): peak RSS (?P<mib>[\d, ]+) MiB")
PREDICTED = re.compile(r"^\[memory\] each (?P<what>.+?): (?P<gib>[\d.]+) GiB predicted")


def model_fp32_mib(run: Path) -> float | None:
    """The dense model's fp32 size from the parameter count evaluation recorded (eval.json)."""
    evaluated = json.loads((run / "eval.json").read_text())["models"] if (run / "eval.json").is_file() else {}
    dense = evaluated.get("dense")
    return dense["size"]["params"] * 4 / 2**20 if dense else None


def stage_costs(run: Path) -> dict[str, dict]:
    out = {}
    for book in sorted((run / "_stages").glob("*.json")):
        rec = json.loads(book.read_text())
        out[book.stem] = {"seconds": rec.get("seconds"), "driver_peak_rss_mib": rec.get("driver_peak_rss_mib"),
                          "status": rec.get("status")}
    return out


def log_memory(log: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Measured peaks per kind of process and the predictions validation printed, from the job's log."""
    peaks: dict[str, list[float]] = {}
    predicted: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        line = re.sub(r"^\(\w+ pid=\d+\) ", "", line)  # Ray's prefix on a worker's line
        if m := PEAK.match(line):
            peaks.setdefault(m["what"], []).extend(float(x) for x in m["mib"].replace(",", " ").split())
        elif m := PREDICTED.match(line):
            predicted[m["what"]] = float(m["gib"]) * 1024
    return peaks, predicted


def _key(what: str) -> str:
    return re.sub(r"\W+", "_", what).strip("_").lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--log", type=Path, help="the job's stdout and stderr")
    args = ap.parse_args()
    run = args.run
    size = model_fp32_mib(run)
    stages = stage_costs(run)
    figures: dict[str, float | None] = {"model_fp32_mib": size}
    for name, rec in stages.items():
        figures[f"seconds_{name}"] = rec["seconds"]
    drivers = [r["driver_peak_rss_mib"] for r in stages.values() if r["driver_peak_rss_mib"]]
    if drivers:
        figures["driver_peak_mib"] = max(drivers)
    for manifest in sorted(run.glob("experts/*/recovered/_manifest.json")):
        m = json.loads(manifest.read_text())
        domain = manifest.parent.parent.name
        figures[f"recover_{domain}_peak_mib"] = max(m.get("peak_rss_mib") or [0]) or None
        held, total = m.get("param_elements_held"), m.get("param_elements")
        if held and total:
            figures[f"recover_{domain}_params_held_vs_all"] = max(held) / total
    if args.log:
        peaks, predicted = log_memory(args.log)
        for what, values in peaks.items():
            figures[f"peak_{_key(what)}_mib"] = max(values)
        for what, mib in predicted.items():
            figures[f"predicted_{_key(what)}_mib"] = mib
    if size:
        for k in [k for k in figures if k.endswith("_mib") and k != "model_fp32_mib" and figures[k]]:
            figures[k.removesuffix("_mib") + "_vs_model_fp32"] = figures[k] / size
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    for domain, d in (summary.get("domains") or {}).items():
        for kind in ("pruned", "recovered"):
            figures[f"{kind}_vs_dense_heldout_{domain}"] = d.get(f"{kind}_ppl_ratio")
            worst = d.get(f"{kind}_oos_worst")
            if worst:
                figures[f"{kind}_vs_dense_worst_oos_{domain}"] = worst["ppl_ratio"]
    for name, rec in stages.items():
        print(f"{name:24s} {rec['status'] or '':8s} {rec['seconds'] or 0:8.1f} s   driver peak "
              f"{rec['driver_peak_rss_mib'] or 0:,} MiB")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
