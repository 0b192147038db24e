"""Turn a GGUF file into a plain safetensors folder one tensor at a time, so a model of any size can be prepared.

transformers can load a GGUF (`from_pretrained(..., gguf_file=...)`), but it dequantizes every tensor into one
state dict before the model is built: a 7B file becomes ~28 GB of fp32 in memory before anything is written. This
module walks the file's tensors instead and, for each, dequantizes it, applies transformers' own fix-ups for the
architecture, hands the fp32 result to a ShardedWriter (which puts it on disk at once) and drops it. Peak memory is
the largest tensor (the embedding), never the model.

To give exactly what transformers' loader gives, nothing is re-derived here: the config comes from the metadata
by the two steps `AutoConfig.from_pretrained(gguf_file=...)` takes, the GGUF -> transformers names from
`get_gguf_hf_weights_map` over the model built on the meta device, and the per-architecture value fixes (llama's
q/k reverse permutation, gemma's norm offset, ...) from transformers' `TENSOR_PROCESSORS`. The tokenizer is
transformers' GGUF tokenizer conversion, saved as is. The values are gguf's dequantization, as in transformers'
loader, so the folder loads with the loader's logits bit for bit (tests/test_gguf_convert.py).
"""

from __future__ import annotations

import copy
import functools
import re
import time
from collections.abc import Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minigpt.config import ConfigError
from minigpt.shardwriter import DEFAULT_MAX_SHARD_BYTES, INDEX, SINGLE, ShardedWriter

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Rows dequantized per step: ~1M values (4 MB fp32). gguf's own dequantize keeps every row group's output alive
# until one final concatenate (twice the tensor); a chunk at a time into one preallocated array keeps it to once.
# Blocks never span rows, so the values are the same bits either way.
CHUNK_ELEMENTS = 1 << 20
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote: counts, and the largest tensor it held (fp32 bytes; gguf's temporaries for one row
    chunk come on top of it)."""

    folder: Path
    tensors: int  # safetensors tensors written
    total_bytes: int
    largest_bytes: int
    shards: int
    seconds: float


def is_prepared(folder: Path) -> bool:
    """A finished conversion (or save_pretrained) folder: config plus a single weight file or a sharded index."""
    return (folder / "config.json").is_file() and ((folder / SINGLE).is_file() or (folder / INDEX).is_file())


def read_config(gguf: Path | str) -> PretrainedConfig:
    """The transformers config of a GGUF, from its metadata alone, as `from_pretrained(gguf_file=...)` builds it;
    a missing, unreadable or unsupported file is a one-line ConfigError."""
    return _read_config(Path(gguf))[0]


def _read_config(gguf: Path) -> tuple[PretrainedConfig, dict[str, Any]]:
    """(config, the raw config dict transformers parsed from the metadata). AutoConfig.from_pretrained takes the same
    two steps (get_config_dict, then the model type's from_dict); taking them here keeps the raw dict, which
    transformers' tensor processors read, without a second pass over the file's metadata (the vocabulary makes that
    pass seconds long)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not gguf.is_file():
        raise ConfigError(f"GGUF file {gguf} does not exist")
    try:
        raw, unused = PretrainedConfig.get_config_dict(str(gguf.parent), gguf_file=gguf.name)
        return CONFIG_MAPPING[raw["model_type"]].from_dict(copy.deepcopy(raw), **unused), raw
    except Exception as e:  # transformers says "not a GGUF", "architecture not supported", ... in many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read GGUF file {gguf}: {reason}") from None


def convert_gguf(gguf: Path | str, out_dir: Path | str, label: str = "", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress_every: int | None = None) -> Converted:
    """Write `gguf` as a safetensors folder (config, generation config, tokenizer, weights) into `out_dir`, which
    must not hold weights yet (callers wrap it in atomic_dir). Progress lines `[models] preparing <label>: i/n
    tensors` go to stdout every `progress_every` tensors (default: about ten lines per model)."""
    gguf, out_dir = Path(gguf), Path(out_dir)
    start = time.perf_counter()
    config, raw = _read_config(gguf)
    model = _meta_model(config)
    written = _write_weights(gguf, _tensors(gguf, raw, model), out_dir, label or gguf.name, max_shard_bytes,
                             progress_every)
    _write_config(model, out_dir)
    _write_tokenizer(gguf, out_dir)
    return Converted(out_dir, *written, seconds=time.perf_counter() - start)


# -- the pieces -------------------------------------------------------------------------------------------------------

def _meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model class transformers would load the GGUF into, with no weights: its state dict names the targets."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _legacy_plan(reader: Any, raw: dict[str, Any], model: torch.nn.Module) -> tuple[Any, dict[str, str]]:
    """transformers' tensor processor for the file's architecture and its GGUF -> transformers name map, made as its
    per-tensor loader (`load_gguf_checkpoint`, which from_pretrained uses for these architectures) makes them."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          read_field)

    arch = read_field(reader, "general.architecture")[0]
    # Architectures that newer transformers loads through its packed-block path use chains of weight converters
    # acting on several tensors at once (fused experts, value-head reorders); following those tensor by tensor is
    # not implemented here, and the per-tensor processors would give silently different weights.
    if arch in _packed_archs():
        raise ConfigError(f"GGUF architecture {arch!r} is loaded by transformers' packed GGUF path, which the "
                          "streamed converter does not follow")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=raw)
    with name_maps_cached():
        return processor, get_gguf_hf_weights_map(model, processor)


def _packed_archs() -> Container[str]:
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:  # transformers before the packed path: every architecture goes through the processors
        return ()
    return GGUF_ARCHS


@contextmanager
def name_maps_cached() -> Iterator[None]:
    """get_gguf_hf_weights_map recurses into every submodule and rebuilds gguf's (read-only) name table at each
    one: ~400 rebuilds, over 10 s for SmolLM2's 30 layers here. It looks `gguf.get_tensor_name_map` up at call
    time, so a cached one in its place for the call gives the same map at once; were that lookup ever moved, it
    is only slower."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """One GGUF tensor as fp32 numpy, dequantized a few rows at a time into one array (see CHUNK_ELEMENTS)."""
    from gguf import GGMLQuantizationType, dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or data.ndim < 2:
        return dequantize(data, qtype)  # a view (F32) or one astype (F16): nothing to chunk
    rows = data.reshape(-1, data.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    out: np.ndarray | None = None
    for begin in range(0, rows.shape[0], step):
        part = dequantize(rows[begin:begin + step], qtype)
        if out is None:
            out = np.empty((rows.shape[0], part.shape[-1]), dtype=np.float32)
        out[begin:begin + len(part)] = part
    return out.reshape(*data.shape[:-1], out.shape[-1])


def _as_torch(weights: np.ndarray) -> torch.Tensor:
    # from_numpy shares memory; a read-only memmap view (an F32 tensor in the file) or a transposed view is copied.
    return torch.from_numpy(np.require(weights, dtype=np.float32, requirements=["C", "W"]))


def _tensors(gguf: Path, raw: dict[str, Any], model: torch.nn.Module
             ) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(done, count, {transformers name: fp32 tensor}) for each GGUF tensor in file order, named and fixed as
    transformers' loader does; an unmapped tensor (rope_freqs, ...) gives nothing to write, as the loader drops it.
    The file is opened and the plan made here, before the first tensor is asked for."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
    except Exception as e:
        raise ConfigError(f"cannot read the tensors of GGUF file {gguf}: {e}") from None
    processor, names = _legacy_plan(reader, raw, model)
    return _each_tensor(reader.tensors, processor, names)


def _each_tensor(tensors: list[Any], processor: Any, names: dict[str, str]
                 ) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    # Some processors (MoE experts, gpt2's lm_head) put tensors straight into this dict instead of returning them;
    # llama.cpp writes a block's tensors together, so they are flushed when the block changes.
    stash: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
    block = None
    count = len(tensors)
    for i, t in enumerate(tensors):
        m = _BLOCK.match(t.name)
        if (m.group(1) if m else None) != block and stash["tensors"]:
            yield i, count, _pop_all(stash["tensors"])
        block = m.group(1) if m else None
        result = processor.process(weights=_dequantize(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping=names, parsed_parameters=stash)
        out = {names[result.name]: _as_torch(result.weights)} if result.name in names else {}
        yield i + 1, count, out
        del result, out  # the only reference: the tensor is on disk now
    if stash["tensors"]:
        yield count, count, _pop_all(stash["tensors"])


def _pop_all(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.float().contiguous() for k, v in d.items()}
    d.clear()
    return out


def _write_weights(gguf: Path, tensors: Iterator[tuple[int, int, dict[str, torch.Tensor]]], out_dir: Path,
                   label: str, max_shard_bytes: int, progress_every: int | None) -> tuple[int, int, int, int]:
    """(tensors, bytes, largest tensor's bytes, shards) written through a ShardedWriter, each tensor dropped once
    written."""
    largest = 0
    last_print = 0
    with ShardedWriter(out_dir, max_shard_bytes) as writer:
        for done, count, step in tensors:
            largest = max(largest, sum(t.numel() * t.element_size() for t in step.values()))
            writer.add_state(step)
            del step  # else the previous tensor stays alive while the next one is dequantized
            every = progress_every or max(1, count // 10)
            if done - last_print >= every or (done == count and last_print != count):
                print(f"[models] preparing {label}: {done}/{count} tensors", flush=True)
                last_print = done
        if not writer.weight_map:  # leaving the block by an exception removes what was started
            raise ConfigError(f"GGUF file {gguf} holds no tensor transformers maps to a model weight")
        shards = writer.close()
    return len(writer.weight_map), writer.total_bytes, largest, len(shards)


def _write_config(model: torch.nn.Module, out_dir: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them for this model in fp32. The config
    read from GGUF metadata never carries a quantization_config (from_pretrained adds one only while loading)."""
    config = model.config
    config.dtype = "float32"
    config.architectures = [type(model).__name__]
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def _write_tokenizer(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out_dir)


__all__ = ["CHUNK_ELEMENTS", "Converted", "convert_gguf", "is_prepared", "name_maps_cached", "read_config"]
