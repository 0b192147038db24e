"""Pruning methods compared on SmolLM2-135M with the demo domains, no recovery, one run.

For each method the demo domains (licenses / hpo / python-stdlib; calib 8192, held-out 4096 tokens, block 256) are
profiled once, a plan removing `--target` of the non-embedding parameters is built per domain, the model is slimmed
physically, and the expert's held-out perplexity and bits per byte on its own domain are printed next to the dense
model's. Then the two comparisons that test the contextual claim:
  * each method's perplexity against random's and magnitude's (ratio < 1 = better than the baseline);
  * a mask calibrated on domain D against masks calibrated on each other domain, all evaluated on D
    (ratio > 1 = calibrating on the right domain helps).

A method may carry options: `wanda-sp+protect` keeps layers `--protect` whole and cuts the rest harder (non-uniform
widths: NOT a stock checkpoint, so it is evaluated as the masked dense model), `contextual+kv2` also removes KV
groups down to 2 per layer.

Prints a table, then one line of JSON. Usage:
  .venv/bin/python benchmarks/methods.py [--target 0.2] [--work runs/bench-methods] [--methods contextual,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minigpt import corpora, plan as P, slim as SL, stats as S
from minigpt.config import DataConfig, DomainConfig, ModelConfig, PruneConfig, SourceConfig
from minigpt.models import count_parameters, load_model, load_tokenizer, resolve

DOMAINS = {"legal": "licenses", "medical": "hpo", "code": "python-stdlib"}
METHODS = ("contextual", "cus-prun", "taylor", "wanda-sp", "magnitude", "random", "depth")


def _metrics(model, tokenizer, texts, args) -> dict:
    try:
        from minigpt.evaluate import lm_metrics
    except ImportError:  # pragma: no cover - evaluate.py is finished by another engineer
        raise SystemExit("minigpt.evaluate.lm_metrics is not importable")
    with torch.inference_mode():
        return lm_metrics(model, tokenizer, texts, args.block_size, args.batch, max_blocks=args.max_blocks)


def _profile(model, data: corpora.DomainData, path: Path, batch: int, taylor_blocks: int) -> tuple[dict, dict]:
    if path.is_file():
        saved = load_file(str(path))
        return ({k: v for k, v in saved.items() if not k.startswith("taylor")},
                {k: v for k, v in saved.items() if k.startswith("taylor")})
    blocks = corpora.read_blocks(data.shards("calib"))
    t0 = time.time()
    prof = S.accumulate(model, blocks, batch_size=batch)
    t1 = time.time()
    # Gradients cost ~3x a forward; LLM-Pruner itself estimates importance from a handful of samples.
    grad = S.taylor_sums(model, blocks[:taylor_blocks], batch_size=batch)
    print(f"[bench] {data.domain}: profile {t1 - t0:.0f}s, taylor sums ({taylor_blocks} blocks) "
          f"{time.time() - t1:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in {**prof, **grad}.items()}, str(path))
    return prof, grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--work", default="runs/bench-methods")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--taylor-blocks", type=int, default=8)
    ap.add_argument("--protect", default="0,-2,-1", help="layers kept whole by '<method>+protect' (non-stock)")
    ap.add_argument("--cross", default="contextual", help="methods for the calibrated-on-D vs other-domain test")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    work = Path(args.work)
    folder = resolve(ModelConfig(source="smollm2-135m"))
    dense = load_model(folder)
    tok = load_tokenizer(folder)
    data_cfg = DataConfig(block_size=args.block_size, calib_tokens=8192, heldout_tokens=4096, train_tokens=256)

    datas, texts, profiles, grads = {}, {}, {}, {}
    for name, kind in DOMAINS.items():
        out = work / "data" / name
        try:
            datas[name] = corpora.DomainData.load(out)
        except FileNotFoundError:
            datas[name] = corpora.prepare_domain(DomainConfig(name, (SourceConfig(kind=kind),)), data_cfg, tok, out)
        texts[name] = [t for _, t in datas[name].documents("heldout")]
        profiles[name], grads[name] = _profile(dense, datas[name], work / "profiles" / f"{name}.safetensors",
                                               args.batch, args.taylor_blocks)
    print(f"[bench] data + profiles ready in {time.time() - t0:.0f}s", flush=True)

    results: dict = {"dense": {d: _metrics(dense, tok, texts[d], args) for d in DOMAINS}}
    removed: dict[str, float] = {}
    methods = [m for m in args.methods.split(",") if m]
    protect = tuple(int(i) for i in args.protect.split(",") if i)
    for spec in methods:
        # "method+protect": non-uniform widths (protected layers keep everything); not a stock checkpoint, so it
        # is evaluated as the masked dense model. "method+kvN": also keep N KV groups per layer.
        method, *opts = spec.split("+")
        kv = next((int(o[2:]) for o in opts if o.startswith("kv")), 0)
        cfg = PruneConfig(method=method, target=args.target, kv_groups=kv)
        results[spec] = {}
        for d in DOMAINS:
            plan = P.build_plan(profiles[d], dense, cfg, domain=d, other_profiles=profiles, grad_stats=grads[d],
                                protect_layers=protect if "protect" in opts else ())
            if plan.uniform:
                small = SL.slim(dense, plan)
                assert count_parameters(small) == (plan.params["total"], plan.params["non_embedding"])
            else:
                small = SL.mask(copy.deepcopy(dense), plan)
            removed[spec] = P.removed_fraction(plan)
            results[spec][d] = _metrics(small, tok, texts[d], args)
            del small
        print(f"[bench] {spec} done ({time.time() - t0:.0f}s)", flush=True)

    cross: dict = {}
    for method in [m for m in args.cross.split(",") if m]:
        cfg = PruneConfig(method=method, target=args.target)
        cross[method] = {}
        for d in DOMAINS:
            cross[method][d] = {}
            for c in DOMAINS:
                if c == d:
                    cross[method][d][c] = results.get(method, {}).get(d) or None
                if cross[method][d].get(c):
                    continue
                plan = P.build_plan(profiles[c], dense, cfg, domain=c, other_profiles=profiles, grad_stats=grads[c])
                cross[method][d][c] = _metrics(SL.slim(dense, plan), tok, texts[d], args)
        print(f"[bench] cross-domain {method} done ({time.time() - t0:.0f}s)", flush=True)

    # ---- report
    names = list(DOMAINS)
    print(f"\nSmolLM2-135M, {args.target:.0%} of non-embedding parameters removed, no recovery; held-out "
          f"{args.max_blocks} blocks x {args.block_size} per domain")
    print(f"{'method':<20} {'removed':>8} " + " ".join(f"{d + ' ppl':>12} {'bpb':>6} {'x dense':>7}" for d in names))
    for m, per in results.items():
        frac = removed.get(m, 0.0)
        row = " ".join(f"{per[d]['ppl']:>12.2f} {per[d]['bits_per_byte']:>6.3f} "
                       f"{per[d]['ppl'] / results['dense'][d]['ppl']:>7.2f}" for d in names)
        print(f"{m:<20} {frac:>8.1%} {row}")
    print("\nperplexity ratio against the baselines (< 1: better than the baseline)")
    for m in methods:
        parts = []
        for base in ("random", "magnitude"):
            if base in results and m.split("+")[0] != base:
                parts.append(f"vs {base}: " + ", ".join(f"{d} {results[m][d]['ppl'] / results[base][d]['ppl']:.3g}"
                                                       for d in names))
        print(f"  {m:<12} " + " | ".join(parts))
    print("\ncalibrated on the right domain vs another (ppl on D with a mask calibrated on C / calibrated on D)")
    for m, table in cross.items():
        for d in names:
            own = table[d][d]["ppl"]
            print(f"  {m:<12} eval {d:<8} " + ", ".join(f"calib {c}: {table[d][c]['ppl'] / own:.3f}"
                                                     for c in names if c != d))
    best = min(methods, key=lambda m: max(results[m][d]["ppl"] / results["dense"][d]["ppl"] for d in names))
    worst = max(results[best][d]["ppl"] / results["dense"][d]["ppl"] for d in names)
    print(f"\nbest method: {best}, worst-domain perplexity {worst:.2f}x dense (aim: <= 1.15x); {time.time() - t0:.0f}s")
    print(json.dumps({"target": args.target, "removed": removed, "results": results, "cross": cross, "best": best}))


if __name__ == "__main__":
    main()
