"""What minigpt's stages cost as models grow: the cost table of the README (135M / 270M / 0.5B / 1.5B).

For every model given (built-in aliases, prepared offline from their PyPI packages, or model folders), each
measurement runs in a fresh subprocess so its peak RSS (VmHWM) is its own:
  * `plain`: a plain in-memory decoder forward of `--tokens` tokens (from_pretrained, no head): tokens/s, peak RSS;
  * `calib`: the layer-streamed calibration pass a CalibrationWorker runs (minigpt.streamed.accumulate_streamed:
    embedding and head resident, one decoder layer read from the checkpoint at a time) over the same tokens, with
    the base (diagonal) statistics: tokens/s, peak RSS, and the peak minigpt.memory predicts from the config
    (minigpt.memprobe, which the real-model test runs too);
  * `prune`: sequential pruning as a job runs it, driver and one runner in one process, both streamed (a LayerStore
    driver, LayerRunner.from_folder), default method at `--target` on the same tokens: seconds per layer; then the
    expert written layer by layer into sharded safetensors (minigpt.slimstream): seconds, and peak RSS of it all;
  * `runner`: a sequential runner alone (minigpt.memprobe.sequential_runner: the stream-target protocol for its
    share of `--tokens` plus half as many general tokens, over `--runner-layers` layers): seconds per layer on the
    runner's side, peak RSS, and the runner's predicted peak. For models whose whole `prune` run is too long here.
Beside them, from the config alone: the bytes of a profile with and without Gram statistics (what one-shot planning
would hold per domain) and the model's fp32 size.

The tokens are random ids (cost does not depend on the text). Prints one line per model and, last, one line of
JSON keyed `<figure>_<model>`: calib_tok_s, plain_tok_s, calib_vs_plain, rss_calib_mib, rss_plain_mib,
predicted_calib_mib, plan_s_per_layer, write_s, rss_prune_mib, runner_s_per_layer, rss_runner_mib,
predicted_runner_mib, fp32_mib, profile_mib, profile_gram_mib (those of the modes run).

Usage: .venv/bin/python benchmarks/scale.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--tokens 2048]
       [--modes plain,calib,prune,runner] [--runner-layers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20


def child(mode: str, folder: str, tokens: int, seq: int, batch: int, target: float, runner_layers: int = 2) -> dict:
    """One measurement in this process (see the module docstring)."""
    from minigpt.config import PruneConfig
    from minigpt.layerstore import LayerStore
    from minigpt.memory import peak_rss_mib
    from minigpt.memprobe import random_blocks, sequential_runner, streamed_calibration
    from minigpt.models import load_model
    from minigpt.streamed import pin_mmap_threshold

    if mode == "calib":  # the measurement tests/test_real_model.py holds the prediction to
        got = streamed_calibration(folder, tokens, seq, batch, threads=2)
        return {"tok_s": got["tok_s"], "predicted_mib": got["predicted_mib"], "rss_mib": got["peak_rss_mib"]}
    if mode == "runner":
        got = sequential_runner(folder, tokens, seq, batch, runner_layers, tokens // 2, threads=2)
        return {"s_per_layer": got["s_per_layer"], "predicted_mib": got["predicted_mib"], "rss_mib": got["peak_rss_mib"]}
    pin_mmap_threshold()
    torch.set_num_threads(2)
    store = LayerStore(folder, dtype=torch.float32)
    ids = random_blocks(tokens, seq, store.config.vocab_size)
    out: dict = {}
    if mode == "plain":
        model = load_model(folder)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, len(ids), batch):
                model.model(ids[lo:lo + batch])  # the decoder only, as calibration runs it
        out["tok_s"] = ids.numel() / (time.perf_counter() - t0)
    else:  # prune: streamed driver and runner, then the expert written layer by layer
        import tempfile

        from minigpt.runner import LayerRunner
        from minigpt.sequential import prune_sequential
        from minigpt.slimstream import slim_to_folder

        cfg = PruneConfig(target=target, general_weight=0.0)
        runner = LayerRunner.from_folder(folder, ids, batch)
        t0 = time.perf_counter()
        plan, weights = prune_sequential(store, [runner], cfg, domain="bench")
        out["plan_s_per_layer"] = (time.perf_counter() - t0) / store.num_layers
        runner.close()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            slim_to_folder(store, plan, Path(tmp) / "expert", weights)
            out["write_s"] = time.perf_counter() - t0
    out["rss_mib"] = peak_rss_mib()
    return out


def measure(folder: str, args) -> dict:
    from minigpt import stats as S
    from minigpt.memory import model_sizes

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    row = {"fp32_mib": model_sizes(config).total_params * 4 / MIB,
           "profile_mib": S.stats_bytes(config, S.StatSpec()) / MIB,
           "profile_gram_mib": S.stats_bytes(config, S.StatSpec(gram=True)) / MIB}
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", folder, "--tokens",
                               str(args.tokens), "--seq", str(args.seq), "--batch", str(args.batch), "--target",
                               str(args.target), "--runner-layers", str(args.runner_layers)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} on {folder} failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if mode == "plain":
            row.update(plain_tok_s=got["tok_s"], rss_plain_mib=got["rss_mib"])
        elif mode == "calib":
            row.update(calib_tok_s=got["tok_s"], rss_calib_mib=got["rss_mib"], predicted_calib_mib=got["predicted_mib"])
        elif mode == "runner":
            row.update(runner_s_per_layer=got["s_per_layer"], rss_runner_mib=got["rss_mib"],
                       predicted_runner_mib=got["predicted_mib"])
        else:
            row.update(plan_s_per_layer=got["plan_s_per_layer"], write_s=got["write_s"], rss_prune_mib=got["rss_mib"])
    if "calib_tok_s" in row and "plain_tok_s" in row:
        row["calib_vs_plain"] = row["calib_tok_s"] / row["plain_tok_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.2)
    ap.add_argument("--modes", default="plain,calib,prune")
    ap.add_argument("--runner-layers", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--folder", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.tokens, args.seq, args.batch, args.target,
                               args.runner_layers)))
        return
    from minigpt.config import ModelConfig
    from minigpt.models import resolve

    result: dict = {"tokens": args.tokens}
    for name in args.models.split(","):
        try:
            folder = str(resolve(ModelConfig(source=name)))
        except Exception as e:  # a model whose packages are not installed is skipped, and said so
            print(f"[scale] {name}: skipped ({e})", flush=True)
            continue
        row = measure(folder, args)
        print(f"[scale] {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
        key = name.replace(".", "").replace("-", "_")
        result.update({f"{k}_{key}": round(v, 3) for k, v in row.items()})
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
