"""What calibration costs as the tokens and the domains grow, on the demo's model and workers (issue: the models
people prune, item 5).

Calibration is one pass of every domain's shards through the model on Ray actors (minigpt.calibrate), so one job
serves many domains with one model load per worker. This measures, on SmolLM2-135M with the demo's two workers
(0.5 CPU each, base statistics, whole-model workers as `calibrate.streamed: auto` runs them without a memory limit):
  * tokens: one domain of 16k and of 64k tokens: seconds and tokens/s (the cost is linear in tokens);
  * domains: 1, 3 and 6 domains of `--domain-tokens` each in ONE calibration pass, against the same 6 domains
    calibrated one pass per domain (as six single-domain jobs would: a worker start and model load each).
The tokens are seeded random ids (cost does not depend on the text). Prints one line per run and, last, one line
of JSON: tok_s_16k, tok_s_64k, time_64k_vs_16k, one_pass_s_d1 / _d3 / _d6, separate_s_d6, separate_vs_one_pass_d6.

Usage: .venv/bin/python benchmarks/calib_cost.py [--model smollm2-135m] [--domain-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.calibrate import Shard, calibrate  # noqa: E402
from minigpt.config import CalibrateConfig, ModelConfig  # noqa: E402
from minigpt.models import resolve  # noqa: E402
from minigpt.raylib import ensure_ray  # noqa: E402

BLOCK, PER_SHARD = 256, 8  # the demo's block size; 2,048 tokens per shard


def write_domain(root: Path, domain: str, tokens: int, vocab: int, seed: int) -> list[Shard]:
    """Seeded random shards of `tokens` tokens for one domain, in the pipeline's shard format."""
    rng = np.random.default_rng(seed)
    shards = []
    for i in range(max(1, tokens // (BLOCK * PER_SHARD))):
        blocks = rng.integers(0, vocab, size=(PER_SHARD, BLOCK), dtype=np.int32)
        path = root / domain / f"shard-{i:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"input_ids": list(blocks), "n_bytes": [BLOCK] * PER_SHARD}), path)
        shards.append(Shard(f"{domain}/shard-{i:05d}", domain, str(path)))
    return shards


def timed(shards: list[Shard], model: ModelConfig, cfg: CalibrateConfig, ledger: Path) -> float:
    t0 = time.perf_counter()
    calibrate(shards, model, cfg, ledger)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--domain-tokens", type=int, default=4096)
    args = ap.parse_args()
    model = ModelConfig(source=args.model)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(resolve(model)).vocab_size
    cfg = CalibrateConfig(workers=2, cpus_per_worker=0.5, batch_size=4)
    ensure_ray()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k in (16, 64):
            shards = write_domain(root / f"t{k}", "d", k * 1024, vocab, seed=k)
            s = timed(shards, model, cfg, root / f"ledger-t{k}")
            out[f"tok_s_{k}k"] = k * 1024 / s
            print(f"[calib_cost] 1 domain, {k}k tokens: {s:.1f} s, {k * 1024 / s:.0f} tok/s", flush=True)
        out["time_64k_vs_16k"] = (64 / out["tok_s_64k"]) / (16 / out["tok_s_16k"])
        pools = {d: write_domain(root / "dom", f"d{d}", args.domain_tokens, vocab, seed=100 + d) for d in range(6)}
        for n in (1, 3, 6):
            shards = [s for d in range(n) for s in pools[d]]
            s = timed(shards, model, cfg, root / f"ledger-d{n}")
            out[f"one_pass_s_d{n}"] = s
            print(f"[calib_cost] {n} domain(s) x {args.domain_tokens} tokens in one pass: {s:.1f} s", flush=True)
        separate = sum(timed(pools[d], model, cfg, root / f"ledger-sep{d}") for d in range(6))
        out["separate_s_d6"] = separate
        out["separate_vs_one_pass_d6"] = separate / out["one_pass_s_d6"]
        print(f"[calib_cost] 6 domains, one pass each: {separate:.1f} s", flush=True)
    print(json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
