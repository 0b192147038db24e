"""The GPU path in one short run, for a lent GPU machine (never needed by the tests): what CPU runs cannot show.

1. Calibration on the device in the model's GPU dtype (bf16): the statistics pass a CalibrationWorker runs (whole
   model on the device; base statistics, then with Gram matrices) against a plain decoder forward of the same
   blocks: `calib_vs_plain`, `calib_gram_vs_plain`, tokens/s of each.
2. Recovery's DeepSpeed engine as minigpt builds it (minigpt.training.build_engine, the packaged ZeRO-2 and ZeRO-3
   configs, bf16 on CUDA, NCCL): a few optimizer steps of each on the same blocks from the same weights; tokens/s and
   the loss difference between the two stages (they must train alike).

On a CPU machine the same script runs in fp32 with gloo (a dry run: it checks the script, not the GPU).
Last line: one JSON object. Usage (after `make scale-setup` for the 0.5B model):
  .venv/bin/python benchmarks/gpu_check.py [--model qwen2.5-coder-0.5b] [--blocks 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def calibration(folder: str, device: str, dtype: str, blocks: torch.Tensor, batch: int) -> dict:
    from minigpt import stats as S
    from minigpt.models import load_model

    model = load_model(folder, dtype).to(device)

    def plain():
        with torch.inference_mode():
            for lo in range(0, len(blocks), batch):
                model.model(blocks[lo:lo + batch].to(device))

    plain()  # warm-up (kernels, allocator)
    n = blocks.numel()
    t_plain = timed(plain)
    t_calib = timed(lambda: S.accumulate(model, blocks.to(device), batch, spec=S.StatSpec()))
    t_gram = timed(lambda: S.accumulate(model, blocks.to(device), batch, spec=S.StatSpec(gram=True)))
    return {"plain_tok_s": round(n / t_plain, 1), "calib_tok_s": round(n / t_calib, 1),
            "calib_gram_tok_s": round(n / t_gram, 1), "calib_vs_plain": round(t_plain / t_calib, 3),
            "calib_gram_vs_plain": round(t_plain / t_gram, 3)}


def deepspeed_steps(folder: str, device: str, blocks: torch.Tensor, batch: int, steps: int) -> dict:
    import deepspeed

    from minigpt.config import RecoverConfig, packaged_deepspeed
    from minigpt.recover import deepspeed_config
    from minigpt.training import build_engine, build_student, train_step

    cuda = device == "cuda"
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29531"),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    if not cuda:  # the CPU accelerator would compile its shm op first (minutes); gloo alone is enough (field notes)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    out: dict = {"backend": "nccl" if cuda else "gloo"}
    losses = {}
    for stage in (2, 3):
        cfg = RecoverConfig(steps=steps + 1, batch_size=batch, lr=5e-5, warmup_steps=1, use_gpu=cuda,
                            deepspeed_config=packaged_deepspeed(f"zero{stage}.json"))
        ds = deepspeed_config(cfg)  # one dict for both, as recovery does: ZeRO-3 loads the student partitioned
        engine, _ = build_engine(build_student(folder, cfg, ds), cfg, ds, cfg.steps)
        dev = torch.device(device)
        losses[stage] = [train_step(engine, blocks, 0, 0, 1, cfg, dev).item()]  # warm-up step
        seconds = 0.0
        for step in range(1, steps + 1):
            t = timed(lambda: losses[stage].append(train_step(engine, blocks, step, 0, 1, cfg, dev).item()))
            seconds += t
        out[f"zero{stage}_tok_s"] = round(steps * batch * blocks.shape[1] / seconds, 1)
        engine = None  # frees the stage's partitions before the next one is built
        if cuda:
            out[f"zero{stage}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
    out["zero3_vs_zero2"] = round(out["zero3_tok_s"] / out["zero2_tok_s"], 3)
    out["max_loss_diff"] = round(max(abs(a - b) for a, b in zip(losses[2], losses[3])), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from minigpt.config import ModelConfig
    from minigpt.models import resolve

    try:
        folder = str(resolve(ModelConfig(source=args.model)))
    except Exception as e:  # `make bench` on a machine without `make scale-setup`: the demo's model instead
        print(f"[gpu_check] {args.model} is not available ({e}); using smollm2-135m", flush=True)
        args.model = "smollm2-135m"
        folder = str(resolve(ModelConfig(source=args.model)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    blocks = torch.randint(0, vocab, (args.blocks, args.seq), generator=torch.Generator().manual_seed(0))
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": dtype, **calibration(folder, device, dtype, blocks, args.batch)}
    print(f"[gpu_check] calibration: {result}", flush=True)
    result.update(deepspeed_steps(folder, device, blocks, args.batch, args.steps))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
