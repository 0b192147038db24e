"""Architecture adapters: where each prunable structure lives in a decoder block, for every supported model type.

Pruning touches a model only through these descriptions: which parameters (by name inside a decoder block) hold
an MLP channel, a KV group or a query head, along which dimension and at which offset (fused projections stack
several segments in one tensor), and which config keys carry each width. Everything else (statistics, scoring,
plans, slimming, masking, compensation, parameter predictions) is written once against them.

Supported: Llama (incl. Llama 3.x configs: rope scaling, untied embeddings), Mistral, Qwen2, Qwen3, Gemma 3 (text),
Phi, Phi-3/Phi-4, OLMo 2, Granite and GPT-2. What differs between them, and how it is handled:

* Qwen3 and Gemma 3 normalise q and k per head (q_norm/k_norm of width head_dim, shared by every head): they stay
  whole, and a head cut is exact.
* OLMo 2 normalises q and k over the whole projection width (q_norm of heads * head_dim): the norm weights are cut
  with their heads (`head_norms`). The RMS is then taken over the kept heads only, so for OLMo 2 a head cut is
  *not* exactly the dense model with those heads silenced (MLP and layer cuts are).
* Phi-3 fuses q|k|v into `qkv_proj` rows and gate|up into `gate_up_proj` rows: couplings carry offsets.
* Gemma 3 and OLMo 2 normalise each block's attention and MLP output before adding it to the residual stream
  (`post_norms`): a linear depth replacement cannot be folded into down_proj there (plain layer dropping can).
* Granite multiplies every block contribution by `residual_multiplier`: depth statistics scale by it.
* GPT-2 derives head_dim from n_embd / n_head, so fewer heads is not the same network: its heads stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minigpt.config import ConfigError


@dataclass(frozen=True)
class Coupled:
    """One parameter tensor (or one segment of a fused tensor) inside a decoder block that a pruning unit spans."""

    name: str  # relative to the block, e.g. "mlp.down_proj.weight"
    dim: int  # the dimension along which units lie
    size: int  # indices per unit along `dim` (1 for an MLP channel, head_dim * heads for a KV group)
    output: bool  # True for the projection back into the residual stream (zeroed when masking)
    offset: int = 0  # where this segment starts along `dim` (Phi-3: the k rows of qkv_proj start after the q rows)


@dataclass(frozen=True)
class Arch:
    model_type: str
    block: str  # class name of a decoder block (hooks find the adapter from a block alone)
    layers: str  # attribute path from the model to the block list
    mlp_in: tuple[str, ...]  # modules (relative to a block) whose outputs are MLP channels
    mlp_out: str  # module whose inputs are MLP channels
    attn_out: str  # module whose inputs are the heads' outputs
    # q/k/v projections: three modules, or one fused module whose rows are q | k | v; None: heads not prunable
    qkv: tuple[str, ...] | None
    mlp_stack: int = 1  # segments of channel rows stacked in each mlp_in module (Phi-3's gate_up_proj: gate | up)
    head_norms: tuple[str, str] | None = None  # q/k norms over the whole projection width, cut with their heads
    post_norms: tuple[str, str] | None = None  # norms on the (attention, MLP) output before the residual
    residual_scale: str | None = None  # config key of a multiplier on every block contribution
    conv1d: bool = False  # GPT-2 Conv1D stores weights as [in, out]
    keys: tuple[tuple[str, str], ...] = ()  # config key overrides: role -> key


def _llama_like(model_type: str, block: str, **kw) -> Arch:
    base = dict(layers="model.layers", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
                attn_out="self_attn.o_proj", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    return Arch(model_type, block, **{**base, **kw})


_POST = ("post_attention_layernorm", "post_feedforward_layernorm")
ARCHS: dict[str, Arch] = {a.model_type: a for a in (
    _llama_like("llama", "LlamaDecoderLayer"),
    _llama_like("mistral", "MistralDecoderLayer"),
    _llama_like("qwen2", "Qwen2DecoderLayer"),
    _llama_like("qwen3", "Qwen3DecoderLayer"),  # q_norm/k_norm per head_dim: untouched
    _llama_like("gemma3_text", "Gemma3DecoderLayer", post_norms=_POST),  # per-head q/k norms, scaled embeddings
    _llama_like("phi3", "Phi3DecoderLayer", mlp_in=("mlp.gate_up_proj",), mlp_stack=2, qkv=("self_attn.qkv_proj",)),
    _llama_like("olmo2", "Olmo2DecoderLayer", post_norms=_POST, head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    _llama_like("granite", "GraniteDecoderLayer", residual_scale="residual_multiplier"),
    Arch("phi", "PhiDecoderLayer", layers="model.layers", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2",
         attn_out="self_attn.dense", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Arch("gpt2", "GPT2Block", layers="transformer.h", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
         attn_out="attn.c_proj", qkv=None, conv1d=True,
         keys=(("layers", "n_layer"), ("intermediate", "n_inner"), ("heads", "n_head"))),
)}
SUPPORTED_MODEL_TYPES = tuple(ARCHS)
_DEFAULT_KEYS = {"layers": "num_hidden_layers", "intermediate": "intermediate_size", "heads": "num_attention_heads",
                 "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab": "vocab_size"}
_BY_BLOCK = {a.block: a for a in ARCHS.values()}


def unsupported(model_type: str) -> ConfigError:
    hint = ""
    if model_type == "gemma3":  # the multimodal checkpoints (4B and up) wrap the text model with a vision tower
        hint = " (a multimodal Gemma 3 checkpoint: minigpt prunes text-only ones, model_type gemma3_text)"
    return ConfigError(f"unsupported architecture {model_type!r}{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


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
    arch = _BY_BLOCK.get(type(layer).__name__)
    if arch is None:
        raise unsupported(type(layer).__name__)
    return arch


def mlp_parts(layer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(input projections whose outputs are MLP channels, output projection whose inputs are)."""
    arch = _block_arch(layer)
    return [_get(layer, n) for n in arch.mlp_in], _get(layer, arch.mlp_out)


def attn_output(layer: nn.Module) -> nn.Module:
    """The projection whose input is the concatenation of the attention heads' outputs."""
    return _get(layer, _block_arch(layer).attn_out)


def mlp_output(layer: nn.Module) -> nn.Module:
    """The module whose output is the block's MLP contribution to the residual stream: down_proj for Llama, the
    post-MLP norm for Gemma 3 / OLMo 2 (times residual_scale for Granite)."""
    arch = _block_arch(layer)
    return _get(layer, arch.post_norms[1] if arch.post_norms else arch.mlp_out)


def residual_scale(model_or_config) -> float:
    """The factor every block contribution is multiplied by before it joins the residual stream (1 but Granite)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    key = arch_of(cfg).residual_scale
    return float(getattr(cfg, key)) if key else 1.0


def depth_replaceable(model_or_config) -> bool:
    """Depth with replacement folds a linear map into the MLP output projection of the block before a cut span;
    that is only the block's contribution when nothing non-linear follows the projection."""
    return arch_of(model_or_config).post_norms is None


def check_replacement(model_or_config) -> None:
    """Raise, in one line, where depth with replacement cannot be built (see depth_replaceable)."""
    arch = arch_of(model_or_config)
    if not depth_replaceable(model_or_config):
        raise ConfigError(f"prune.method depth with prune.reconstruct: {arch.model_type} normalises each block's MLP "
                          "output before the residual, so a linear replacement cannot be folded into its "
                          "down_proj; set prune.reconstruct false (plain layer dropping)")


def check_stream_refit(model_or_config) -> None:
    """Raise, in one line, where the stream refit (prune.refit_target stream) cannot work: it moves the MLP output
    projection so the residual stream matches the dense model's, which needs that output to join the stream
    linearly (see depth_replaceable)."""
    arch = arch_of(model_or_config)
    if not depth_replaceable(model_or_config):
        raise ConfigError(f"prune.refit_target stream: {arch.model_type} normalises each block's MLP output before "
                          "the residual, so the stream cannot be matched by refitting down_proj; use "
                          "prune.refit_target layer")


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


def _with_bias(names: set[str], module: str, dim: int, size: int, offset: int = 0) -> list[Coupled]:
    """The module's weight rows (or columns) of a unit, and the same entries of its bias where it has one."""
    parts = [Coupled(f"{module}.weight", dim, size, False, offset)]
    if f"{module}.bias" in names:
        parts.append(Coupled(f"{module}.bias", 0, size, False, offset))
    return parts


def mlp_coupling(model: nn.Module) -> list[Coupled]:
    """Where an MLP channel lives in a block: its input rows (+ biases; each stacked segment of a fused gate|up) and
    its output column."""
    arch = arch_of(model)
    names = _param_names(decoder_layers(model)[0])
    inter = widths(model)["intermediate"]
    out_dim, in_dim = (1, 0) if arch.conv1d else (0, 1)
    parts = []
    for m in arch.mlp_in:
        for s in range(arch.mlp_stack):
            parts += _with_bias(names, m, out_dim, 1, s * inter)
    parts.append(Coupled(f"{arch.mlp_out}.weight", in_dim, 1, True))
    return parts


def _heads_not_prunable(arch: Arch) -> ConfigError:
    return ConfigError(f"attention heads of {arch.model_type!r} cannot be pruned into a stock checkpoint (its head "
                       "size is derived from hidden_size / heads); prune MLP channels, layers or vocabulary")


def kv_coupling(model: nn.Module) -> list[Coupled]:
    """Where a KV group lives: its key and value rows, its query heads' rows and their output-projection columns
    (and, for OLMo 2, their entries of the q/k norms)."""
    arch = arch_of(model)
    if arch.qkv is None:
        raise _heads_not_prunable(arch)
    w = widths(model)
    names = _param_names(decoder_layers(model)[0])
    hd, H, G = w["head_dim"], w["heads"], w["kv_heads"]
    q_size = H // G * hd
    if len(arch.qkv) == 1:  # fused rows: q (H * hd) | k (G * hd) | v (G * hd)
        segments = [(arch.qkv[0], q_size, 0), (arch.qkv[0], hd, H * hd), (arch.qkv[0], hd, (H + G) * hd)]
    else:
        segments = [(arch.qkv[0], q_size, 0), (arch.qkv[1], hd, 0), (arch.qkv[2], hd, 0)]
    parts = [p for m, size, offset in segments for p in _with_bias(names, m, 0, size, offset)]
    if arch.head_norms:
        parts += [Coupled(f"{arch.head_norms[0]}.weight", 0, q_size, False),
                  Coupled(f"{arch.head_norms[1]}.weight", 0, hd, False)]
    parts.append(Coupled(f"{arch.attn_out}.weight", 1, q_size, True))
    return parts


def q_coupling(model: nn.Module) -> list[Coupled]:
    """Where one query head lives: its query rows (+ bias, + its q-norm entries for OLMo 2) and its output-projection
    columns (head_dim each). Removing the same number of query heads from every KV group keeps a grouped-query model
    valid."""
    arch = arch_of(model)
    if arch.qkv is None:
        raise _heads_not_prunable(arch)
    head_dim = widths(model)["head_dim"]
    parts = _with_bias(_param_names(decoder_layers(model)[0]), arch.qkv[0], 0, head_dim)  # q rows come first
    if arch.head_norms:
        parts.append(Coupled(f"{arch.head_norms[0]}.weight", 0, head_dim, False))
    parts.append(Coupled(f"{arch.attn_out}.weight", 1, head_dim, True))
    return parts


def unit_index(c: Coupled, units) -> torch.Tensor:
    """Indices along `c.dim` covered by the given unit numbers (sorted as given)."""
    units = torch.as_tensor(list(units), dtype=torch.long)
    return (c.offset + units[:, None] * c.size + torch.arange(c.size)[None, :]).reshape(-1)


def per_unit(c: Coupled, per_index: torch.Tensor, units: int) -> torch.Tensor:
    """[units, c.size] view of a per-index vector along `c.dim` (the coupling's segment of a fused tensor)."""
    return per_index.narrow(0, c.offset, units * c.size).reshape(units, c.size)


def params_per_unit(model: nn.Module, coupling: list[Coupled]) -> int:
    """Parameters removed with one unit (one MLP channel or one KV group) in one block."""
    params = dict(decoder_layers(model)[0].named_parameters())
    return sum(params[c.name].numel() // params[c.name].shape[c.dim] * c.size for c in coupling)


def layer_params(model: nn.Module) -> int:
    """Parameters of one decoder block (every block of a supported model has the same)."""
    return sum(p.numel() for p in decoder_layers(model)[0].parameters())


__all__ = ["ARCHS", "Arch", "Coupled", "SUPPORTED_MODEL_TYPES", "arch_of", "attn_output", "check_replacement",
           "check_stream_refit", "config_key", "decoder_layers", "depth_replaceable", "kv_coupling", "kv_prunable",
           "layer_params", "mlp_coupling", "mlp_output", "mlp_parts", "params_per_unit", "per_unit", "q_coupling",
           "residual_scale", "unit_index", "unsupported", "widths"]
