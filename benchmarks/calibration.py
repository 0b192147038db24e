"""Calibration throughput on SmolLM2-135M, as ratios measured in one run.

* calib_vs_plain:   calibration tokens/s (hooks + fp64 sums) / plain `model(ids)` tokens/s, same batches, same threads.
* calib_vs_decoder: the same against a decoder-only forward (calibration skips lm_head, which no statistic needs,
                    so this isolates the cost of the hooks themselves).
* gram_vs_decoder:  calibration with the Gram statistics (prune.reconstruct / obs: x x^T of every output
                    projection's input) against the decoder-only forward.
* depth_vs_decoder: calibration with Gram and depth-replacement moments for one cut length.
* seq_vs_oneshot:   planning tokens/s of sequential pruning (prune.sequential: every layer's Gram sums on the
                    partly pruned model, its channels chosen and refit before the next layer runs) / one-shot
                    planning (one Gram pass, then the plan and the refit from it), obs at 20%, same blocks.
* stream_vs_oneshot: the same with the stream refit target (prune.refit_target stream: the dense stream runs beside
                    the pruned one and every down_proj and o_proj is also refit toward it).
* streamattn_vs_streammlp: planning tokens/s of the stream target with its attention correction (prune.stream_attn,
                    the default) / without it (MLP outputs corrected only).
* workers2_vs_1:    Ray calibration tokens/s with 2 workers / 1 worker (1 thread each), same shards, actor
                    start-up and model load subtracted (needs 2 idle cores to mean anything).

Prints a human-readable table, then one line of JSON.
Usage: .venv/bin/python benchmarks/calibration.py [--blocks 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import minigpt.raylib as raylib
from minigpt import plan as P, refit, sequential, stats as S
from minigpt.calibrate import Shard, calibrate
from minigpt.config import CalibrateConfig, ModelConfig, PruneConfig
from minigpt.models import load_model, resolve


def _best_rates(fns: dict, tokens: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` tokens/s per function, timed round-robin so background load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: tokens / t for name, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ray-blocks", type=int, default=48)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    mcfg = ModelConfig(source="smollm2-135m")
    model = load_model(resolve(mcfg))
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, model.config.vocab_size, (args.blocks, args.block_size), generator=g)
    tokens = blocks.numel()

    @torch.inference_mode()
    def plain():
        for i in range(0, len(blocks), args.batch):
            model(input_ids=blocks[i:i + args.batch], use_cache=False)

    @torch.inference_mode()
    def decoder():
        for i in range(0, len(blocks), args.batch):
            model.model(input_ids=blocks[i:i + args.batch], use_cache=False)

    def calib():
        S.accumulate(model, blocks, args.batch)

    def gram():
        S.accumulate(model, blocks, args.batch, spec=S.StatSpec(gram=True))

    def depth():
        S.accumulate(model, blocks, args.batch, spec=S.StatSpec(gram=True, depth_spans=(6,)))

    rates1 = _best_rates({"plain": plain, "decoder": decoder, "calib": calib, "gram": gram, "depth": depth}, tokens,
                         args.repeats)
    plain_r, dec_r, calib_r = rates1["plain"], rates1["decoder"], rates1["calib"]

    # Planning end to end (statistics, choice, refit; no slimming): one-shot against layer-by-layer. Timed once
    # each: a sequential run is minutes long, so one run is long enough to average out the noise.
    def oneshot():
        cfg = PruneConfig(method="obs", target=0.2, sequential=False)
        prof = S.accumulate(model, blocks, args.batch, spec=P.stat_spec(cfg, model))
        refit.compensation(model, P.build_plan(prof, model, cfg, domain="bench"), prof)

    def seq(target: str, attn: bool = True):
        cfg = PruneConfig(method="obs", target=0.2, sequential=True, refit_target=target, stream_attn=attn)
        sequential.prune_sequential(model, [sequential.LayerRunner(model, blocks, args.batch)], cfg, domain="bench")

    plan_s = {}
    for name, fn in {"oneshot": oneshot, "seq": lambda: seq("layer"), "stream": lambda: seq("stream"),
                     "streammlp": lambda: seq("stream", attn=False)}.items():
        t0 = time.perf_counter()
        fn()
        plan_s[name] = time.perf_counter() - t0

    # End to end on Ray with 1 then 2 workers (1 thread each) over more blocks. Each calibrate() call starts its
    # actors and loads the model, so a 1-shard run's time is subtracted: what is left is steady-state throughput.
    raylib.ensure_ray(num_cpus=2)
    ray_blocks = torch.randint(0, model.config.vocab_size, (args.ray_blocks, args.block_size), generator=g)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for i in range(0, args.ray_blocks, 2):
            p = Path(tmp) / f"shard-{i:05d}.parquet"
            pq.write_table(pa.table({"input_ids": list(ray_blocks[i:i + 2].numpy().astype(np.int32))}), p)
            shards.append(Shard(f"bench/{p.stem}", "bench", str(p)))
        for n in (1, 2):
            cfg = CalibrateConfig(workers=n, cpus_per_worker=1.0 if n == 1 else 0.9, batch_size=args.batch)
            t0 = time.perf_counter()
            calibrate(shards[:n], mcfg, cfg, Path(tmp) / f"startup{n}")
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            calibrate(shards, mcfg, cfg, Path(tmp) / f"ledger{n}")
            full = time.perf_counter() - t0
            rates[n] = (ray_blocks.numel() - n * 2 * args.block_size) / max(full - startup, 1e-9)

    print(f"plain forward     {plain_r:8.0f} tok/s")
    print(f"decoder forward   {dec_r:8.0f} tok/s")
    print(f"calibration       {calib_r:8.0f} tok/s")
    print(f"  + Gram          {rates1['gram']:8.0f} tok/s")
    print(f"  + Gram + depth  {rates1['depth']:8.0f} tok/s")
    for name in plan_s:
        print(f"planning, {name:<10}{tokens / plan_s[name]:8.0f} tok/s ({plan_s[name]:.0f} s)")
    print(f"ray, 1 worker     {rates[1]:8.0f} tok/s (steady state)")
    print(f"ray, 2 workers    {rates[2]:8.0f} tok/s (steady state)")
    print(json.dumps({"calib_vs_plain": round(calib_r / plain_r, 3), "calib_vs_decoder": round(calib_r / dec_r, 3),
                      "gram_vs_decoder": round(rates1["gram"] / dec_r, 3),
                      "depth_vs_decoder": round(rates1["depth"] / dec_r, 3),
                      "seq_vs_oneshot": round(plan_s["oneshot"] / plan_s["seq"], 3),
                      "stream_vs_oneshot": round(plan_s["oneshot"] / plan_s["stream"], 3),
                      "streamattn_vs_streammlp": round(plan_s["streammlp"] / plan_s["stream"], 3),
                      "workers2_vs_1": round(rates[2] / rates[1], 3), "calib_tokens_per_s": round(calib_r),
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
