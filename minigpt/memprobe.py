"""Measure what minigpt.memory predicts: the peak of a streamed calibration pass, or of a sequential runner, in a
process of its own.

A calibration worker's pass (minigpt.streamed.accumulate_streamed: embedding resident, one decoder layer read from
the checkpoint at a time, the base statistics, every calibration token's hidden state held) is run on random token
ids in a fresh interpreter, so its peak RSS is that process's alone and not the caller's (a test runner or a
benchmark that has loaded models already). The child prints one line of JSON: tokens/s, its measured peak
(minigpt.memory.peak_rss_mib) and the peak `predict_memory` gives for the same model, dtype, batch shape and tokens
(BASE_BYTES included). benchmarks/scale.py reports it in the README's cost table; tests/test_real_model.py holds
the prediction to it.

A sequential runner's probe (`--runner N`) runs the protocol minigpt.sequential drives a runner through, for the first
N layers, on its share of domain tokens plus general text at a weight (the stream target: dense stream, attention
then MLP statistics with their drift, new weights applied, advance), with the layers' own weights as the "new" ones.

Usage: python -m minigpt.memprobe FOLDER [--tokens 2048] [--seq 256] [--batch 4] [--threads 2] [--runner N
       --general-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minigpt import stats as S
from minigpt.layerstore import LayerStore
from minigpt.archs import arch_of
from minigpt.memory import BASE_BYTES, model_sizes, peak_rss_mib, predict_memory
from minigpt.runner import LayerRunner
from minigpt.streamed import StreamedDecoder, accumulate_streamed, pin_mmap_threshold

MIB = 2**20
PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def random_blocks(tokens: int, seq: int, vocab: int) -> torch.Tensor:
    """`tokens` // `seq` (at least one) blocks of seeded random ids: cost does not depend on the text."""
    return torch.randint(0, vocab, (max(1, tokens // seq), seq), generator=torch.Generator().manual_seed(0))


def streamed_calibration(folder: str, tokens: int, seq: int, batch: int, threads: int = 2) -> dict[str, float]:
    """In THIS process: the streamed calibration pass over `tokens` random tokens of the fp32 model in `folder`.
    Returns tok_s, peak_rss_mib (this process's peak so far) and predicted_mib. Meaningful in a fresh process only
    (`streamed_calibration_fresh`)."""
    pin_mmap_threshold()  # the allocator setting a streamed worker runs under (StreamedDecoder sets it too)
    torch.set_num_threads(threads)
    store = LayerStore(folder, dtype=torch.float32)
    ids = random_blocks(tokens, seq, store.config.vocab_size)
    dec = StreamedDecoder(store)
    t0 = time.perf_counter()
    accumulate_streamed(dec, ids, batch, spec=S.StatSpec())
    tok_s = ids.numel() / (time.perf_counter() - t0)
    est = predict_memory(model_sizes(store.config), "float32", batch, seq, ids.numel(), None, BASE_BYTES)
    return {"tok_s": tok_s, "peak_rss_mib": peak_rss_mib(), "predicted_mib": est.streamed_peak / MIB}


def sequential_runner(folder: str, tokens: int, seq: int, batch: int, layers: int, general_tokens: int = 0,
                      threads: int = 2, hidden_budget: int = 2 * 2**30) -> dict[str, float]:
    """In THIS process: a streamed LayerRunner over `tokens` (+ `general_tokens` at weight 0.25) random tokens, driven
    through `layers` layers as minigpt.sequential drives it. Returns s_per_layer, peak_rss_mib, predicted_mib (the
    runner's predicted peak)."""
    pin_mmap_threshold()
    torch.set_num_threads(threads)
    store = LayerStore(folder, dtype=torch.float32)
    vocab = store.config.vocab_size
    ids = random_blocks(tokens, seq, vocab)
    general = random_blocks(general_tokens, seq, vocab) if general_tokens else None
    runner = LayerRunner.from_folder(folder, ids, batch, general, 0.25 if general_tokens else 0.0,
                                     hidden_budget=hidden_budget)
    arch = arch_of(store.config)
    t0 = time.perf_counter()
    for i in range(layers):
        runner.dense_step(i, True)
        runner.stats(i, "attn", attn_only=True)
        state = store.layer_state(i)
        for part in (arch.attn_out, arch.mlp_out):
            key = f"{part}.weight"
            runner.apply({f"{arch.layers}.{i}.{key}": state[key].clone()})
            if part == arch.attn_out:
                runner.stats(i, "mlp")
        runner.advance(i)
    s_per_layer = (time.perf_counter() - t0) / layers
    runner.close()
    held = ids.numel() + (general.numel() if general is not None else 0)
    est = predict_memory(model_sizes(store.config), "float32", batch, seq, held, hidden_budget, BASE_BYTES)
    return {"s_per_layer": s_per_layer, "peak_rss_mib": peak_rss_mib(), "predicted_mib": est.runner_peak / MIB}


def streamed_calibration_fresh(folder: str, tokens: int, seq: int, batch: int, threads: int = 2,
                               timeout: float | None = None, runner_layers: int = 0,
                               general_tokens: int = 0) -> dict[str, float]:
    """`streamed_calibration` (or with `runner_layers`, `sequential_runner`) in a fresh interpreter (this minigpt on
    its path); RuntimeError with its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "minigpt.memprobe", str(folder), "--tokens", str(tokens), "--seq", str(seq),
           "--batch", str(batch), "--threads", str(threads), "--runner", str(runner_layers),
           "--general-tokens", str(general_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"streamed calibration of {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runner", type=int, default=0, help="probe a sequential runner over this many layers")
    ap.add_argument("--general-tokens", type=int, default=0)
    args = ap.parse_args(argv)
    if args.runner:
        got = sequential_runner(args.folder, args.tokens, args.seq, args.batch, args.runner, args.general_tokens,
                                args.threads)
    else:
        got = streamed_calibration(args.folder, args.tokens, args.seq, args.batch, args.threads)
    print(json.dumps(got), flush=True)


if __name__ == "__main__":
    main()
