"""Architecture search vs fixed-ratio pruning on SmolLM2-135M, one domain, no recovery, one run.

The domain is prepared (calib 8192 / held-out 4096 tokens, every train document), profiled once on its calibration
split, and an NSGA-II search (minigpt.search, Ray actors) looks for the Pareto front of total parameters against
bits per byte on a slice of the TRAIN split. The fixed-ratio plans of the methods benchmark (one prune.method, the
same MLP width in every layer) are built at the sizes of the front points (the same fraction of non-embedding
parameters removed) and each pair is scored on the same slice and on the HELD-OUT split (never seen by the
search), and the script says whether the search found a plan that beats the fixed-ratio one at equal
size (lower held-out loss), whatever the answer is.

Writes <work>/search/<domain>.json and .png; prints a table, then one line of JSON. Usage:
  PYTHONPATH=. .venv/bin/python benchmarks/search.py [--domain legal] [--population 8] [--generations 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from minigpt import corpora, plan as P, raylib, search as SE, slim as SL, stats as ST
from minigpt.calibrate import load_profile, save_profile
from minigpt.config import ConfigError, DataConfig, DomainConfig, ModelConfig, PruneConfig, SourceConfig  # noqa: E402
from minigpt.optconfig import SearchConfig
from minigpt.io import json_safe
from minigpt.evaluate import lm_metrics
from minigpt.models import load_model, load_tokenizer, resolve

DOMAINS = {"legal": "licenses", "medical": "hpo", "code": "python-stdlib"}


def _metrics(model, tok, texts, block_size, batch, blocks) -> dict:
    return lm_metrics(model, tok, texts, block_size, batch, max_blocks=blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="legal", choices=list(DOMAINS))
    ap.add_argument("--work", default="runs/bench-search")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--eval-blocks", type=int, default=4, help="search-slice blocks of 256 tokens per candidate")
    ap.add_argument("--heldout-blocks", type=int, default=8)
    ap.add_argument("--method", default="contextual", help="channel scoring of both the search and the fixed plans")
    ap.add_argument("--compare-range", default="0.03,0.5", help="removed fractions of front points to compare")
    ap.add_argument("--vocab", default="0", help="vocabulary cuts offered, e.g. 0,1 (0 = none)")
    ap.add_argument("--objective", default="params", choices=["params", "latency"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.work)
    block = 256
    folder = resolve(ModelConfig(source="smollm2-135m"))
    dense = load_model(folder)
    tok = load_tokenizer(folder)

    data_dir = work / "data" / args.domain
    try:
        data = corpora.DomainData.load(data_dir)
    except FileNotFoundError:
        data = corpora.prepare_domain(DomainConfig(args.domain, (SourceConfig(kind=DOMAINS[args.domain]),)),
                                      DataConfig(block_size=block, calib_tokens=8192, heldout_tokens=4096),
                                      tok, data_dir)
    prof_path = work / "profiles" / f"{args.domain}.safetensors"
    if prof_path.is_file():
        prof, _ = load_profile(prof_path)
    else:
        prof = ST.accumulate(dense, corpora.read_blocks(data.shards("calib")), batch_size=4)
        save_profile(prof_path, prof, {"domain": args.domain})
    search_texts = [t for _, t in data.documents("train")]
    heldout = [t for _, t in data.documents("heldout")]
    print(f"[bench] {args.domain}: data + profile ready ({time.time() - t0:.0f}s); search slice = train split "
          f"({len(search_texts)} docs), {args.eval_blocks} blocks; held-out {args.heldout_blocks} blocks", flush=True)

    cfg = SearchConfig(enabled=True, objective=args.objective, method=args.method, population=args.population,
                       generations=args.generations, seed=args.seed, eval_blocks=args.eval_blocks, batch_size=4,
                       workers=args.workers, cpus_per_worker=max(1, (os.cpu_count() or 2) // args.workers),
                       vocab_min_counts=tuple(int(v) for v in args.vocab.split(",")), split="train")
    raylib.ensure_ray(num_cpus=os.cpu_count() or 2)

    def on_gen(gen, pop):
        print(f"[bench] generation {gen}: {len(pop)} individuals ({time.time() - t0:.0f}s)", flush=True)

    result = SE.search_domain(prof, folder, search_texts, cfg, domain=args.domain, block_size=block,
                              base_model=str(folder), profile=str(prof_path), on_generation=on_gen)
    print(f"[bench] search done in {result.seconds:.0f}s ({result.history[-1]['evaluated']} candidates)", flush=True)

    # At every front size in the useful range, the fixed-ratio plan of the methods benchmark that removes the same
    # fraction of non-embedding parameters (multiple_of 1, so the sizes match to within one channel per layer).
    dense_held = _metrics(dense, tok, heldout, block, 4, args.heldout_blocks)
    lo, hi = (float(x) for x in args.compare_range.split(","))
    fixed, comparisons = [], []
    for i, p in enumerate(result.front):
        if not lo <= p["removed"] <= hi:
            continue
        try:
            cfg = PruneConfig(method=args.method, target=p["removed"], multiple_of=1, reconstruct=False)
            plan = P.build_plan(prof, dense, cfg, domain=args.domain)
        except ConfigError as e:
            print(f"[bench] no fixed-ratio plan at {p['removed']:.1%}: {e}")
            continue
        small = SL.slim(dense, plan)
        f = {"label": f"{args.method} {P.removed_fraction(plan):.1%}", "params": plan.params["total"],
             "removed": P.removed_fraction(plan),
             "slice": _metrics(small, tok, search_texts, block, 4, args.eval_blocks),
             "heldout": _metrics(small, tok, heldout, block, 4, args.heldout_blocks)}
        f["bits_per_byte"] = f["slice"]["bits_per_byte"]
        fixed.append(f)
        small, small_tok = SL.slim_expert(dense, tok, p["plan"])
        h = _metrics(small, small_tok, heldout, block, 4, args.heldout_blocks)
        comparisons.append({"fixed": f["label"], "fixed_params": f["params"], "front": i,
                            "front_params": p["params"], "front_shape": p["shape"],
                            "fixed_slice_bpb": f["slice"]["bits_per_byte"], "front_slice_bpb": p["bits_per_byte"],
                            "fixed_heldout_loss": f["heldout"]["loss"], "front_heldout_loss": h["loss"],
                            "fixed_heldout_bpb": f["heldout"]["bits_per_byte"], "front_heldout_bpb": h["bits_per_byte"],
                            # bits per byte is the fair measure when the front plan cut the vocabulary.
                            "beats": h["bits_per_byte"] < f["heldout"]["bits_per_byte"]
                            and p["params"] <= f["params"] * 1.001})
        print(f"[bench] compared front point {i} ({time.time() - t0:.0f}s)", flush=True)

    out_dir = work / "search"
    SE.write_front(out_dir / f"{args.domain}.json", result)
    SE.plot_front(result, out_dir / f"{args.domain}.png", baselines=fixed)

    # ---- report
    print(f"\nSmolLM2-135M, domain {args.domain}, search {cfg.population} x {cfg.generations} generations, "
          f"objective {cfg.objective}, method {cfg.method}; no recovery")
    print(f"dense: {result.dense['params'] / 1e6:.1f}M params, slice bpb {result.dense['bits_per_byte']:.3f}, "
          f"held-out loss {dense_held['loss']:.3f} (ppl {dense_held['ppl']:.2f})")
    print(f"\n{'front point':<46} {'params':>8} {'removed':>8} {'slice bpb':>10}")
    for p in result.front:
        s = p["shape"]
        desc = (f"layers {len(s['kept_layers'])}/{dense.config.num_hidden_layers} mlp {s['mlp_width']} "
                f"kv {s['kv_groups']} vocab>={s['vocab_min_count']}")
        print(f"{desc:<46} {p['params'] / 1e6:>7.1f}M {p['removed']:>8.1%} {p['bits_per_byte']:>10.3f}")
    print(f"\nat equal size: each front point vs the {args.method} fixed-ratio plan removing the same fraction "
          f"(slice = search slice of the train split; held = held-out split, never seen by the search)")
    print(f"{'':<10} {'front':>8} {'slice bpb':>9} {'held loss':>9} {'held bpb':>8} | {'fixed':>8} {'slice bpb':>9} "
          f"{'held loss':>9} {'held bpb':>8}")
    for c in comparisons:
        print(f"{result.front[c['front']]['removed']:>9.1%} {c['front_params'] / 1e6:>7.1f}M "
              f"{c['front_slice_bpb']:>9.3f} {c['front_heldout_loss']:>9.3f} {c['front_heldout_bpb']:>8.3f} | "
              f"{c['fixed_params'] / 1e6:>7.1f}M {c['fixed_slice_bpb']:>9.3f} {c['fixed_heldout_loss']:>9.3f} "
              f"{c['fixed_heldout_bpb']:>8.3f} -> {'search wins' if c['beats'] else 'fixed ratio wins'}")
    wins = sum(c["beats"] for c in comparisons)
    print(f"\nANSWER: the search found a plan that beats the fixed-ratio plan at equal size on held-out loss "
          f"(bits per byte) in {wins} of {len(comparisons)} sizes ({'yes' if wins else 'no'}); "
          f"{time.time() - t0:.0f}s total")
    print(json.dumps(json_safe({"domain": args.domain, "search_seconds": result.seconds,
                                    "evaluated": result.history[-1]["evaluated"],
                                    "front": [{k: p[k] for k in ("shape", "params", "removed", "bits_per_byte", "loss")}
                                              for p in result.front],
                                    "fixed": [{k: f[k] for k in ("label", "params", "removed", "slice", "heldout")}
                                              for f in fixed],
                                    "comparisons": comparisons, "dense_heldout": dense_held})))


if __name__ == "__main__":
    main()
