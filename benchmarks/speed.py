"""Forward speed of slimmed experts against the dense SmolLM2-135M, next to their parameter ratio, in one run.

Structure, not scores, decides speed, so the plans here use random scores (no calibration needed): MLP channels
only, MLP + one KV group removed, depth (dropped layers), and MLP + vocabulary pruned to the tokens of
/usr/share/common-licenses. Every model runs the same batch (`--batch` x `--seq` token ids valid in every
vocabulary); after one warm-up each, the models are timed round-robin `--repeats` times and the best is kept.

Prints a table, then one line of JSON. Usage: .venv/bin/python benchmarks/speed.py [--target 0.2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from minigpt import plan as P, slim as SL, stats as S
from minigpt.config import ModelConfig, PruneConfig
from minigpt.models import count_parameters, load_model, load_tokenizer, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve(ModelConfig(source="smollm2-135m"))
    dense = load_model(folder)
    tok = load_tokenizer(folder)
    prof = S.stats_for_model(dense)
    text = "\n".join(p.read_text(errors="ignore") for p in sorted(Path("/usr/share/common-licenses").glob("*"))
                     if p.is_file())
    counts = torch.bincount(torch.tensor(tok.encode(text)), minlength=dense.config.vocab_size).double()
    prof["token_counts"] = counts
    # Ids present in every vocabulary (the licenses' own tokens), so all models see the same batch.
    g = torch.Generator().manual_seed(0)
    pool = torch.nonzero(counts).reshape(-1)
    old_ids = pool[torch.randint(0, len(pool), (args.batch, args.seq), generator=g)]

    variants = {
        # Shapes only (speed does not depend on which channels stay or their values): no refit.
        "mlp": PruneConfig(method="random", target=args.target, reconstruct=False),
        "mlp+kv": PruneConfig(method="random", target=args.target, kv_groups=2, reconstruct=False),
        "depth": PruneConfig(method="depth", target=args.target, reconstruct=False),
        "mlp+vocab": PruneConfig(method="random", target=args.target, vocab=True, reconstruct=False),
    }
    dense_total, _ = count_parameters(dense)
    models = {"dense": (dense, old_ids)}
    for name, cfg in variants.items():
        plan = P.build_plan(prof, dense, cfg, domain="licenses", tokenizer=tok)
        ids = old_ids
        if plan.vocab_keep is not None:
            remap = torch.full((dense.config.vocab_size,), -1, dtype=torch.long)
            remap[torch.tensor(plan.vocab_keep)] = torch.arange(len(plan.vocab_keep))
            ids = remap[old_ids]
        models[name] = (SL.slim(dense, plan), ids)
    # Round-robin: every repeat times every model once, so a burst of load on a shared machine hits all alike;
    # the best time per model is kept.
    best = {name: float("inf") for name in models}
    with torch.inference_mode():
        for model, ids in models.values():
            model(input_ids=ids)  # warm-up
        for _ in range(args.repeats):
            for name, (model, ids) in models.items():
                t0 = time.perf_counter()
                model(input_ids=ids)
                best[name] = min(best[name], time.perf_counter() - t0)
    rows = {}
    for name, (model, _) in models.items():
        total, _ = count_parameters(model)
        rows[name] = {"seconds": best[name], "params": total, "param_ratio": total / dense_total,
                      "speedup": best["dense"] / best[name]}
    print(f"forward of {args.batch}x{args.seq} tokens, best of {args.repeats} (round-robin), "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"{args.target:.0%} of non-embedding parameters removed")
    print(f"{'model':<10} {'params':>10} {'params/dense':>13} {'seconds':>9} {'speedup':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['params'] / 1e6:>9.1f}M {r['param_ratio']:>13.3f} {r['seconds']:>9.3f} "
              f"{r['speedup']:>7.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
