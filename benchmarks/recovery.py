"""Recovery benchmark: what DeepSpeed costs over a plain PyTorch loop, on the real SmolLM2-135M.

Both loops train the same fp32 model from the same weights on the same batches (minigpt.recover.batch_indices
over token blocks of /usr/share/common-licenses), with the same AdamW, schedule and clipping; the DeepSpeed one is
minigpt.recover's own engine (build_engine + train_step, ZeRO from the job's JSON) in a one-process gloo group.
Their steps alternate (a warm-up step each, then `--steps` timed steps each), so a machine shared with other work
slows both alike; their losses must agree (max_loss_diff). The last line printed is one JSON object:

    {"deepspeed_vs_plain": 0.97, "plain_tokens_per_s": ..., "deepspeed_tokens_per_s": ..., ...}

`heldout_ppl_after_recovery` (run with --pruned DIR) measures held-out perplexity of a pruned expert before and
after full / lora / distill recovery through recover_all (Ray Train). It needs a pruned folder from minigpt.slim.

Usage: .venv/bin/python benchmarks/recovery.py [--steps 3] [--batch-size 4] [--block-size 256] [--zero 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.config import RecoverConfig  # noqa: E402
from minigpt.models import cache_root  # noqa: E402
from minigpt.recover import deepspeed_config, recover_all  # noqa: E402
from minigpt.training import (RecoveryTask, batch_indices, build_engine, build_student, lr_factor,  # noqa: E402
                              next_token_loss, param_groups, train_step)

LICENSES = Path("/usr/share/common-licenses")


def default_model() -> Path:
    found = sorted((cache_root() / "models").glob("smollm2-135m-*"))
    if not found:
        raise SystemExit("SmolLM2-135M is not prepared; run `make setup` (minigpt.models.prepare_alias)")
    return found[0]


def corpus_text(limit_chars: int = 400_000) -> str:
    parts = [p.read_text(errors="replace") for p in sorted(LICENSES.rglob("*")) if p.is_file() and not p.is_symlink()]
    return "\n\n".join(parts)[:limit_chars]


def token_blocks(folder: Path, text: str, block_size: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class PlainTrainer:
    """Reference: the same model, batches, AdamW, schedule and clipping, no DeepSpeed."""

    def __init__(self, folder: Path, cfg: RecoverConfig):
        self.cfg = cfg
        self.model = build_student(str(folder), cfg)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))

    def step(self, blocks: torch.Tensor, step: int) -> float:
        cfg = self.cfg
        x = blocks[batch_indices(len(blocks), step, 0, 0, 1, cfg.batch_size, 1, cfg.seed)]
        loss = next_token_loss(self.model(input_ids=x, use_cache=False).logits, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class DeepSpeedTrainer:
    """minigpt.recover's engine and step function in a one-process gloo group."""

    def __init__(self, folder: Path, cfg: RecoverConfig):
        import deepspeed

        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
                           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
        self.cfg = cfg
        self.engine, _ = build_engine(build_student(str(folder), cfg), cfg, deepspeed_config(cfg))

    def step(self, blocks: torch.Tensor, step: int) -> float:
        return train_step(self.engine, blocks, step, 0, 1, self.cfg, torch.device("cpu")).item()


def compare(folder: Path, blocks: torch.Tensor, cfg: RecoverConfig, steps: int) -> dict[str, object]:
    """Alternate plain and DeepSpeed steps so that a busy machine slows both alike; step 0 is a warm-up."""
    trainers = {"plain": PlainTrainer(folder, cfg), "deepspeed": DeepSpeedTrainer(folder, cfg)}
    elapsed = {name: 0.0 for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(steps + 1):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            losses[name].append(trainer.step(blocks, step))
            if step > 0:
                elapsed[name] += time.perf_counter() - t0
        print(f"[bench] step {step}: " + ", ".join(f"{n} loss {losses[n][-1]:.4f}" for n in trainers), flush=True)
    tokens = steps * cfg.batch_size * blocks.shape[1]
    tps = {name: tokens / elapsed[name] for name in trainers}
    return {"deepspeed_vs_plain": round(tps["deepspeed"] / tps["plain"], 3),
            "plain_tokens_per_s": round(tps["plain"], 1), "deepspeed_tokens_per_s": round(tps["deepspeed"], 1),
            "max_loss_diff": round(max(abs(a - b) for a, b in zip(losses["plain"], losses["deepspeed"])), 5)}


# --------------------------------------------------------------------------------------------------------------
# Held-out perplexity after recovery. NOT RUN by default: it needs a pruned expert folder from minigpt.slim
# (pass --pruned DIR, plus --teacher-token-ids FILE.json for a vocabulary-pruned one).


def perplexity(folder: str, blocks: torch.Tensor, batch_size: int = 4) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = blocks[i: i + batch_size]
            total += next_token_loss(model(input_ids=x, use_cache=False).logits, x).item() * len(x)
    return math.exp(total / len(blocks))


def heldout_ppl_after_recovery(pruned_dir: str, teacher_dir: str, cfg: RecoverConfig, block_size: int = 256,
                               heldout_blocks: int = 16, teacher_token_ids: tuple[int, ...] | None = None,
                               modes: tuple[str, ...] = ("full", "lora", "distill"),
                               data_dir: Path | None = None) -> dict[str, float]:
    """Held-out PPL of `pruned_dir` before recovery and after each mode, after equal steps.

    With `data_dir` (a prepared domain, minigpt.corpora) the expert trains on its train shards and is measured on
    its held-out documents: disjoint by document hash. Without it, the licenses text is cut into blocks, the first
    `heldout_blocks` held out (disjoint blocks, but possibly of the same documents).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="minigpt-recovery-bench-"))
    if data_dir is not None:
        from minigpt.corpora import DomainData

        data = DomainData.load(data_dir)
        heldout_text = "\n\n".join(t for _, t in data.documents("heldout"))
        heldout = token_blocks(Path(pruned_dir), heldout_text, block_size)[:heldout_blocks]
        dense_heldout = token_blocks(Path(teacher_dir), heldout_text, block_size)[:heldout_blocks]
        shards = tuple(str(p) for p in data.shards("train"))
    else:
        blocks = token_blocks(Path(pruned_dir), corpus_text(), block_size)
        heldout, train = blocks[:heldout_blocks], blocks[heldout_blocks:]
        dense_heldout = token_blocks(Path(teacher_dir), corpus_text(), block_size)[:heldout_blocks]
        shard = work / "train.parquet"
        pq.write_table(pa.table({"input_ids": pa.array(train.tolist(), type=pa.list_(pa.int32()))}), shard)
        shards = (str(shard),)
    out = {"dense": perplexity(teacher_dir, dense_heldout) if teacher_token_ids is None else float("nan"),
           "pruned": perplexity(pruned_dir, heldout)}
    for mode in modes:
        task = RecoveryTask(domain=f"bench-{mode}", student_dir=pruned_dir, train_shards=shards,
                            out_dir=str(work / mode / "recovered"), checkpoint_dir=str(work / mode / "checkpoints"),
                            teacher_dir=teacher_dir, teacher_token_ids=teacher_token_ids)
        result = recover_all([task], dataclasses.replace(cfg, mode=mode))[task.domain]
        out[mode] = perplexity(result.out_dir, heldout) if result.ok else float("nan")
        print(f"[bench] {mode}: ok={result.ok} heldout ppl {out[mode]:.2f} {result.error or ''}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--zero", type=int, choices=(2, 3), default=2)
    ap.add_argument("--pruned", type=str, default=None, help="pruned expert folder: also measure held-out PPL")
    ap.add_argument("--teacher-token-ids", type=Path, default=None, help="JSON list (vocabulary-pruned expert)")
    ap.add_argument("--data", type=Path, default=None, help="prepared domain folder (runs/<job>/data/<domain>): "
                    "train on its train split, measure on its held-out documents")
    ap.add_argument("--recover-steps", type=int, default=20, help="equal steps for full, lora and distill")
    args = ap.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    folder = args.model or default_model()
    cfg = RecoverConfig(steps=args.steps + 1, batch_size=args.batch_size, lr=5e-5, warmup_steps=1,
                        deepspeed_config=f"jobs/deepspeed/zero{args.zero}.json")
    blocks = token_blocks(folder, corpus_text(), args.block_size)
    result = {**compare(folder, blocks, cfg, args.steps), "zero_stage": args.zero, "batch_size": args.batch_size,
              "block_size": args.block_size, "timed_steps": args.steps, "threads": torch.get_num_threads(),
              "model": folder.name}
    if args.pruned:
        ids = tuple(json.loads(args.teacher_token_ids.read_text())) if args.teacher_token_ids else None
        rcfg = RecoverConfig(steps=args.recover_steps, batch_size=2, workers=1,
                             cpus_per_worker=float(os.cpu_count() or 1))
        result["heldout_ppl"] = heldout_ppl_after_recovery(args.pruned, str(folder), rcfg, args.block_size,
                                                           teacher_token_ids=ids, data_dir=args.data)
        for mode in ("full", "lora", "distill"):
            result[f"{mode}_vs_pruned_ppl"] = round(result["heldout_ppl"][mode] / result["heldout_ppl"]["pruned"], 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
