"""manifests/ is rendered from the Helm chart: one source of truth, two ways to install.

The chart (helm/retransmit-operator) is the source. `helm template` with default values,
release `retransmit-operator` in namespace `retransmit-system`, gives the plain manifests;
the objects that exist only with `openshift.enabled=true` go to manifests/openshift/, those
that exist only with `monitoring.enabled=true` (dashboard ConfigMap, PrometheusRule,
PodMonitors) to manifests/monitoring/.
Each template holds one resource and gives its file name (the namespace's file sorts
first so `kubectl apply -f manifests/` creates it before what lives in it). Helm's own
labels (helm.sh/chart, managed-by: Helm) are dropped: kubectl, not Helm, manages these.
The CRDs (manifests/crd*.yaml) and samples/ are not rendered here.

    python -m helm.render_manifests            print the files it would write
    python -m helm.render_manifests --write    rewrite manifests/ (make manifests)
    python -m helm.render_manifests --check    exit 1 when manifests/ differs
                                               (tests/deploy/test_chart.py calls drift())

It also finds the helm and kubectl binaries (`tool`) for the deploy tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from retransmit_core.naming import DEFAULT_NAMESPACE

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "retransmit-operator"
MANIFESTS = ROOT / "manifests"
RELEASE = "retransmit-operator"
NAMESPACE = DEFAULT_NAMESPACE
# Files in manifests/ that other generators own.
NOT_RENDERED = {"crd.yaml", "crd-nodereports.yaml"}
HEADER = ("# Rendered from helm/retransmit-operator by `make manifests` (python -m helm.render_manifests --write).\n"
          "# Do not edit: change the chart and re-render; tests/deploy fails on drift.\n")
_SOURCE = re.compile(r"^# Source: [^/]+/templates/(.+)$", re.M)
_HELM_ONLY_LABELS = re.compile(r"^\s*(helm\.sh/chart: .*|app\.kubernetes\.io/managed-by: Helm)\n", re.M)


def tool(name: str) -> str:
    """helm or kubectl from `make tools` ($RTRACE_CACHE/bin), else from PATH."""
    cache = Path(os.environ.get("RTRACE_CACHE", Path.home() / ".cache" / "retransmit-operator"))
    candidate = cache / "bin" / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {cache / 'bin'} or PATH: run `make tools`")
    return found


def helm_template(*args: str, release: str = RELEASE, namespace: str = NAMESPACE) -> str:
    """`helm template` of the chart into `namespace` (the operator's: namespace.name);
    extra args such as --set k=v."""
    done = subprocess.run([tool("helm"), "template", release, str(CHART), "--namespace", namespace,
                           *([] if namespace == NAMESPACE else ["--set", f"namespace.name={namespace}"]), *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"helm template {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def split_by_template(rendered: str) -> dict[str, str]:
    """template path (relative to templates/) -> its rendered document (one per template)."""
    docs: dict[str, str] = {}
    for chunk in rendered.split("\n---\n"):
        match = _SOURCE.search(chunk)
        if not match:
            continue
        body = chunk[match.end():].strip("\n") + "\n"
        if match.group(1) in docs:
            raise ValueError(f"templates/{match.group(1)} renders more than one resource: one per file")
        docs[match.group(1)] = body
    return docs


def manifest_path(template: str) -> str:
    """manifests/ file name of a template: openshift/x.yaml stays there, the namespace first."""
    return "00-namespace.yaml" if template == "namespace.yaml" else template


def manifest_files() -> dict[str, str]:
    """Relative path under manifests/ -> content, as rendered from the chart now."""
    plain = split_by_template(helm_template())
    files = {manifest_path(t): doc for t, doc in plain.items()}
    for value, folder in (("openshift.enabled", "openshift"), ("monitoring.enabled", "monitoring")):
        variant = split_by_template(helm_template("--set", f"{value}=true"))
        changed = [t for t in plain if variant.get(t) != plain[t]]
        if changed:
            raise ValueError(f"{value}=true changes {changed}: manifests/{folder}/ can only ADD objects")
        added = {t: doc for t, doc in variant.items() if t not in plain}
        misplaced = [t for t in added if not t.startswith(f"{folder}/")]
        if misplaced:
            raise ValueError(f"{value}=true adds {misplaced}: put those templates in templates/{folder}/")
        files.update({manifest_path(t): doc for t, doc in added.items()})
    return {path: HEADER + _HELM_ONLY_LABELS.sub("", doc) for path, doc in files.items()}


def rendered_files_on_disk() -> dict[str, str]:
    """What manifests/ holds today, minus the files other generators own and samples/."""
    found = {}
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        rel = path.relative_to(MANIFESTS).as_posix()
        if rel in NOT_RENDERED or rel.startswith("samples/"):
            continue
        found[rel] = path.read_text()
    return found


def drift() -> list[str]:
    """Human-readable differences between the chart's rendering and manifests/."""
    want, have = manifest_files(), rendered_files_on_disk()
    problems = [f"manifests/{p}: missing" for p in sorted(set(want) - set(have))]
    problems += [f"manifests/{p}: not rendered by the chart (stale?)" for p in sorted(set(have) - set(want))]
    problems += [f"manifests/{p}: differs from the chart" for p in sorted(set(want) & set(have)) if want[p] != have[p]]
    return problems


def write() -> None:
    for rel in rendered_files_on_disk():
        (MANIFESTS / rel).unlink()
    for rel, text in manifest_files().items():
        (MANIFESTS / rel).parent.mkdir(parents=True, exist_ok=True)
        (MANIFESTS / rel).write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helm.render_manifests", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.write:
        write()
        print(f">> rendered {len(manifest_files())} files into {MANIFESTS}")
    elif args.check:
        problems = drift()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run `make manifests` after changing the chart", file=sys.stderr)
            return 1
    else:
        for rel, text in manifest_files().items():
            print(f"--- manifests/{rel}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
