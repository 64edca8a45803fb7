"""The project's layers: a shared core (retransmit_core) that the operator, the agent and the
kubectl plugin stand on, and nothing else between them. The core imports none of the three,
the agent imports nothing of the operator or the plugin, the plugin nothing of the operator
or the agent, the operator nothing of the agent or the plugin. Within each package the
modules import each other without a cycle, and each one imports alone in a fresh interpreter.

The graph is read from the source (every import, including those under `if TYPE_CHECKING:`
and inside functions): a type-only import is still a dependency a reader has to follow, and
Python hides it until someone makes it a real import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "retransmit_core": ROOT / "core",
    "retransmit_operator": ROOT / "operator",
    "retransmit_agent": ROOT / "agent",
    "retransmit_plugin": ROOT / "plugin",
}
# Which of the project's packages each one may import (besides itself). retransmit_bpf holds
# only the C program, which the agent loads as package data.
ALLOWED = {
    "retransmit_core": set(),
    "retransmit_operator": {"retransmit_core"},
    "retransmit_agent": {"retransmit_core", "retransmit_bpf"},
    "retransmit_plugin": {"retransmit_core"},
}


def local_imports(source: str, modules: set[str]) -> set[str]:
    """The sibling modules `source` imports (relative imports, every place in the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out & modules


def project_imports(source: str) -> set[str]:
    """The project packages `source` imports by absolute name (every place in the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out.update(n.split(".")[0] for n in names if n.split(".")[0].startswith("retransmit_"))
    return out


def layer_violations(package: str, sources: dict[str, str]) -> list[str]:
    """'module imports package' for every import of a project package `package` may not use."""
    return sorted(f"{module} imports {other}"
                  for module, source in sources.items()
                  for other in project_imports(source) - ALLOWED[package] - {package})


def import_graph(folder: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return {m: local_imports((folder / f"{m}.py").read_text(), modules) for m in sorted(modules)}


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


def sources_of(package: str) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(PACKAGES[package].glob("*.py"))}


def test_find_cycle_finds_a_type_only_cycle_and_accepts_layers():
    assert find_cycle({"handlers": {"kube"}, "kube": {"metrics"}, "metrics": {"handlers"}}) == [
        "handlers", "kube", "metrics", "handlers"]
    assert find_cycle({"handlers": {"reconciler", "kube"}, "reconciler": {"kube", "metrics"},
                       "kube": {"metrics"}, "metrics": set()}) == []


def test_layer_check_refuses_an_agent_module_that_imports_the_operator():
    """The check itself: an agent module reaching into the operator, even from inside a
    function or as a plain `import`, is a violation; the core is not."""
    sources = {
        "good": "from retransmit_core.api import Flow\n",
        "bad": "def f():\n    from retransmit_operator.render import render_daemonset\n",
        "worse": "import retransmit_plugin.tables\n",
    }
    assert layer_violations("retransmit_agent", sources) == [
        "bad imports retransmit_operator", "worse imports retransmit_plugin"]
    assert layer_violations("retransmit_core", {"x": "from retransmit_agent import kernel\n"}) == [
        "x imports retransmit_agent"]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_imports_only_the_layers_below_it(package):
    assert layer_violations(package, sources_of(package)) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle_between_modules(package):
    graph = import_graph(PACKAGES[package])
    assert find_cycle(graph) == [], f"{package}: import cycle {' -> '.join(find_cycle(graph))}"


def test_handlers_only_register():
    """handlers.py holds kopf registration; the Reconciler and the pure readers live elsewhere."""
    tree = ast.parse((PACKAGES["retransmit_operator"] / "handlers.py").read_text())
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assert top == {"register_handlers", "kopf_settings"}


def test_the_core_and_the_plugin_never_load_kopf_or_bcc():
    """The plugin runs on a laptop with kubectl: importing it (and the core under it) must not
    pull in the operator's framework or the agent's compiler."""
    script = ("import sys, retransmit_plugin.main, retransmit_core.api, retransmit_core.naming\n"
              "print(' '.join(sorted(m for m in ('kopf', 'bcc') if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_module_imports_alone_in_a_fresh_interpreter(package):
    """One interpreter per module: a module that needs another imported first fails here."""
    names = sorted(p.stem for p in PACKAGES[package].glob("*.py") if p.stem != "__init__")
    script = ("import importlib, sys\n"
              "for m in sys.argv[1:]:\n"
              "    importlib.import_module(m)\n")
    failures = []
    for name in names:
        result = subprocess.run([sys.executable, "-c", script, f"{package}.{name}"],
                                cwd="/", capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{name}: {result.stderr.strip().splitlines()[-1:]}")
    assert failures == []
