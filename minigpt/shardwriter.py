"""Write a checkpoint one tensor (or one layer) at a time, into safetensors shards named as transformers names them.

Slimming a model that does not fit in memory means writing it while it is produced, layer by layer. A safetensors
file starts with a header that gives every tensor's offset, so it cannot be written front to back before its last
tensor is known; `ShardedWriter` writes each tensor's bytes to a shard's data file as it arrives (memory: one
tensor) and, when the shard is full, writes the header and copies the data behind it. Tensors are laid out by
decreasing element size, so every tensor starts at an offset aligned to its dtype (the format allows no gaps).

The number of shards is known only at the end, and a folder with some shards but no index must never pass for a
checkpoint: shards are written under temporary names, renamed to `model-0000k-of-0000n.safetensors` by `close()`,
and `model.safetensors.index.json` is written last (one shard: `model.safetensors` and no index, as
save_pretrained does). An exception inside the `with` block removes the temporary files and writes nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpt.io import atomic_write_text

SINGLE = "model.safetensors"  # one shard: save_pretrained's name, and no index
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # save_pretrained's default ("5GB") in bytes, near enough

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}  # safetensors' dtype name -> torch's


def shard_name(k: int, n: int) -> str:
    """transformers' (huggingface_hub's) name of shard k (1-based) of n."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offset in the shard's data file (arrival order)
    nbytes: int


@dataclass
class _Shard:
    number: int
    data: Path  # bytes in arrival order
    entries: dict[str, _Entry] = field(default_factory=dict)
    nbytes: int = 0


class ShardedWriter:
    """`add(name, tensor)` / `add_state(dict, prefix)` in any order, then `close()` (or leave the `with` block).

    A shard is closed when the next tensor would take it past `max_shard_bytes` (a bigger tensor gets a shard of
    its own, as in save_pretrained). `out_dir` may exist but must not already hold weights."""

    def __init__(self, out_dir: Path | str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = [p.name for p in self.out_dir.glob("model*.safetensors*")]
        if stale:
            raise FileExistsError(f"{self.out_dir} already holds weights ({', '.join(sorted(stale)[:3])})")
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}  # "pt": what transformers expects of the files
        self.shards: list[Path] = []  # finished shards, under temporary names
        self.weight_map: dict[str, int] = {}  # tensor -> shard number
        self.total_bytes = 0
        self.total_params = 0
        self._current: _Shard | None = None
        self._data_file = None
        self._rows: tuple[str, torch.dtype, tuple[int, ...], int] | None = None  # a tensor arriving in rows
        self.closed = False

    # -- adding ------------------------------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self.begin_rows(name, t.dtype, tuple(t.shape))
        if self._rows is not None:
            self.add_rows(t)

    def begin_rows(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Start tensor `name`, whose rows (first dimension) then arrive in order through `add_rows` until all
        `shape[0]` are written: a tensor as big as a vocabulary is written without ever being whole in memory. No
        other tensor may start before it is complete."""
        if self.closed:
            raise RuntimeError("the writer is closed")
        if self._rows is not None:
            raise RuntimeError(f"tensor {self._rows[0]!r} is not complete")
        if name in self.weight_map:
            raise ValueError(f"tensor {name!r} written twice")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name")
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        shard = self._current
        if shard is not None and shard.entries and shard.nbytes + nbytes > self.max_shard_bytes:
            self._finish_shard()
            shard = None
        if shard is None:
            shard = self._open_shard()
        shard.entries[name] = _Entry(dtype, tuple(shape), shard.nbytes, nbytes)
        shard.nbytes += nbytes
        self.weight_map[name] = shard.number
        self.total_bytes += nbytes
        self.total_params += numel
        # An empty tensor is complete already.
        self._rows = (name, dtype, tuple(shape[1:]), shape[0] if shape else 1) if nbytes else None

    def add_rows(self, rows: torch.Tensor) -> None:
        """The next rows of the tensor `begin_rows` started (for a 0-d tensor: the whole of it)."""
        if self._rows is None:
            raise RuntimeError("no tensor is being written")
        name, dtype, tail, left = self._rows
        t = rows.detach().to("cpu").contiguous()
        n = t.shape[0] if t.dim() else 1
        if t.dtype != dtype or (t.dim() and tuple(t.shape[1:]) != tail) or n > left:
            raise ValueError(f"{name}: {tuple(t.shape)} {t.dtype} rows do not continue a {dtype} tensor of rows "
                             f"{tail} with {left} left")
        if t.numel():
            self._data_file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._rows = (name, dtype, tail, left - n) if left > n else None

    def add_state(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Every tensor of `state` under `prefix` + its name (a layer's state: prefix "model.layers.3.")."""
        for name, t in state.items():
            self.add(prefix + name, t)

    # -- shards ------------------------------------------------------------------------------------------------------

    def _tmp(self, what: str) -> Path:
        return self.out_dir / f".minigpt-writing-{os.getpid()}-{what}"

    def _open_shard(self) -> _Shard:
        number = len(self.shards) + 1
        self._current = _Shard(number, self._tmp(f"{number}.data"))
        self._data_file = self._current.data.open("wb")
        return self._current

    def _finish_shard(self) -> None:
        """Header (tensors by decreasing element size, so each starts aligned), then the data copied behind it."""
        shard, self._current = self._current, None
        self._data_file.close()
        self._data_file = None
        order = sorted(shard.entries.items(), key=lambda kv: -kv[1].dtype.itemsize)  # stable: arrival order kept
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, e in order:
            header[name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape),
                            "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # the data then starts 8-aligned (the format allows trailing spaces)
        out = self._tmp(f"{shard.number}.safetensors")
        with out.open("wb") as f, shard.data.open("rb") as src:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, e in order:
                src.seek(e.start)
                _copy(src, f, e.nbytes)
        shard.data.unlink()
        self.shards.append(out)

    # -- finishing ---------------------------------------------------------------------------------------------------

    def close(self) -> list[Path]:
        """Rename the shards to their final names and write the index last; returns the weight files written."""
        if self.closed:
            raise RuntimeError("the writer is closed")
        if self._rows is not None:
            raise RuntimeError(f"tensor {self._rows[0]!r} is not complete")
        if self._current is not None:
            self._finish_shard()
        if not self.shards:
            raise ValueError("no tensors were written")
        self.closed = True
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [shard_name(k + 1, n) for k in range(n)]
        for tmp, name in zip(self.shards, names):
            os.replace(tmp, self.out_dir / name)
        if n > 1:
            index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                     "weight_map": {t: names[k - 1] for t, k in sorted(self.weight_map.items())}}
            atomic_write_text(self.out_dir / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [self.out_dir / name for name in names]

    def abort(self) -> None:
        """Remove every temporary file; nothing is left that looks like weights."""
        if self._data_file is not None:
            self._data_file.close()
            self._data_file = None
        for p in [*self.shards, *([self._current.data] if self._current else [])]:
            p.unlink(missing_ok=True)
        self.shards, self._current, self._rows, self.closed = [], None, None, True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()


def _copy(src, dst, nbytes: int, chunk: int = 1 << 24) -> None:
    while nbytes:
        block = src.read(min(chunk, nbytes))
        if not block:
            raise OSError("shard data file ended early")
        dst.write(block)
        nbytes -= len(block)


def write_state(out_dir: Path | str, state: Mapping[str, torch.Tensor],
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """A whole state dict through a ShardedWriter (tests, small models)."""
    with ShardedWriter(out_dir, max_shard_bytes) as w:
        w.add_state(state)
        return w.close()


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "INDEX", "SINGLE", "ShardedWriter", "shard_name", "write_state"]
