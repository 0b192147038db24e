"""Load and save what recovery trains without ever holding the whole model in one process.

A ZeRO-3 worker holds 1 / world of the expert's parameters; gathering them all onto rank 0 to save them (and then
building a second plain model there to merge LoRA into) would put two whole models in one process, the very thing
`recover.workers_per_domain` is there to avoid on a model bigger than a worker. So saving goes one piece at a time:

* `write_engine_weights` (every rank calls it): the engine module's parameters are gathered one decoder layer at a
  time (then the embedding, norm and head), and rank 0 writes each piece through a ShardedWriter as it arrives, under
  the engine's own names (peft's, in LoRA mode). The best-validated weights and the last ones are saved this way.
* `write_expert` (rank 0): reads such a folder one layer at a time, merges each LoRA pair into its base weight
  (W + B A x alpha / r, what peft's merge_and_unload computes), renames to the plain model's names and writes a
  stock `from_pretrained` folder (sharded safetensors, config, generation config, tokenizer, manifest) atomically.

Loading is the same in reverse (`fill_partitioned`): the student is built under `deepspeed.zero.Init` (every
parameter partitioned as it is created) and filled one decoder layer at a time, rank 0 reading the layer's tensors
from the checkpoint (minigpt.layerstore: owned copies, the file closed after) and the gather scattering them into
every rank's partitions on the way out. transformers' own ZeRO-3 loading maps every checkpoint file on rank 0 for
the whole load, so its pages (the whole model) count in that rank's memory.

A student whose embedding and head are held as row blocks (minigpt.vocabsplit, under ZeRO-3) keeps the stock
checkpoint names: each block is filled from its rows of the stock tensor, and saved back into it row block by row
block (ShardedWriter.begin_rows); a tensor with nothing to merge is copied into the expert in pieces of rows.

Memory on rank 0: one decoder layer or one vocabulary block at a time, whatever the model's size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from minigpt.io import atomic_dir, atomic_write_json
from minigpt.layerstore import LayerStore, checkpoint_files, read_header
from minigpt.shardwriter import DTYPE_NAMES as _DTYPE_NAMES, ShardedWriter
from minigpt.vocabsplit import BLOCK_PARAMS, row_blocks

PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's names
LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.[^.]+\.weight$")


def layer_groups(names: Iterable[str], layers_root: str) -> list[list[str]]:
    """`names` split into one group per decoder layer (in layer order), then one group per module outside them (the
    embedding, the final norm, the head: each as big as a layer or bigger on a large vocabulary), whatever prefix
    (peft's) stands before `layers_root` ("model.layers"). A LoRA pair stays with the weight it adapts."""
    pattern = re.compile(rf"(?:^|\.){re.escape(layers_root)}\.(\d+)\.")
    layers: dict[int, list[str]] = {}
    rest: dict[str, list[str]] = {}
    for n in names:
        m = pattern.search(n)
        if m:
            layers.setdefault(int(m.group(1)), []).append(n)
        else:
            lora = LORA.match(n)
            module = expert_name(lora.group("module")) if lora else expert_name(n).rsplit(".", 1)[0]
            rest.setdefault(module, []).append(n)
    return [layers[i] for i in sorted(layers)] + list(rest.values())


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict carries (not the non-persistent ones: rotary tables rebuilt at load)."""
    out = {}
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b
    return out


def write_engine_weights(module: nn.Module, layers_root: str, stage: int, rank: int, out_dir: Path | str) -> None:
    """Rank 0 writes `module`'s parameters (each tied one once) and persistent buffers, as fp32, into safetensors
    shards in `out_dir`, one decoder layer gathered from the ZeRO-3 partitions at a time. Every rank must call it
    (the gathers are collective); an exception leaves no weights written."""
    import deepspeed

    params = dict(module.named_parameters())
    buffers = persistent_buffers(module)
    blocks = row_blocks(module)
    writer = ShardedWriter(out_dir) if rank == 0 else None
    try:
        for names in layer_groups([*params, *buffers], layers_root):
            gathered = [params[n] for n in names if n in params]
            with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=stage == 3):
                if writer is not None:
                    for n in names:
                        t = params[n] if n in params else buffers[n]
                        t = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
                        if n not in blocks:
                            writer.add(n, t)
                            continue
                        # A vocabulary block: the rows of one stock tensor, whose blocks arrive in order.
                        b = blocks[n]
                        if b.start == 0:
                            writer.begin_rows(b.tensor, t.dtype, (b.rows, *t.shape[1:]))
                        writer.add_rows(t)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def fill_partitioned(model: nn.Module, student_dir: Path | str, layers_root: str, rank: int) -> None:
    """Copy the checkpoint in `student_dir` into `model`, built under zero.Init, one decoder layer at a time (every
    rank calls: the gathers are collective). Persistent buffers, which ZeRO-3 does not partition, every rank reads."""
    import deepspeed

    store = LayerStore(student_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    blocks = row_blocks(model)
    missing = sorted(n for n in params if (blocks[n].tensor if n in blocks else n) not in store.index)
    if missing:
        raise ValueError(f"{student_dir} has no tensor for {missing[:3]} of the model its config builds")
    for names in layer_groups(params, layers_root):
        with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    whole = [n for n in names if n not in blocks]
                    for n, value in store.read(whole).items():
                        params[n].copy_(value)
                    for n in names:
                        if n in blocks:
                            b = blocks[n]
                            params[n].copy_(store.read_rows(b.tensor, b.start, b.stop))
    buffers = {n: b for n, b in persistent_buffers(model).items() if n in store.index}
    with torch.no_grad():
        for n, value in store.read(buffers).items():
            buffers[n].copy_(value)


def expert_name(name: str) -> str:
    """The plain model's name of an engine (peft) parameter name."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merge_lora(state: dict[str, torch.Tensor], scaling: float | None) -> dict[str, torch.Tensor]:
    """One piece of the engine's weights under the plain model's names, each LoRA pair merged into the weight it
    adapts: W + (B @ A) x scaling (transposed for a weight stored input-major, GPT-2's Conv1D)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = LORA.match(name)
        if m:
            pairs.setdefault(expert_name(m.group("module")), {})[m.group("which")] = t
        elif ".lora_" in name:
            raise ValueError(f"{name}: a LoRA tensor minigpt cannot merge (only lora_A / lora_B pairs)")
        else:
            out[expert_name(name)] = t
    if pairs and scaling is None:
        raise ValueError("LoRA tensors found but no LoRA scaling given")
    for module, ab in pairs.items():
        weight = f"{module}.weight"
        if set(ab) != {"A", "B"} or weight not in out:
            raise ValueError(f"{module}: an incomplete LoRA pair or no base weight")
        delta = (ab["B"].double() @ ab["A"].double()) * scaling
        base = out[weight]
        if delta.shape != base.shape:
            delta = delta.T  # fan-in-fan-out weights (Conv1D) are stored [in, out]
        out[weight] = (base.double() + delta).to(base.dtype)
    return out


def _copy_rows(folder: Path, where: dict[str, str], names: list[str], writer: ShardedWriter,
               piece_bytes: int = 4 * BLOCK_PARAMS) -> None:
    """Tensors `names` of `folder` into `writer` under the plain model's names, in pieces of rows of at most about
    `piece_bytes`: a vocabulary-sized tensor never whole in memory."""
    for n in names:
        with safe_open(str(folder / where[n]), framework="pt") as f:
            sl = f.get_slice(n)
            shape, dtype = tuple(sl.get_shape()), _DTYPE_NAMES[sl.get_dtype()]
            writer.begin_rows(expert_name(n), dtype, shape)
            if not shape:
                writer.add_rows(f.get_tensor(n))
                continue
            row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
            step = max(1, piece_bytes // row_bytes)
            for a in range(0, shape[0], step):
                writer.add_rows(sl[a:a + step])


def write_expert(weights_dir: Path | str, student_dir: Path | str, layers_root: str, out_dir: Path | str,
                 lora_scaling: float | None, json_files: dict[str, Any]) -> None:
    """The plain expert from `write_engine_weights`' folder: LoRA merged, the student's config (fp32, as trained),
    generation config and tokenizer, and `json_files` (name -> content: the manifest), written one layer at a time
    into a temporary sibling renamed to `out_dir` (an unfinished or outdated expert is replaced as a whole)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    weights_dir = Path(weights_dir)
    where = {n: f for f in checkpoint_files(weights_dir) for n in read_header(weights_dir / f)}
    config = AutoConfig.from_pretrained(student_dir)
    config.dtype = "float32"
    with atomic_dir(out_dir) as tmp:
        with ShardedWriter(tmp) as writer:
            for names in layer_groups(where, layers_root):
                if not any(".lora_" in n for n in names):
                    _copy_rows(weights_dir, where, names, writer)  # nothing to merge: copied in row pieces
                    continue
                state: dict[str, torch.Tensor] = {}
                for file in sorted({where[n] for n in names}):
                    with safe_open(str(weights_dir / file), framework="pt") as f:
                        state.update({n: f.get_tensor(n).clone() for n in names if where[n] == file})
                writer.add_state(merge_lora(state, lora_scaling))
                del state
        config.save_pretrained(tmp)
        try:
            gen = GenerationConfig.from_pretrained(student_dir)
        except OSError:  # no generation_config.json: from_pretrained derives one from the config
            gen = GenerationConfig.from_model_config(config)
        gen.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp)
        for name, content in json_files.items():
            atomic_write_json(tmp / name, content)


__all__ = ["expert_name", "fill_partitioned", "layer_groups", "merge_lora", "persistent_buffers",
           "write_engine_weights", "write_expert"]
