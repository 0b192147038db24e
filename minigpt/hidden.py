"""The residual stream of a worker's share of calibration blocks, held under a byte budget.

A streamed worker (minigpt.streamed) moves every batch through one layer before it loads the next, so between layers
it holds the hidden states of all its batches: tokens x hidden x dtype bytes (2.3 GB for 256k tokens of a 4096-wide
model in fp16). `HiddenBuffer` keeps entries in memory while their total stays under `budget_bytes` and writes the
rest to files in a spill folder, each through a memory map that is closed again at once: a mapping kept open would
leave the written pages resident (and in the process's RSS), which is what spilling is meant to avoid. Reading a
spilled entry copies it back into an ordinary tensor; writing the same key again overwrites its file in place.
`SpilledTensors` is the same store as a read-only mapping of names (a streamed driver's new weights).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch


class HiddenBuffer:
    """key -> tensor, in memory under `budget_bytes` (None: unlimited), spilled to `spill_dir` (default: a temporary
    folder) above it. Use as a context manager, or call `close()`, to remove the spill files."""

    def __init__(self, budget_bytes: int | None = None, spill_dir: Path | str | None = None):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0 or None")
        self.budget = budget_bytes
        self._memory: dict[int, torch.Tensor] = {}
        self._spilled: dict[int, tuple[torch.dtype, tuple[int, ...], int]] = {}  # key -> dtype, shape, bytes
        self._root = Path(spill_dir) if spill_dir is not None else None
        self._dir: Path | None = None
        self._cleanup: weakref.finalize | None = None

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        return sum(_nbytes(t) for t in self._memory.values())

    @property
    def spilled_bytes(self) -> int:
        return sum(n for _, _, n in self._spilled.values())

    def spilled(self, key: int) -> bool:
        return key in self._spilled

    def keys(self) -> list[int]:
        return sorted([*self._memory, *self._spilled])

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def __contains__(self, key: int) -> bool:
        return key in self._memory or key in self._spilled

    # -- put / get ---------------------------------------------------------------------------------------------------

    def put(self, key: int, value: torch.Tensor) -> None:
        """Store `value` (detached, on CPU) under `key`, replacing what was there."""
        value = value.detach().to("cpu")
        old = self._memory.pop(key, None)
        del old  # its bytes no longer count against the budget
        if self.budget is None or self.memory_bytes + _nbytes(value) <= self.budget:
            if key in self._spilled:
                self._path(key).unlink(missing_ok=True)
                del self._spilled[key]
            self._memory[key] = value
            return
        self._spill(key, value)

    def get(self, key: int) -> torch.Tensor:
        """The tensor stored under `key` (a spilled one is read back into an ordinary tensor)."""
        if key in self._memory:
            return self._memory[key]
        if key not in self._spilled:
            raise KeyError(key)
        dtype, shape, nbytes = self._spilled[key]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        mm = np.memmap(self._path(key), dtype=np.uint8, mode="r", shape=(nbytes,))
        try:
            raw = torch.from_numpy(np.array(mm))  # copied out: the mapping is closed below
        finally:
            del mm
        return raw.view(dtype).reshape(shape)

    def _spill(self, key: int, value: torch.Tensor) -> None:
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype, bf16 included, as bytes
        mm = np.memmap(self._path(key), dtype=np.uint8, mode="w+", shape=(max(raw.size, 1),))
        try:
            mm[:raw.size] = raw
            mm.flush()
        finally:
            del mm
        self._spilled[key] = (value.dtype, tuple(value.shape), raw.size)

    def _path(self, key: int) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="minigpt-hidden-", dir=self._root))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir / f"{key}.bin"

    def close(self) -> None:
        """Drop every entry and remove the spill files."""
        self._memory.clear()
        self._spilled.clear()
        if self._cleanup is not None:
            self._cleanup()
        self._dir = self._cleanup = None

    def __enter__(self) -> HiddenBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SpilledTensors(Mapping):
    """name -> tensor, held by a HiddenBuffer under `budget_bytes` (0: every tensor on disk) and read back on access:
    what a streamed planning driver keeps of the weights it computed, layer by layer, until slimming writes them
    (a third of a model's layer weights: 1.8 GB for a 1.5B model, 10 GB for a 70B one per domain)."""

    def __init__(self, budget_bytes: int | None = 0, spill_dir: Path | str | None = None):
        self._buffer = HiddenBuffer(budget_bytes, spill_dir)

    def update(self, new: Mapping[str, torch.Tensor]) -> None:
        for name, value in new.items():
            self._buffer.put(name, value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffer.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffer.keys())

    def __len__(self) -> int:
        return len(self._buffer)

    def __contains__(self, name: object) -> bool:
        return name in self._buffer

    def close(self) -> None:
        self._buffer.close()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


__all__ = ["HiddenBuffer", "SpilledTensors"]
