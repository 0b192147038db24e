"""The sections of the optional stages (search, quantize, export): frozen dataclasses validated in `__post_init__`,
and the constants they check against. minigpt.config holds the core sections; minigpt.jobfile composes them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.config import PRUNE_METHODS, _check

SEARCH_OBJECTIVES = ("params", "latency")
SEARCH_SPLITS = ("calib", "train")  # never heldout: the search must not see the documents of the final report


@dataclass(frozen=True)
class SearchConfig:
    """NSGA-II search over expert shapes (minigpt.search); off unless enabled."""

    enabled: bool = False
    objective: str = "params"  # size objective against loss: "params" (total, tied once) or measured "latency"
    method: str = "contextual"  # scoring method ranking channels and KV groups inside a shape
    population: int = 8
    generations: int = 4
    seed: int = 0
    crossover_prob: float = 0.9
    mutation_prob: float = 0.0  # per gene; 0 = 1 / number of genes
    mlp_fractions: tuple[float, ...] = tuple(i / 16 for i in range(4, 17))  # MLP widths offered, x dense width
    multiple_of: int = 8  # MLP widths are rounded to a multiple of this
    kv: bool = True  # search the KV groups kept per layer (else every group is kept)
    vocab_min_counts: tuple[int, ...] = (0,)  # vocabulary cuts offered: 0 = none, n = keep tokens seen >= n times
    min_layers: int = 1
    seed_uniform: bool = True  # start from the full shape + population/2 - 1 uniform-MLP shapes, the rest random
    split: str = "train"  # documents the candidates are scored on (see minigpt.search on leakage)
    eval_blocks: int = 4  # blocks of data.block_size scored per candidate
    batch_size: int = 4
    workers: int = 2  # Ray actors, each holding the dense model
    cpus_per_worker: float = 1.0  # also the torch thread count of each actor
    latency_batch: int = 1  # objective latency: fixed forward shape and repeats
    latency_seq_len: int = 128
    latency_repeats: int = 3
    points: int = 1  # plans taken from the front for slimming and recovery, spread over sizes
    budget: float = 0.0  # > 0: take the one lowest-loss plan with at most budget x dense total parameters

    def __post_init__(self) -> None:
        _check(self.objective in SEARCH_OBJECTIVES,
               f"search.objective {self.objective!r} is not one of {', '.join(SEARCH_OBJECTIVES)}")
        _check(self.method in PRUNE_METHODS and self.method not in ("depth", "cus-prun", "taylor", "obs", "flap"),
               f"search.method {self.method!r} must be one of contextual, wanda-sp, magnitude, random")
        _check(self.population >= 4 and self.population % 2 == 0, "search.population must be an even number >= 4")
        _check(self.generations >= 1, "search.generations must be >= 1")
        _check(0 <= self.crossover_prob <= 1 and 0 <= self.mutation_prob <= 1,
               "search.crossover_prob and mutation_prob must be in [0, 1]")
        _check(len(self.mlp_fractions) >= 1 and all(0 < f <= 1 for f in self.mlp_fractions),
               "search.mlp_fractions must be a non-empty list of fractions in (0, 1]")
        _check(self.multiple_of >= 1, "search.multiple_of must be >= 1")
        _check(len(self.vocab_min_counts) >= 1 and all(c >= 0 for c in self.vocab_min_counts),
               "search.vocab_min_counts must be a non-empty list of counts >= 0 (0 = no vocabulary cut)")
        _check(self.min_layers >= 1, "search.min_layers must be >= 1")
        _check(self.split in SEARCH_SPLITS,
               f"search.split {self.split!r} must be one of {', '.join(SEARCH_SPLITS)} (never the held-out split)")
        _check(self.eval_blocks >= 1 and self.batch_size >= 1, "search.eval_blocks and batch_size must be >= 1")
        _check(self.workers >= 1 and self.cpus_per_worker > 0, "search.workers and cpus_per_worker must be positive")
        _check(self.latency_batch >= 1 and self.latency_seq_len >= 2 and self.latency_repeats >= 1,
               "search.latency_batch and latency_repeats must be >= 1, latency_seq_len >= 2")
        _check(self.points >= 1, "search.points must be >= 1")
        _check(0 <= self.budget < 1, "search.budget must be in [0, 1) (0 = take search.points plans)")


QUANTIZE_SCHEMES = ("int8-weight",)


@dataclass(frozen=True)
class QuantizeConfig:
    """int8 weight quantization of finished experts (minigpt.quantize, torchao); off unless enabled."""

    enabled: bool = False
    scheme: str = "int8-weight"  # torchao Int8WeightOnlyConfig: int8 weights, per-channel scales, float activations
    embeddings: bool = False  # also quantize the input embedding / lm_head (tied in SmolLM2)

    def __post_init__(self) -> None:
        _check(self.scheme in QUANTIZE_SCHEMES,
               f"quantize.scheme {self.scheme!r} is not one of {', '.join(QUANTIZE_SCHEMES)}")


GGUF_TYPES = ("f16", "q8_0")


@dataclass(frozen=True)
class ExportConfig:
    """GGUF export of each domain's final expert into experts/<domain>/gguf/ (minigpt.export); off unless enabled."""

    enabled: bool = False
    gguf: tuple[str, ...] = ("f16",)  # one file per type: f16, q8_0
    verify_blocks: int = 4  # held-out blocks each file is read back on with transformers and compared; 0 = none

    def __post_init__(self) -> None:
        _check(len(self.gguf) >= 1 and all(t in GGUF_TYPES for t in self.gguf)
               and len(set(self.gguf)) == len(self.gguf),
               f"export.gguf must list distinct types among {', '.join(GGUF_TYPES)}")
        _check(self.verify_blocks >= 0, "export.verify_blocks must be >= 0")
