"""The import graph of minigpt, read from the source with `ast`: imports flow one way (no cycle), and a
function-local import of a minigpt module is kept only where it defers a heavy import at start-up."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "minigpt"
MODULES = {p.stem for p in PKG.glob("*.py")}
# Modules that import Ray when they load (its actors and remote tasks are declared at module level): a
# function-local import of one of them keeps Ray off the start-up of the CLI and of every other stage.
HEAVY = {"calibrate", "teacher"}


def imports_of(path: Path, lines: bool = False) -> list[tuple]:
    """(minigpt module imported, at module level?) for every import statement of a file, TYPE_CHECKING blocks and
    function bodies included, in the forms `import minigpt.x`, `from minigpt import x`, `from minigpt.x import y`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "minigpt" else [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: from . import x / from .x import y
            base = f"minigpt.{node.module}" if node.module else "minigpt"
            names = [f"{base}.{a.name}" for a in node.names] if not node.module else [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "minigpt" and len(parts) > 1 and parts[1] in MODULES:
                out.append((parts[1], id(node) not in local) + ((node.lineno,) if lines else ()))
    return out


def graph() -> dict[str, set[str]]:
    return {p.stem: {m for m, _ in imports_of(p) if m != p.stem} for p in PKG.glob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_of_reads_every_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import minigpt.plan\nfrom minigpt import slim as S, io\nfrom minigpt.stats import mix\n"
                 "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from minigpt.config import JobConfig\n"
                 "def f():\n    from minigpt.refit import refit\n")
    assert sorted(imports_of(f)) == [("config", True), ("io", True), ("plan", True), ("refit", False),
                                     ("slim", True), ("stats", True)]


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.name)
def test_function_local_imports_only_defer_heavy_modules(path):
    lazy = sorted({m for m, top in imports_of(path) if not top} - HEAVY)
    assert not lazy, f"{path.name} imports {lazy} inside functions: import them at the top (or, if they are heavy, " \
                     "list them in HEAVY with the reason)"


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.name)
def test_deferred_imports_say_why(path):
    source = path.read_text().splitlines()
    silent = [n for m, top, n in imports_of(path, lines=True) if not top and "#" not in source[n - 1]]
    assert not silent, f"{path.name}: the function-local imports on lines {silent} need a comment saying why"
