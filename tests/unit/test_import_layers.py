"""The operator's and the agent's modules import each other without a cycle, and each one
imports alone in a fresh interpreter.

The graph is read from the source (every `from . import` / `from .x import`, including those
under `if TYPE_CHECKING:` and inside functions): a cycle through a type-only import is still
a cycle a reader has to untangle, and Python hides it until someone makes it a real import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"retransmit_operator": ROOT / "operator", "retransmit_agent": ROOT / "agent"}


def local_imports(path: Path, modules: set[str]) -> set[str]:
    """The sibling modules `path` imports (relative imports, every place in the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out & modules


def import_graph(folder: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return {m: local_imports(folder / f"{m}.py", modules) for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in graph:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_find_cycle_finds_a_type_only_cycle_and_accepts_layers():
    assert find_cycle({"handlers": {"kube"}, "kube": {"metrics"}, "metrics": {"handlers"}}) == [
        "handlers", "kube", "metrics", "handlers"]
    assert find_cycle({"handlers": {"reconciler", "kube"}, "reconciler": {"kube", "metrics"},
                       "kube": {"metrics"}, "metrics": set()}) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle_between_modules(package):
    graph = import_graph(PACKAGES[package])
    assert find_cycle(graph) == [], f"{package}: import cycle {' -> '.join(find_cycle(graph))}"


def test_handlers_only_register():
    """handlers.py holds kopf registration; the Reconciler and the pure readers live elsewhere."""
    tree = ast.parse((PACKAGES["retransmit_operator"] / "handlers.py").read_text())
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assert top == {"register_handlers", "kopf_settings"}


def test_every_operator_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter per module: a module that needs another imported first fails here."""
    names = sorted(p.stem for p in PACKAGES["retransmit_operator"].glob("*.py") if p.stem != "__init__")
    script = ("import importlib, sys\n"
              "m = sys.argv[1]\n"
              "importlib.import_module(m)\n"
              "assert m in sys.modules\n")
    failures = []
    for name in names:
        result = subprocess.run([sys.executable, "-c", script, f"retransmit_operator.{name}"],
                                cwd="/", capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{name}: {result.stderr.strip().splitlines()[-1:]}")
    assert failures == []
