"""Security scan (checkov) of the Dockerfile, manifests/, the chart's variants and the agent
DaemonSet the operator renders; fails on any finding that is neither fixed nor justified.

Justifications live next to what they accept: `checkov.io/skipN: CHECK=reason` annotations
on Kubernetes objects and `# checkov:skip=CHECK: reason` in the Dockerfile; checkov reports
those as skipped with their reason, and an empty reason counts as unjustified. The agent
DaemonSet is not a file here (the operator renders it per trace, retransmit_operator.render),
so its accepted findings and their reasons are AGENT_ACCEPTED below. checkov runs from its
own venv (make checkov): it pins many dependencies.

    python -m tests.deploy.scan        print every finding; exit 1 when one is unjustified
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from helm.render_manifests import MANIFESTS, ROOT, helm_template, split_by_template

CACHE = Path(os.environ.get("RTRACE_CACHE", Path.home() / ".cache" / "retransmit-operator"))
CHECKOV = CACHE / "checkov-venv" / "bin" / "checkov"
CONFIG = ROOT / ".checkov.yaml"

# The agent must load BPF programs and read tracefs on the host: these findings are what
# that takes, in both security modes (see retransmit_operator/render.py).
AGENT_ACCEPTED: dict[str, str] = {
    "CKV_K8S_16": "privileged mode: loading BPF and attaching to tracepoints needs it on kernels before 5.8 and under runtimes that do not grant BPF/PERFMON; agent.securityMode=capabilities avoids it",
    "CKV_K8S_20": "privileged mode implies privilege escalation; capabilities mode sets allowPrivilegeEscalation false",
    "CKV_K8S_23": "the agent runs as uid 0: tracefs and debugfs are mode 0700 root, and BPF needs root's capabilities",
    "CKV_K8S_40": "the agent runs as uid 0 (see CKV_K8S_23)",
    "CKV_K8S_25": "capabilities mode adds exactly BPF, PERFMON and SYS_RESOURCE, what loading a tracepoint program needs",
    "CKV_K8S_37": "privileged mode holds every capability; capabilities mode drops ALL and adds three",
    "CKV_K8S_28": "privileged mode holds NET_RAW with every other capability; capabilities mode drops it",
    "CKV_K8S_19": "hostNetwork: the agent attributes local addresses to the node and serves metrics on the node's address",
    "CKV_K8S_31": "seccomp Unconfined: runtime default profiles refuse bpf() and perf_event_open() without SYS_ADMIN",
    "CKV_K8S_29": "the container's securityContext is the one that matters here (privileged or the three capabilities); a pod-level one adds nothing",
    "CKV_K8S_38": "the agent writes its node's entry into the trace status with its own ServiceAccount token",
    "CKV_K8S_43": "the image reference is the operator's RTRACE_AGENT_IMAGE, a digest once you publish one (agent.image.tag)",
    "CKV_K8S_15": "IfNotPresent with a versioned tag or digest (agent.image.pullPolicy)",
    "CKV2_K8S_6": "hostNetwork pods are outside NetworkPolicy's reach",
}


@dataclass(frozen=True)
class Finding:
    check: str
    name: str
    resource: str
    file: str
    reason: Optional[str]    # None: a failed check nobody accepted

    @property
    def justified(self) -> bool:
        return bool(self.reason and self.reason.strip())


def ensure_checkov() -> Path:
    if not CHECKOV.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT), "checkov"], check=True)
    return CHECKOV


def checkov(framework: str, *target: str) -> dict:
    """One checkov run; JSON results (a list when several frameworks answered)."""
    done = subprocess.run([str(ensure_checkov()), "--config-file", str(CONFIG), "--framework", framework, *target],
                          capture_output=True, text=True, cwd=ROOT)
    if not done.stdout.strip().startswith(("{", "[")):
        raise RuntimeError(f"checkov {framework} {' '.join(target)} gave no JSON ({done.returncode}): {done.stderr[-2000:]}")
    out = json.loads(done.stdout)
    reports = out if isinstance(out, list) else [out]
    for r in reports:
        if r.get("results", {}).get("parsing_errors"):
            raise RuntimeError(f"checkov could not parse {r['results']['parsing_errors']}")
    return {"reports": reports}


def findings(result: dict, accepted: Optional[dict[str, str]] = None, where: str = "") -> tuple[list[Finding], int, set[str]]:
    """(failed + skipped findings, number of passed checks, resources scanned)."""
    out: list[Finding] = []
    passed = 0
    resources: set[str] = set()
    for report in result["reports"]:
        res = report.get("results", {})
        passed += len(res.get("passed_checks", []))
        for c in res.get("passed_checks", []):
            resources.add(c["resource"])
        for c in res.get("skipped_checks", []):
            resources.add(c["resource"])
            out.append(Finding(c["check_id"], c["check_name"], c["resource"], where + c["file_path"],
                               (c.get("check_result") or {}).get("suppress_comment") or ""))
        for c in res.get("failed_checks", []):
            resources.add(c["resource"])
            out.append(Finding(c["check_id"], c["check_name"], c["resource"], where + c["file_path"],
                               (accepted or {}).get(c["check_id"])))
    return out, passed, resources


def agent_daemonsets(deployment: dict) -> dict[str, dict]:
    """The DaemonSet the operator renders for a trace, with the env the chart gives it, per
    security mode."""
    from retransmit_core.api import RetransmitTraceSpec
    from retransmit_operator.render import render_daemonset
    from retransmit_operator.settings import Settings

    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    env["RTRACE_NAMESPACE"] = deployment["metadata"]["namespace"]
    return {mode: render_daemonset("sample", "00000000-0000-0000-0000-000000000000", RetransmitTraceSpec(),
                                   Settings.from_env({**env, "RTRACE_AGENT_SECURITY_MODE": mode}))
            for mode in ("privileged", "capabilities")}


@dataclass
class ScanReport:
    findings: list[Finding]
    passed: int
    resources: set[str]

    @property
    def unjustified(self) -> list[Finding]:
        return [f for f in self.findings if not f.justified]


def run() -> ScanReport:
    all_findings: list[Finding] = []
    passed = 0
    resources: set[str] = set()

    def add(result: tuple[list[Finding], int, set[str]]) -> None:
        nonlocal passed
        all_findings.extend(result[0])
        passed += result[1]
        resources.update(result[2])

    add(findings(checkov("dockerfile", "-f", str(ROOT / "Dockerfile"))))
    # manifests/ is the chart with default values (+ openshift/), the CRD and samples.
    add(findings(checkov("kubernetes", "-d", str(MANIFESTS))))
    with tempfile.TemporaryDirectory(prefix="rtrace-scan-") as tmp:
        variant = Path(tmp) / "chart-capabilities"
        variant.mkdir()
        docs = split_by_template(helm_template("--set", "agent.securityMode=capabilities", "--set", "openshift.enabled=true"))
        for template, doc in docs.items():
            (variant / template.replace("/", "-")).write_text(doc)
        add(findings(checkov("kubernetes", "-d", str(variant)), where="chart(capabilities,openshift):"))

        deployment = yaml.safe_load(docs["operator-deployment.yaml"])
        agents = Path(tmp) / "agent"
        agents.mkdir()
        for mode, ds in agent_daemonsets(deployment).items():
            (agents / f"agent-daemonset-{mode}.yaml").write_text(yaml.safe_dump(ds))
        add(findings(checkov("kubernetes", "-d", str(agents)), AGENT_ACCEPTED, where="operator-rendered:"))
    return ScanReport(all_findings, passed, resources)


def main() -> int:
    report = run()
    for f in sorted(report.findings, key=lambda f: (f.justified, f.file, f.check)):
        status = "accepted" if f.justified else "UNJUSTIFIED"
        print(f"{status:11} {f.check:11} {f.resource}  ({f.file})\n            {f.name}" +
              (f"\n            reason: {f.reason}" if f.justified else ""))
    print(f"\n{report.passed} checks passed, {len(report.findings) - len(report.unjustified)} findings accepted "
          f"with a reason, {len(report.unjustified)} unjustified; {len(report.resources)} resources scanned")
    return 1 if report.unjustified else 0


if __name__ == "__main__":
    sys.exit(main())
