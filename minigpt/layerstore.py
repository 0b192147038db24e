"""Read a checkpoint folder's weights lazily, one decoder layer at a time.

A model bigger than a worker's memory can still be calibrated, pruned and slimmed if no process ever holds more
than the embedding, the head and one decoder layer. `LayerStore` is the reading side of that: it indexes the
tensors of a save_pretrained folder (a single `model.safetensors`, or shards named by
`model.safetensors.index.json`) from their headers alone, and reads the tensors of one layer (or of the embedding,
or of the head) when asked.

Each read opens the file, copies the tensors out and closes it again. safetensors hands out views on a mapping of
the whole file; a handle kept open leaves every page ever read resident (and counted in the process's RSS, measured:
the whole 538 MB of SmolLM2-135M after one pass), and a parameter that is a view on a private file mapping would
also break if the file were rewritten. Copies are owned, ordinary tensors; the mapping goes with the handle.

Which tensors belong to which part is read from the model's skeleton on the meta device (minigpt.models.skeleton):
names under the architecture's layer list (minigpt.archs) are layer tensors; embedding modules (token and position
embeddings) outside it are the embedding; everything else (final norm, lm_head) is the head.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from minigpt.archs import arch_of, widths
from minigpt.models import skeleton
from minigpt.shardwriter import INDEX, SINGLE  # the writer names the files; this module reads them

# safetensors header dtype names -> bytes per element (the sizes are read from headers, no tensor is loaded).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and how big it is, from its file's header."""

    file: str  # file name inside the folder
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES[self.dtype]


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header (name -> dtype, shape, offsets): its first 8 + n bytes, nothing more."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def checkpoint_files(folder: Path | str) -> list[str]:
    """The weight files of a save_pretrained folder, from its index when sharded."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (folder / SINGLE).is_file():
        return [SINGLE]
    raise FileNotFoundError(f"{folder} holds neither {SINGLE} nor {INDEX}")


class LayerStore:
    """Lazy, per-layer access to the weights of a checkpoint folder (see the module docstring).

    `dtype` converts every tensor read (None: as stored). Names returned by `layer_state` are relative to the layer
    (`self_attn.q_proj.weight`), those of `embed_state` / `head_state` / `tensor` are the checkpoint's own."""

    def __init__(self, folder: Path | str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.config = AutoConfig.from_pretrained(str(self.folder), trust_remote_code=trust_remote_code)
        self.arch = arch_of(self.config)
        self.num_layers: int = widths(self.config)["layers"]
        self.index: dict[str, TensorInfo] = {}
        for name in checkpoint_files(self.folder):
            for key, h in read_header(self.folder / name).items():
                self.index[key] = TensorInfo(name, h["dtype"], tuple(h["shape"]))
        self._layer_names = self._split_layers()

    # -- what is where ---------------------------------------------------------------------------------------------

    def layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers}.{i}."

    def _split_layers(self) -> list[list[str]]:
        per_layer: list[list[str]] = [[] for _ in range(self.num_layers)]
        root = self.arch.layers + "."
        for key in self.index:
            if key.startswith(root):
                i = int(key[len(root):].split(".", 1)[0])
                if i >= self.num_layers:
                    raise ValueError(f"{self.folder}: tensor {key} lies beyond the config's {self.num_layers} layers")
                per_layer[i].append(key)
        return per_layer

    @cached_property
    def embed_names(self) -> list[str]:
        """Checkpoint names of the embedding modules outside the layers (token and, for GPT-2, position)."""
        skel = self.skeleton()
        root = self.arch.layers + "."
        names = {f"{m}.{p}" for m, mod in skel.named_modules() if isinstance(mod, nn.Embedding) and
                 not m.startswith(root) for p, _ in mod.named_parameters(recurse=False)}
        return sorted(n for n in self.index if n in names)

    @cached_property
    def head_names(self) -> list[str]:
        """Checkpoint names of everything else outside the layers: final norm, lm_head (absent when tied)."""
        inside = {n for names in self._layer_names for n in names} | set(self.embed_names)
        return sorted(n for n in self.index if n not in inside)

    def layer_names(self, i: int) -> list[str]:
        """Checkpoint names of layer `i`'s tensors."""
        return list(self._layer_names[i])

    def skeleton(self) -> nn.Module:
        """The model's modules on the meta device (no weights; minigpt.models.skeleton)."""
        return skeleton(self.config, self.trust_remote_code)

    # -- sizes (headers only) --------------------------------------------------------------------------------------

    def nbytes(self, names: Iterable[str]) -> int:
        return sum(self.index[n].nbytes for n in names)

    def layer_bytes(self, i: int) -> int:
        return self.nbytes(self._layer_names[i])

    def embed_bytes(self) -> int:
        return self.nbytes(self.embed_names)

    def head_bytes(self) -> int:
        return self.nbytes(self.head_names)

    def total_bytes(self) -> int:
        return self.nbytes(self.index)

    # -- reading ---------------------------------------------------------------------------------------------------

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (owned copies, converted to `dtype`), each file opened once and closed after."""
        names = list(names)
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.index:
                raise KeyError(f"{self.folder}: no tensor {n!r}")
            by_file.setdefault(self.index[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                for k in keys:
                    out[k] = self._owned(f.get_tensor(k))
        return {n: out[n] for n in names}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (an owned copy in `dtype`): a vocabulary block without the rest."""
        if name not in self.index:
            raise KeyError(f"{self.folder}: no tensor {name!r}")
        with safe_open(str(self.folder / self.index[name].file), framework="pt") as f:
            return self._owned(f.get_slice(name)[start:stop])

    def _owned(self, t: torch.Tensor) -> torch.Tensor:
        # A view on the file mapping would keep the pages resident (see the module docstring): always copy.
        if self.dtype is not None and t.dtype != self.dtype and t.is_floating_point():
            return t.to(self.dtype)  # a conversion is a copy already
        return t.clone()

    def tensor(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer `i`'s tensors, named relative to the layer (what `layer.load_state_dict` takes)."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} of a {self.num_layers}-layer model")
        cut = len(self.layer_prefix(i))
        return {k[cut:]: v for k, v in self.read(self._layer_names[i]).items()}

    def embed_state(self) -> dict[str, torch.Tensor]:
        return self.read(self.embed_names)

    def head_state(self) -> dict[str, torch.Tensor]:
        """Final norm and lm_head (no lm_head entry when the checkpoint ties it to the embedding)."""
        return self.read(self.head_names)

    def layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(index, layer_state) for every layer in order, one resident at a time if the caller drops each."""
        for i in range(self.num_layers):
            yield i, self.layer_state(i)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))

    def __repr__(self) -> str:
        return (f"LayerStore({str(self.folder)!r}, {self.arch.model_type}, {self.num_layers} layers, "
                f"{self.total_bytes() / 2**20:.1f} MiB)")


__all__ = ["INDEX", "SINGLE", "LayerStore", "TensorInfo", "checkpoint_files"]
