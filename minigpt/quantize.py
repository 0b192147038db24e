"""int8 weight quantization of a finished expert, with torchao through transformers' TorchAoConfig.

The scheme is torchao's Int8WeightOnlyConfig: every nn.Linear weight becomes int8 with one float scale per output
channel, activations stay in the model's float dtype, so it runs on CPU and GPU alike with no calibration data.
The input embedding / tied lm_head stays float unless QuantizeConfig.embeddings (SmolLM2 ties them; a quantized
tied table would be un-tied and stored twice).

The quantized expert is a normal HF folder: safetensors weights holding torchao tensor subclasses, and a config.json
whose `quantization_config` names torchao, so it reloads with plain
``AutoModelForCausalLM.from_pretrained(folder)`` wherever torchao is installed (no quantization_config argument
needed). `compare` measures what the report shows: weight bytes on disk, forward latency and perplexity of the
quantized expert against the float one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minigpt.config import ConfigError
from minigpt.optconfig import QuantizeConfig
from minigpt.evaluate import WEIGHT_SUFFIXES, lm_metrics, speed_metrics
from minigpt.models import load_tokenizer
from minigpt.slim import save_expert

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torchao_config(cfg: QuantizeConfig):
    """The transformers quantization config for `cfg` (ConfigError if torchao is missing)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as e:  # pragma: no cover - torchao is a declared dependency
        raise ConfigError("quantize needs the torchao package (pip install torchao)") from e
    from transformers import TorchAoConfig

    if cfg.scheme != "int8-weight":
        raise ConfigError(f"quantize.scheme {cfg.scheme!r} is not supported")
    return TorchAoConfig(quant_type=Int8WeightOnlyConfig(), include_input_output_embeddings=cfg.embeddings,
                         untie_embedding_weights=cfg.embeddings)


def load_quantized(model_dir: Path | str, cfg: QuantizeConfig | None = None, dtype: str = "float32",
                   device: str = "cpu") -> nn.Module:
    """A float expert quantized while loading (`cfg` given), or a saved quantized expert reloaded (`cfg` None)."""
    from transformers import AutoModelForCausalLM

    kw = {"quantization_config": torchao_config(cfg)} if cfg is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[dtype], device_map=device, **kw)
    return model.eval()


def quantize_expert(src_dir: Path | str, out_dir: Path | str, cfg: QuantizeConfig = QuantizeConfig(),
                    dtype: str = "float32") -> Path:
    """Quantize the HF expert in `src_dir` and save it (with its tokenizer) to `out_dir` atomically."""
    model = load_quantized(src_dir, cfg, dtype=dtype)
    return save_expert(model, load_tokenizer(src_dir), Path(out_dir))


def is_quantized(model: nn.Module) -> bool:
    """True when some Linear weight is a torchao quantized tensor (not a plain float tensor)."""
    return any(isinstance(m, nn.Linear) and type(m.weight).__name__ not in ("Parameter", "Tensor")
               for m in model.modules())


def weight_bytes(model_dir: Path | str) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def compare(float_dir: Path | str, quant_dir: Path | str, texts: Sequence[str], *, block_size: int,
            batch_size: int = 4, max_blocks: int = 8, speed: tuple[int, int, int] = (1, 128, 5),
            dtype: str = "float32") -> dict:
    """Size on disk, forward latency and perplexity of the quantized expert next to the float one, on `texts`
    (pass held-out documents). Both models run in this process with the current torch thread count."""
    out = {}
    for label, folder in (("float", float_dir), ("int8", quant_dir)):
        t0 = time.time()
        model = load_quantized(folder, None, dtype=dtype)  # the int8 folder's config names its quantization
        load_s = time.time() - t0
        tok = load_tokenizer(folder)
        out[label] = {"dir": str(folder), "weight_bytes": weight_bytes(folder), "load_s": load_s,
                      "quantized": is_quantized(model), **{k: v for k, v in speed_metrics(model, *speed).items()
                                                           if k in ("latency_ms", "latency_ms_min", "tokens_per_s")},
                      **lm_metrics(model, tok, texts, block_size, batch_size, max_blocks=max_blocks)}
        del model
    f, q = out["float"], out["int8"]
    out["ratios"] = {"size": q["weight_bytes"] / f["weight_bytes"], "latency": q["latency_ms"] / f["latency_ms"],
                     "ppl": q["ppl"] / f["ppl"]}
    return out


__all__ = ["compare", "is_quantized", "load_quantized", "quantize_expert", "torchao_config", "weight_bytes"]
