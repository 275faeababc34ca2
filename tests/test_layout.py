"""Issue 17: the core's folders are the pipeline's stages, and imports only run down them.

Stages, in order: ``errors`` → ``settings`` → ``ir`` → ``data`` → ``passkit`` → ``check`` →
``pipeline`` → ``tuning`` → ``cli``. A module may import from its own stage and the ones
before it, never from a later one (function-level imports included), and module-level imports
form no cycle, so every module can be imported first, alone, in a fresh process.
"""

from __future__ import annotations

import ast
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

STAGES = ("errors", "settings", "ir", "data", "passkit", "check", "pipeline", "tuning", "cli")
PACKAGE = REPO_ROOT / "graphopt"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def _imports(path: Path, *, module_level_only: bool) -> list[tuple[str, int]]:
    """graphopt modules ``path`` imports, with line numbers (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            counted = top or not module_level_only
            if isinstance(child, ast.ImportFrom) and child.module and counted:
                if child.module == "graphopt":
                    found.extend((f"graphopt.{a.name}", child.lineno) for a in child.names)
                elif child.module.startswith("graphopt."):
                    found.append((child.module, child.lineno))
            elif isinstance(child, ast.Import) and counted:
                found.extend(
                    (a.name, child.lineno) for a in child.names if a.name.startswith("graphopt.")
                )
            visit(child, top and not nested)

    visit(tree, True)
    return found


def test_no_import_runs_back_up_a_stage() -> None:
    upward = []
    for module, path in _modules().items():
        mine = _stage(module)
        if mine is None:
            continue
        for target, line in _imports(path, module_level_only=False):
            theirs = _stage(target)
            if theirs is not None and STAGES.index(theirs) > STAGES.index(mine):
                upward.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    assert upward == []


def test_module_level_imports_form_no_cycle() -> None:
    modules = _modules()
    graph = {
        name: {target for target, _ in _imports(path, module_level_only=True) if target in modules}
        for name, path in modules.items()
    }
    for package in modules:  # importing a submodule imports its packages first
        graph[package] |= {p for p in modules if package.startswith(p + ".")}
    cycles = []
    state: dict[str, int] = {}

    def walk(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" → ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                walk(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_first_in_a_fresh_process(seed: int) -> None:
    names = sorted(_modules())
    random.Random(seed).shuffle(names)
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('graphopt') or m == 'passes']:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_only_the_weight_api_touches_graphsurgeon_storage() -> None:
    """Issue 17.2: ``Constant._values`` and graphsurgeon's lazy/sparse value classes appear in
    graphopt.ir.weights only; passes, tools, models and tests use its functions."""
    allowed = PACKAGE / "ir" / "weights.py"
    pattern = re.compile(r"\._values\b|\bLazyValues\b|\bSparseValues\b")
    roots = [PACKAGE, REPO_ROOT / "passes", REPO_ROOT / "tools", REPO_ROOT / "models"]
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if path != allowed
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert found == []
