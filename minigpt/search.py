"""Architecture search for domain experts (LLaMA-NAS style): NSGA-II over expert shapes cut from a domain profile.

A *shape* is what a uniform PruningPlan is made of: which layers are kept, one MLP width, one KV group count and a
vocabulary cut. A shape becomes a plan with the domain's profile alone (`plan_from_shape`: the top-scoring channels
and groups of each kept layer, the tokens seen at least n times), so no new calibration is needed. The search
minimises two objectives together, size (total parameters, or measured forward latency) and quality (bits per byte
of the slimmed candidate on a small evaluation slice), and returns the Pareto front.

The genetic algorithm is minigpt.nsga (pure numpy, seeded); this module gives it the genome of a shape (Space,
random_genome, mutate, repair) and the objectives. Candidates of a generation are evaluated in parallel
by a small pool of Ray actors that keep the dense model loaded; each candidate is slimmed physically (so every plan
on the front is known to slim into a loadable stock model) and scored with evaluate.lm_metrics.

Leakage: candidates are scored on `SearchConfig.split` documents, `train` by default (the recovery split) or
`calib`, and never on the held-out split of the final report, so picking the best plan on this slice does not
flatter the reported perplexity. With a vocabulary cut prefer `train`: the token counts that decide the cut come
from the calibration split, so on calibration text a cut never drops a token that occurs and always looks free.

Quality is compared in bits per byte, not per token: a vocabulary cut re-tokenizes the text. At a fixed tokenizer
bits per byte is the summed NLL over a constant, i.e. the same ranking as the token loss, which is reported too.

Front JSON (schema "minigpt.search/1")::

    {"schema", "domain", "objective", "config": {SearchConfig}, "dense": {candidate metrics of the full shape},
     "front": [{"shape": {...}, "params", "non_embedding", "removed", "loss", "bits_per_byte", "ppl",
                "latency_ms", "plan": PruningPlan JSON object}, ...],     # sorted by size
     "history": [{"generation", "evaluated", "front": [[size, bits_per_byte], ...]}, ...]}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minigpt.config import ConfigError, PruneConfig
from minigpt.optconfig import SearchConfig
from minigpt import nsga
from minigpt.io import atomic_file, atomic_write_json
from minigpt.models import widths
from minigpt.nsga import Individual, pareto_front
from minigpt.plandata import PruningPlan, Shape, plan_from_shape, vocab_keep
from minigpt import plots, raylib, refit, scoring, slim as SL, vocab as V
from minigpt.evaluate import lm_metrics, speed_metrics
from minigpt.models import count_parameters, load_model, load_tokenizer

SCHEMA = "minigpt.search/1"

# ---------------------------------------------------------------------------------------------- genomes


@dataclass(frozen=True)
class Space:
    """The discretized search space. A genome is an int array: one keep flag per dense layer, then the index of
    the MLP width, of the KV group count and of the vocabulary cut in their option lists."""

    layers: int
    mlp_widths: tuple[int, ...]  # ascending
    kv_groups: tuple[int, ...]  # ascending; (G,) when KV groups are not searched
    vocab_min_counts: tuple[int, ...]  # 0 = no cut
    min_layers: int = 1

    @property
    def n_genes(self) -> int:
        return self.layers + 3

    def options(self) -> list[int]:
        """Number of values each gene takes."""
        return [2] * self.layers + [len(self.mlp_widths), len(self.kv_groups), len(self.vocab_min_counts)]

    def uniform(self, k: int) -> list[np.ndarray]:
        """k fixed-ratio-like genomes: every layer and KV group, no vocabulary cut, MLP widths spread over the upper
        half of the grid (below the full width), where uniform MLP pruning is known to stay usable."""
        n = len(self.mlp_widths)
        if n < 2 or k < 1:
            return []
        idx = sorted({int(round(x)) for x in np.linspace(n - 2, (n - 1) // 2, k)}, reverse=True)
        return [np.array([1] * self.layers + [i, len(self.kv_groups) - 1, 0], dtype=np.int64) for i in idx]

    def full(self) -> np.ndarray:
        """The largest shape: every layer, the widest MLP, every KV group, the smallest vocabulary cut."""
        return np.array([1] * self.layers + [len(self.mlp_widths) - 1, len(self.kv_groups) - 1, 0], dtype=np.int64)

    def genome_of(self, shape: Shape) -> np.ndarray:
        """The genome nearest to `shape`: its kept layers, the closest MLP width and KV group count offered."""
        flags = [1 if i in set(shape.kept_layers) else 0 for i in range(self.layers)]
        mlp = int(np.argmin([abs(w - shape.mlp_width) for w in self.mlp_widths]))
        kv = int(np.argmin([abs(g - shape.kv_groups) for g in self.kv_groups]))
        vocab = int(np.argmin([abs(c - shape.vocab_min_count) for c in self.vocab_min_counts]))
        return np.array(flags + [mlp, kv, vocab], dtype=np.int64)

    def shape(self, genome: np.ndarray) -> Shape:
        g = np.asarray(genome)
        return Shape(kept_layers=tuple(int(i) for i in np.flatnonzero(g[:self.layers])),
                     mlp_width=self.mlp_widths[int(g[self.layers])], kv_groups=self.kv_groups[int(g[self.layers + 1])],
                     vocab_min_count=self.vocab_min_counts[int(g[self.layers + 2])])


def make_space(model_or_config, cfg: SearchConfig) -> Space:
    w = widths(model_or_config)
    mlp = sorted({min(w["intermediate"], max(cfg.multiple_of, round(f * w["intermediate"] / cfg.multiple_of)
                                             * cfg.multiple_of)) for f in cfg.mlp_fractions})
    kv = tuple(range(1, w["kv_heads"] + 1)) if cfg.kv else (w["kv_heads"],)
    if cfg.min_layers > w["layers"]:
        raise ConfigError(f"search.min_layers {cfg.min_layers} exceeds the model's {w['layers']} layers")
    return Space(layers=w["layers"], mlp_widths=tuple(mlp), kv_groups=kv,
                 vocab_min_counts=tuple(sorted(set(cfg.vocab_min_counts))), min_layers=cfg.min_layers)


def repair(rng: np.random.Generator, genome: np.ndarray, space: Space) -> np.ndarray:
    """Keep at least `min_layers` layers by switching dropped ones back on at random."""
    g = genome.copy()
    off = np.flatnonzero(g[:space.layers] == 0)
    missing = space.min_layers - (space.layers - len(off))
    if missing > 0:
        g[rng.choice(off, size=missing, replace=False)] = 1
    return g


def random_genome(rng: np.random.Generator, space: Space) -> np.ndarray:
    """Each layer is dropped with a rate drawn per genome in [0, 0.2]: uniform flags would drop half the layers of
    every initial candidate, a region where small models are destroyed and a short search learns nothing."""
    drop = rng.uniform(0.0, 0.2)
    flags = (rng.random(space.layers) >= drop).astype(np.int64)
    rest = [int(rng.integers(n)) for n in space.options()[space.layers:]]
    return repair(rng, np.concatenate([flags, np.array(rest, dtype=np.int64)]), space)


def mutate(rng: np.random.Generator, genome: np.ndarray, space: Space, prob: float) -> np.ndarray:
    """Each gene mutates with probability `prob`: a layer flag flips; an option index moves one step up or down
    (neighbouring widths are the likely improvements; a step keeps the search local, as in bit-flip mutation)."""
    g = genome.copy()
    for i, n in enumerate(space.options()):
        if n < 2 or rng.random() >= prob:
            continue
        if i < space.layers:
            g[i] = 1 - g[i]
        else:
            step = 1 if rng.random() < 0.5 else -1
            g[i] = g[i] + step if 0 <= g[i] + step < n else g[i] - step  # at an end: the only neighbour
    return repair(rng, g, space)


def nsga2(evaluate: Callable[[list[np.ndarray]], list[tuple[Sequence[float], dict]]], space: Space, *,
          population: int, generations: int, seed: int, crossover_prob: float = 0.9, mutation_prob: float = 0.0,
          initial: Sequence[np.ndarray] = (),
          on_generation: Callable[[int, list[Individual]], None] | None = None) -> tuple[list[Individual], list]:
    """NSGA-II (minigpt.nsga) over the genomes of `space`. The initial population holds the full shape (it anchors
    the large end of the front), the `initial` genomes (e.g. Space.uniform: a warm start from the fixed-ratio
    family) and random genomes; each gene mutates with `mutation_prob` (0: one gene per genome on average)."""
    pm = mutation_prob or 1.0 / space.n_genes
    return nsga.nsga2(evaluate, population=population, generations=generations, seed=seed,
                      random_genome=lambda rng: random_genome(rng, space),
                      mutate=lambda rng, g: mutate(rng, g, space, pm), initial=[space.full(), *initial],
                      crossover_prob=crossover_prob, on_generation=on_generation)


# ============================================================================== evaluating one candidate


@torch.inference_mode()
def evaluate_plan(dense: nn.Module, tokenizer, plan: PruningPlan, texts: Sequence[str], *, block_size: int,
                  batch_size: int, max_blocks: int, latency: tuple[int, int, int] | None = None,
                  tokenizer_cache: dict | None = None, stats: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Slim `dense` by `plan` (physically; `dense` is untouched; compensated from the profile `stats` when the plan
    says reconstruct, as the expert will be) and score the candidate on `texts`.

    Returns params / non_embedding (counted on the slimmed model), loss, ppl, bits_per_byte and, when `latency`
    = (batch, seq_len, repeats) is given, the forward latency_ms of the slimmed model.
    """
    small = SL.slim(dense, plan, refit.compensation(dense, plan, stats) if plan.reconstruct else None)
    tok = tokenizer
    if plan.vocab_keep is not None:
        # Rewriting a 49k-token tokenizer takes a moment; a search offers only a few vocabulary cuts, so cache them.
        key = hash(plan.vocab_keep)
        cache = tokenizer_cache if tokenizer_cache is not None else {}
        if key not in cache:
            cache[key] = V.prune_tokenizer(tokenizer, plan.vocab_keep)
        tok = cache[key]
    total, non_emb = count_parameters(small)
    m = lm_metrics(small, tok, texts, block_size, batch_size, max_blocks=max_blocks)
    out = {"params": total, "non_embedding": non_emb, "loss": m["loss"], "ppl": m["ppl"],
           "bits_per_byte": m["bits_per_byte"], "tokens": m["tokens"], "bytes": m["bytes"], "latency_ms": None}
    if latency is not None:
        out["latency_ms"] = speed_metrics(small, *latency)["latency_ms"]
    return out


class Evaluator:
    """Holds the dense model and tokenizer; one per Ray actor (wrapped with ray.remote in search_domain)."""

    def __init__(self, model_dir: str, texts: Sequence[str], block_size: int, batch_size: int, max_blocks: int,
                 threads: int, latency: tuple[int, int, int] | None, dtype: str = "float32",
                 stats: Mapping[str, torch.Tensor] | None = None):
        # Fixed thread count: sums in a different order give different last bits, which could flip a tie.
        torch.set_num_threads(max(1, threads))
        self.model = load_model(model_dir, dtype=dtype).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.texts = list(texts)
        self.kw = dict(block_size=block_size, batch_size=batch_size, max_blocks=max_blocks, latency=latency)
        self.tokenizers: dict = {}
        self.stats = stats

    def evaluate(self, plan_json: str) -> dict:
        plan = PruningPlan.from_json(plan_json)
        return evaluate_plan(self.model, self.tokenizer, plan, self.texts, tokenizer_cache=self.tokenizers,
                             stats=self.stats, **self.kw)


# ================================================================================== search on one domain


@dataclass
class SearchResult:
    domain: str
    objective: str  # "params" or "latency"
    front: list[dict]  # sorted by size: {"shape", "plan" (PruningPlan), "params", "non_embedding", "removed",
    #                    "loss", "ppl", "bits_per_byte", "latency_ms"}
    history: list[dict]
    dense: dict  # metrics of the full shape (same slice), for reference
    config: SearchConfig | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        def point(p: dict) -> dict:
            return {**{k: v for k, v in p.items() if k != "plan"}, "plan": json.loads(p["plan"].to_json())}

        return {"schema": SCHEMA, "domain": self.domain, "objective": self.objective,
                "config": asdict(self.config) if self.config is not None else None, "seconds": self.seconds,
                "dense": point(self.dense), "front": [point(p) for p in self.front], "history": self.history}


    @classmethod
    def from_json(cls, data: dict) -> SearchResult:
        """Inverse of to_json (the config is kept as a plain dict's absence: it is in the job file)."""
        def point(p: dict) -> dict:
            return {**p, "plan": PruningPlan.from_json(json.dumps(p["plan"]))}

        return cls(domain=data["domain"], objective=data["objective"], front=[point(p) for p in data["front"]],
                   history=data.get("history", []), dense=point(data["dense"]), seconds=data.get("seconds", 0.0))


def _size(info: dict, objective: str) -> float:
    return float(info["latency_ms"] if objective == "latency" else info["params"])


def _initial(space: Space, cfg: SearchConfig, shapes: Sequence[Shape]) -> list[np.ndarray]:
    """The warm start: the given shapes (distinct genomes), then uniform-MLP shapes, up to half the population."""
    room = cfg.population // 2 - 1  # the full shape is always there too
    out = list({tuple(g): g for g in (space.genome_of(s) for s in shapes)}.values())[:room]
    if cfg.seed_uniform:
        out += space.uniform(room - len(out))
    return out


def search_domain(profile_stats: Mapping[str, torch.Tensor], model_dir: str | Path, texts: Sequence[str],
                  cfg: SearchConfig, *, domain: str, block_size: int, base_model: str = "", profile: str = "",
                  dtype: str = "float32", on_generation: Callable[[int, list[Individual]], None] | None = None,
                  reconstruct: bool = False, damp: float = 0.01, initial: Sequence[Shape] = ()) -> SearchResult:
    """NSGA-II over expert shapes for one domain; candidates are slimmed and scored by a pool of Ray actors.

    `texts` are the documents of `cfg.split` (train or calib; never the held-out split of the final report).
    The dense model is loaded here once (for scores and plans) and once in each of `cfg.workers` actors. Ray is
    connected with raylib.ensure_ray when it is not yet. With `reconstruct` every candidate is compensated from the
    profile's Gram statistics before it is scored (prune.reconstruct: the picked plans are, so the front must rank
    what will be built). `initial` shapes (e.g. minigpt.allocate's predicted front) warm-start the population.
    """
    import ray
    from ray.util import ActorPool

    t0 = time.time()
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError(f"search: no {cfg.split} documents for domain {domain!r}")
    dense = load_model(model_dir, dtype=dtype)
    space = make_space(dense, cfg)
    tokenizer = load_tokenizer(model_dir) if any(c for c in space.vocab_min_counts) else None
    scores = scoring.score_all(PruneConfig(method=cfg.method, seed=cfg.seed), profile_stats, dense)
    if len(space.kv_groups) > 1 and scores.kv is None:
        raise ConfigError(f"{dense.config.model_type!r} KV groups cannot be pruned; set search.kv false")
    vocabs = {c: vocab_keep(profile_stats["token_counts"], tokenizer, c) for c in space.vocab_min_counts}

    def plan_of(genome: np.ndarray) -> PruningPlan:
        shape = space.shape(genome)
        return plan_from_shape(scores, dense, shape, domain=domain, method=f"search:{cfg.method}",
                               vocab=vocabs[shape.vocab_min_count], base_model=base_model, profile=profile,
                               reconstruct=reconstruct, damp=damp)

    # What compensation reads (search plans drop layers plainly, so no depth moments): sent once to each actor.
    grams = {k: profile_stats[k] for k in ("tokens", "mlp_gram", "mlp_sum", "attn_gram", "attn_sum")
             if k in profile_stats} if reconstruct else None
    if reconstruct and "mlp_gram" not in profile_stats:
        raise ConfigError("search with prune.reconstruct needs the profile's Gram statistics; re-calibrate")

    latency = (cfg.latency_batch, cfg.latency_seq_len, cfg.latency_repeats) if cfg.objective == "latency" else None
    raylib.ensure_ray()
    actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker)(Evaluator)
    texts_ref = ray.put(list(texts))
    threads = max(1, int(cfg.cpus_per_worker))
    grams_ref = ray.put(grams) if grams is not None else None
    actors = [actor_cls.remote(str(model_dir), texts_ref, block_size, cfg.batch_size, cfg.eval_blocks, threads,
                               latency, dtype, grams_ref) for _ in range(cfg.workers)]
    pool = ActorPool(actors)

    seen: dict[tuple[int, ...], dict] = {}

    def evaluate(genomes: list[np.ndarray]) -> list[tuple[list[float], dict]]:
        plans = [plan_of(g) for g in genomes]
        # ActorPool.map returns results in submission order, whatever actor finishes first.
        infos = list(pool.map(lambda a, p: a.evaluate.remote(p.to_json()), plans))
        out = []
        for g, plan, info in zip(genomes, plans, infos):
            info = {**info, "shape": asdict(space.shape(g)), "plan": plan,
                    "removed": 1 - info["non_embedding"] / plan.params["dense_non_embedding"]}
            seen[tuple(int(x) for x in g)] = info
            # A NaN loss (a destroyed candidate) would break every comparison; it is simply the worst.
            bpb = info["bits_per_byte"] if np.isfinite(info["bits_per_byte"]) else np.inf
            out.append(([_size(info, cfg.objective), bpb], info))
        return out

    try:
        pop, history = nsga2(evaluate, space, population=cfg.population, generations=cfg.generations, seed=cfg.seed,
                             crossover_prob=cfg.crossover_prob, mutation_prob=cfg.mutation_prob,
                             initial=_initial(space, cfg, initial),
                             on_generation=on_generation)
        full = space.full()
        dense_info = seen.get(tuple(int(x) for x in full)) or evaluate([full])[0][1]
    finally:
        for a in actors:
            ray.kill(a)
    front = [p.info for p in pareto_front(pop)]
    return SearchResult(domain=domain, objective=cfg.objective, front=front, history=history, dense=dense_info,
                        config=cfg, seconds=time.time() - t0)


# ========================================================================================== picking, output


def pick(result: SearchResult, points: int = 1, budget: float = 0.0) -> list[PruningPlan]:
    """Plans to slim and recover. `budget` > 0: the lowest-loss front plan with at most budget x dense total
    parameters (ConfigError if none fits). Otherwise `points` plans spread evenly over the front's sizes, leaving
    out plans that remove nothing (< 1% of non-embedding parameters)."""
    front = [p for p in result.front if p["removed"] >= 0.01]
    if budget > 0:
        limit = budget * result.dense["params"]
        fits = [p for p in front if p["params"] <= limit]
        if not fits:
            smallest = min((p["params"] for p in result.front), default=0) / result.dense["params"]
            raise ConfigError(f"search.budget {budget} is below every plan on the {result.domain} front "
                              f"(smallest: {smallest:.3f} of dense)")
        return [min(fits, key=lambda p: (p["bits_per_byte"], p["params"]))["plan"]]
    if not front:
        return []
    if points >= len(front):
        return [p["plan"] for p in front]
    idx = sorted({round(i * (len(front) - 1) / max(1, points - 1)) for i in range(points)}) if points > 1 else \
        [len(front) // 2]
    return [front[i]["plan"] for i in idx]


def write_front(path: Path, result: SearchResult) -> Path:
    """Write the front JSON atomically (non-finite numbers as null)."""
    atomic_write_json(path, result.to_json())
    return Path(path)


def load_front(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} file")
    return data


def plot_front(data: dict | SearchResult, path: Path, baselines: Sequence[dict] = ()) -> Path:
    """PNG of the front (size against bits per byte) with every evaluated generation's front faded behind it and
    optional baseline points ({"label", "params" or "latency_ms", "bits_per_byte"}). Written atomically."""
    d = data.to_json() if isinstance(data, SearchResult) else data
    png = plots.plot_front(d, baselines)
    with atomic_file(path, suffix=".png") as tmp:
        tmp.write_bytes(png)
    return Path(path)


__all__ = ["SCHEMA", "SearchResult", "Shape", "Space", "evaluate_plan", "load_front", "make_space", "mutate", "nsga2",
           "pick", "plan_from_shape", "plot_front", "random_genome", "repair", "search_domain", "write_front"]
