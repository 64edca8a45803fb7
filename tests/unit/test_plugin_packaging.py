"""The plugin ships alone: plugin/pyproject.toml installs it with the core and nothing of the
operator or the agent (no kopf, no bcc), and plugin/krew/retransmit.yaml is a manifest krew
accepts (the fields its validator requires), both at the project's version."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LEAN = tomllib.loads((ROOT / "plugin/pyproject.toml").read_text())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
KREW = yaml.safe_load((ROOT / "plugin/krew/retransmit.yaml").read_text())
# Import name -> distribution, for the modules the plugin and the core import.
DISTRIBUTIONS = {"kubernetes": "kubernetes", "pydantic": "pydantic", "yaml": "PyYAML", "urllib3": "urllib3"}


def third_party_imports(folder: Path) -> set[str]:
    out: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and not m.startswith("retransmit_")}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements}


def test_the_lean_distribution_holds_the_plugin_and_the_core_and_what_they_import():
    tool = LEAN["tool"]["setuptools"]
    assert set(tool["packages"]) == {"retransmit_plugin", "retransmit_core"}
    assert (ROOT / "plugin" / tool["package-dir"]["retransmit_core"]).resolve() == ROOT / "core"
    imported = third_party_imports(ROOT / "plugin") | third_party_imports(ROOT / "core")
    assert imported <= set(DISTRIBUTIONS), f"map {imported - set(DISTRIBUTIONS)} to a distribution here"
    deps = requirement_names(LEAN["project"]["dependencies"])
    assert {DISTRIBUTIONS[m] for m in imported} <= deps
    assert not deps & {"kopf", "bcc", "prometheus-client", "aiohttp", "rich", "pydantic-settings"}


def test_both_distributions_install_the_same_plugin_executables_at_the_same_version():
    lean, full = LEAN["project"]["scripts"], PROJECT["project"]["scripts"]
    assert lean == {k: v for k, v in full.items() if k.startswith("kubectl")}
    assert set(lean) == {"kubectl-retransmit", "kubectl_complete-retransmit"}
    assert LEAN["project"]["version"] == PROJECT["project"]["version"]


def test_importing_the_plugin_loads_neither_kopf_nor_bcc():
    script = ("import sys, retransmit_plugin.main, retransmit_plugin.complete\n"
              "assert 'kopf' not in sys.modules and 'bcc' not in sys.modules, sorted(sys.modules)\n"
              "assert 'retransmit_operator' not in sys.modules and 'retransmit_agent' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_krew_manifest_has_every_field_krew_requires():
    assert KREW["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2" and KREW["kind"] == "Plugin"
    assert KREW["metadata"]["name"] == "retransmit"              # kubectl retransmit
    spec = KREW["spec"]
    assert spec["version"] == f"v{LEAN['project']['version']}"
    assert spec["shortDescription"].strip() and len(spec["shortDescription"]) <= 50 and spec["description"].strip()
    selectors = [tuple(sorted(p["selector"]["matchLabels"].items())) for p in spec["platforms"]]
    assert len(set(selectors)) == len(selectors) and {dict(s)["os"] for s in selectors} >= {"linux", "darwin"}
    for platform in spec["platforms"]:
        assert platform["uri"].startswith("https://") and platform["uri"].endswith(".tar.gz")
        assert re.fullmatch(r"[0-9a-f]{64}", platform["sha256"])
        assert platform["bin"] == "kubectl-retransmit"
        copied = {f["from"] for f in platform["files"]}
        assert {"kubectl-retransmit", "kubectl_complete-retransmit"} <= copied


def test_the_krew_manifest_says_its_digests_are_placeholders():
    """No release is published: the manifest must not pass a made-up digest off as real."""
    text = (ROOT / "plugin/krew/retransmit.yaml").read_text()
    assert "NO RELEASE IS PUBLISHED YET" in text
    assert {p["sha256"] for p in KREW["spec"]["platforms"]} == {"0" * 64}
