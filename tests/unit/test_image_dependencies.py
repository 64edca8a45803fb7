"""The operator image installs only the dependencies pyproject.toml lists in
[tool.retransmit-operator] operator-dependencies (the Dockerfile's operator-root stage):
they must cover every module that retransmit_operator and retransmit_core import, or the
operator image would fail at start. Read from the source, checked against the installed
distributions (importlib.metadata), without building an image."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPERATOR_DEPENDENCIES = PYPROJECT["tool"]["retransmit-operator"]["operator-dependencies"]
PROJECT_PACKAGES = {"retransmit_core", "retransmit_operator", "retransmit_agent", "retransmit_plugin", "retransmit_bpf"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_imports(folder: Path) -> set[str]:
    """Every absolute import's top-level module in the folder's Python files, function-level
    imports included."""
    found: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_operator_dependencies_are_project_dependencies():
    declared = {canonical(re.match(r"[A-Za-z0-9._-]+", d).group()) for d in PYPROJECT["project"]["dependencies"]}
    assert {canonical(n) for n in OPERATOR_DEPENDENCIES} <= declared


def test_operator_dependencies_cover_every_import_of_the_operator_and_core():
    imports = top_level_imports(ROOT / "operator") | top_level_imports(ROOT / "core")
    third_party = imports - set(sys.stdlib_module_names) - PROJECT_PACKAGES - {"__future__"}
    # The operator image has neither the agent's nor the plugin's packages, nor bcc.
    assert not imports & {"retransmit_agent", "retransmit_plugin", "retransmit_bpf", "bcc"}
    distributions = packages_distributions()
    allowed = {canonical(n) for n in OPERATOR_DEPENDENCIES}
    # A dependency of a listed one (urllib3 comes with kubernetes) is installed too.
    for name in list(allowed):
        allowed |= {canonical(re.match(r"[A-Za-z0-9._-]+", r).group())
                    for r in requires(name) or [] if "extra ==" not in r}
    missing = {module: distributions.get(module) for module in third_party
               if not {canonical(d) for d in distributions.get(module, [])} & allowed}
    assert missing == {}, f"imported by the operator but not in operator-dependencies: {missing}"
