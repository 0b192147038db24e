"""Helpers that write a tiny but real job (tiny random model, text corpora) into a folder and run it, for the
pipeline tests."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]


def tiny_env() -> dict:
    """The environment a job's subprocess runs in: no dashboard, token auth, never an outside RAY_ADDRESS."""
    env = dict(os.environ, MINIGPT_DASHBOARD="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(job: Path, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m minigpt run JOB ray.num_cpus=2 OVERRIDES...` from the repository root."""
    return subprocess.run([sys.executable, "-m", "minigpt", "run", str(job), "ray.num_cpus=2", *overrides],
                          cwd=REPO, env=tiny_env(), capture_output=True, text=True, timeout=timeout)


WORDS = {
    "alpha": "the court shall grant the licensee a perpetual right to copy and modify the work".split(),
    "beta": "patient presents with fever cough and abnormal heart rhythm after the procedure".split(),
}


def general_sources(root: Path) -> list[dict]:
    """A replay corpus for recover.general_sources: the general folder write_tiny_job writes (both vocabularies)."""
    return [{"kind": "text", "path": str(root / "corpus" / "general")}]


def write_tiny_job(root: Path, tokenizer_dir: str, recover: bool = True, steps: int = 3, **overrides) -> Path:
    """A 2-domain job on a tiny Llama that shares the real tokenizer (so corpora tokenize real text)."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(vocab=len(tok), hidden=32, inter=64, layers=2)
    model.config.eos_token_id = tok.eos_token_id
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    for name, words in WORDS.items():
        d = root / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(60):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 60)))
            (d / f"doc{i:03d}.txt").write_text(f"{name} document {i}. {text}\n")
        # Text of the domain in another form (numbered questions), which the job only evaluates on.
        other = root / "corpus" / f"{name}-other"
        other.mkdir(parents=True, exist_ok=True)
        for i in range(12):
            lines = [f"Q{k}: what is the {rng.choice(words)} of the {rng.choice(words)}?" for k in range(8)]
            (other / f"q{i:03d}.txt").write_text("\n".join(lines) + "\n")
    general = root / "corpus" / "general"  # the replay corpus: both vocabularies mixed
    general.mkdir(parents=True, exist_ok=True)
    every = [w for words in WORDS.values() for w in words]
    for i in range(30):
        (general / f"g{i:03d}.txt").write_text(" ".join(rng.choice(every) for _ in range(50)) + "\n")
    job = {
        "name": "tiny",
        "model": str(model_dir),
        "domains": {n: {"sources": [{"kind": "text", "path": str(root / "corpus" / n)}],
                        "eval_sources": [{"kind": "text", "path": str(root / "corpus" / f"{n}-other"),
                                          "name": "questions"}]} for n in WORDS},
        "data": {"block_size": 32, "calib_tokens": 256, "heldout_tokens": 128, "train_tokens": 512,
                 "blocks_per_shard": 2, "eval_tokens": 128},
        # streamed: the layer-streamed path end to end (the default, "auto", streams only under a memory limit).
        "calibrate": {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 2, "general_tokens": 256, "streamed": True},
        "prune": {"method": "contextual", "target": 0.2},
        # lr: large enough that three steps visibly lower held-out perplexity of the tiny random model.
        "recover": {"enabled": recover, "mode": "full", "steps": steps, "batch_size": 2, "workers": 1, "lr": 1e-2,
                    "cpus_per_worker": 0.5, "eval_every": 2, "general_fraction": 0.25,  # replays the job's general
                    # text (the tiny model's own samples); tests pass recover__general_sources=general_sources(root)
                    "deepspeed_config": str(Path(__file__).resolve().parents[1] / "jobs/deepspeed/zero2.json")},
        "evaluate": {"batch_size": 2},
        "output_dir": str(root / "run"),
    }
    for k, v in overrides.items():
        section, _, key = k.partition("__")
        job.setdefault(section, {})[key] = v
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
