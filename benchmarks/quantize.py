"""int8 weight quantization (torchao Int8WeightOnlyConfig) of SmolLM2-135M and of a pruned expert, one run.

For the dense model and an expert (`--expert DIR`, or by default a contextual plan removing `--target` of the
non-embedding parameters on the legal domain, slimmed without recovery), the float folder is quantized with
minigpt.quantize.quantize_expert, reloaded with plain AutoModelForCausalLM.from_pretrained, and compared with the
float model: weight bytes on disk, forward latency of one [batch, seq] batch, held-out perplexity and bits per byte.

Prints a table, then one line of JSON. Usage:
  PYTHONPATH=. .venv/bin/python benchmarks/quantize.py [--expert DIR] [--work runs/bench-quantize]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minigpt import corpora, plan as P, quantize as Q, slim as SL, stats as ST
from minigpt.config import DataConfig, DomainConfig, ModelConfig, PruneConfig, SourceConfig  # noqa: E402
from minigpt.optconfig import QuantizeConfig
from minigpt.models import load_model, load_tokenizer, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expert", default="", help="a finished expert folder; default: slim one (no recovery)")
    ap.add_argument("--work", default="runs/bench-quantize")
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--max-blocks", type=int, default=8)
    ap.add_argument("--speed", default="1,128,5", help="batch,seq_len,repeats of the latency benchmark")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    work = Path(args.work)
    folder = resolve(ModelConfig(source="smollm2-135m"))
    tok = load_tokenizer(folder)
    data_dir = work / "data" / "legal"
    try:
        data = corpora.DomainData.load(data_dir)
    except FileNotFoundError:
        data = corpora.prepare_domain(DomainConfig("legal", (SourceConfig(kind="licenses"),)),
                                      DataConfig(block_size=256, calib_tokens=8192, heldout_tokens=4096), tok, data_dir)
    heldout = [t for _, t in data.documents("heldout")]

    expert = Path(args.expert) if args.expert else work / "expert-float"
    if not args.expert and not (expert / "config.json").is_file():
        dense = load_model(folder)
        prof = ST.accumulate(dense, corpora.read_blocks(data.shards("calib")), batch_size=4)
        plan = P.build_plan(prof, dense, PruneConfig(method="contextual", target=args.target, reconstruct=False), domain="legal")
        SL.save_expert(SL.slim(dense, plan), tok, expert)
        del dense
    speed = tuple(int(x) for x in args.speed.split(","))
    results = {}
    for label, src in (("dense", Path(folder)), ("expert", expert)):
        t1 = time.time()
        q_dir = Q.quantize_expert(src, work / f"{label}-int8", QuantizeConfig(enabled=True))
        quant_s = time.time() - t1
        results[label] = Q.compare(src, q_dir, heldout, block_size=256, batch_size=4, max_blocks=args.max_blocks,
                                   speed=speed)
        results[label]["quantize_s"] = quant_s
        print(f"[bench] {label} done ({time.time() - t0:.0f}s)", flush=True)

    print(f"\nint8 weight-only (torchao {__import__('torchao').__version__}), CPU, {torch.get_num_threads()} threads; "
          f"latency of one {speed[0]}x{speed[1]} forward (median of {speed[2]}); held-out legal, "
          f"{args.max_blocks} blocks x 256")
    print(f"{'model':<16} {'MB on disk':>10} {'latency ms':>11} {'ppl':>9} {'bpb':>7}")
    for label, r in results.items():
        for kind in ("float", "int8"):
            m = r[kind]
            print(f"{label + ' ' + kind:<16} {m['weight_bytes'] / 1e6:>10.1f} {m['latency_ms']:>11.1f} "
                  f"{m['ppl']:>9.3f} {m['bits_per_byte']:>7.4f}")
        ra = r["ratios"]
        print(f"{label + ' int8/float':<16} {ra['size']:>10.3f} {ra['latency']:>11.3f} {ra['ppl']:>9.4f}")
    print(f"\n{time.time() - t0:.0f}s total")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
