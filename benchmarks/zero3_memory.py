"""A ZeRO-3 LoRA recovery worker's memory with the vocabulary held whole against held as row blocks.

Runs what a recovery worker does (minigpt.training: build_student partitioned and filled layer by layer,
deepspeed.initialize, then `--steps` LoRA steps of one batch) in `--workers` processes joined by gloo, without Ray,
once with `recover.vocab_block_params: 0` (the embedding and head are stock modules, which ZeRO-3 gathers whole
when they run) and once with the default blocks (minigpt.vocabsplit: one block gathered at a time). Each rank
prints its RSS and the peak of each phase (loading, engine, forward, backward, step: the kernel's high-water mark,
reset between phases); the parent takes each run's highest peak over ranks and phases, beside minigpt.memory's
prediction for the same worker (which leaves out what a Ray worker process adds).

The effect grows with the vocabulary's share of the model: Qwen2.5-1.5B's 151,936-row embedding and head are 0.87
GiB each in fp32 (README: the models people prune); SmolLM2-135M's tied 49,152 rows are 0.1 GiB and fit two blocks.

Prints one line per run and phase, then one line of JSON. Usage:
  .venv/bin/python benchmarks/zero3_memory.py [--model FOLDER] [--workers 2] [--steps 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import torch

PHASES = ("load", "engine", "forward", "backward", "step")


def _status() -> tuple[float, float]:
    """This process's RSS and high-water mark, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def _phase(rank: int, name: str, peaks: dict[str, float]) -> None:
    rss, hwm = _status()
    peaks[name] = max(peaks.get(name, 0.0), hwm)
    print(f"  rank {rank} {name:<9} RSS {rss:7.0f} MiB, phase peak {hwm:7.0f} MiB", flush=True)
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark: the next phase's peak is its own


def _config(world: int, block: int):
    """The recovery settings measured: LoRA, one block of `--seq` tokens a step, ZeRO-3, gradient checkpointing."""
    from minigpt.config import RecoverConfig, packaged_deepspeed

    return RecoverConfig(mode="lora", batch_size=1, workers=world, deepspeed_config=packaged_deepspeed("zero3.json"),
                         gradient_checkpointing=True, vocab_block_params=block)


def worker(rank: int, world: int, port: int, folder: str, block: int, steps: int, seq: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from minigpt import recover, training
    from minigpt.streamed import pin_mmap_threshold

    torch.set_num_threads(1)
    pin_mmap_threshold()  # as a trainer worker does
    cfg = _config(world, block)
    ds = recover.deepspeed_config(cfg)
    training._no_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    Path("/proc/self/clear_refs").write_text("5")
    peaks: dict[str, float] = {}
    model = training.build_student(folder, cfg, ds)
    _phase(rank, "load", peaks)
    engine, _ = training.build_engine(model, cfg, ds, steps)
    _phase(rank, "engine", peaks)
    vocab = training.vocab_rows(model)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(rank))
    for _ in range(steps):
        loss = training.next_token_loss(engine(input_ids=ids, use_cache=False).logits, ids)
        _phase(rank, "forward", peaks)
        engine.backward(loss)
        del loss
        _phase(rank, "backward", peaks)
        engine.step()
        _phase(rank, "step", peaks)
    if rank == 0:
        blocks = len(getattr(model.get_input_embeddings(), "blocks", ()))
        Path(out).write_text(json.dumps({"peaks": peaks, "vocab_blocks": blocks}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(folder: str, world: int, block: int, steps: int, seq: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp
    from transformers import AutoConfig

    from minigpt import recover

    out = tmp / f"block-{block}.json"
    mp.start_processes(worker, args=(world, _free_port(), folder, block, steps, seq, str(out)), nprocs=world,
                       start_method="spawn")
    result = json.loads(out.read_text())
    cfg = _config(world, block)
    est = recover.predict_worker(AutoConfig.from_pretrained(folder), cfg, recover.deepspeed_config(cfg), seq)
    return {**result, "peak_mib": max(result["peaks"].values()), "predicted_mib": est.peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="a save_pretrained folder (default: the smollm2-135m alias)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if not args.model:
        from minigpt.config import ModelConfig
        from minigpt.models import resolve

        args.model = str(resolve(ModelConfig(source="smollm2-135m")))
    import tempfile

    from minigpt.config import RecoverConfig

    default_block = RecoverConfig().vocab_block_params
    with tempfile.TemporaryDirectory(prefix="minigpt-zero3-memory-") as tmp:
        runs = {}
        for name, block in (("whole", 0), ("blocks", default_block)):
            print(f"{name}: recover.vocab_block_params={block}", flush=True)
            runs[name] = run(args.model, args.workers, block, args.steps, args.seq, Path(tmp))
            r = runs[name]
            print(f"{name}: {r['vocab_blocks']} block(s), peak {r['peak_mib']:.0f} MiB (predicted "
                  f"{r['predicted_mib']:.0f}); by phase " + ", ".join(f"{p} {r['peaks'][p]:.0f}" for p in PHASES),
                  flush=True)
    whole, blocks = runs["whole"], runs["blocks"]
    print(json.dumps({"peak_blocks_vs_whole": round(blocks["peak_mib"] / whole["peak_mib"], 3),
                      "load_peak_blocks_vs_whole": round(blocks["peaks"]["load"] / whole["peaks"]["load"], 3),
                      "peak_whole_mib": round(whole["peak_mib"]), "peak_blocks_mib": round(blocks["peak_mib"]),
                      "predicted_whole_mib": round(whole["predicted_mib"]),
                      "predicted_blocks_mib": round(blocks["predicted_mib"]), "vocab_blocks": blocks["vocab_blocks"],
                      "workers": args.workers, "seq": args.seq}))


if __name__ == "__main__":
    main()
