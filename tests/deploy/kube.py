"""kubectl and helm against the test control plane, for the deploy tests."""

from __future__ import annotations

import subprocess
import uuid
from typing import Optional

from tests.deploy.render import CHART, MANIFESTS, tool


def run(cp, name: str, *args: str, input: Optional[str] = None, check: bool = True,
        kubeconfig: Optional[str] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`kubectl ...` or `helm ...` as admin (or with another kubeconfig); check raises with stderr."""
    env = cp.env()
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    done = subprocess.run([tool(name), *args], input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def kubectl(cp, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(cp, "kubectl", *args, **kwargs)


def helm(cp, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(cp, "helm", *args, **kwargs)


def install_crd(cp) -> None:
    """The generated CRD (others may have installed it already: server-side apply is idempotent)."""
    kubectl(cp, "apply", "--server-side", "--force-conflicts", "-f", str(MANIFESTS / "crd.yaml"))
    kubectl(cp, "wait", "--for=condition=Established", "crd/retransmittraces.retransmit.dev", "--timeout=60s")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def can_i(cp, verb: str, resource: str, *, as_sa: tuple[str, str], namespace: Optional[str] = None,
          subresource: Optional[str] = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{as_sa[0]}:{as_sa[1]}"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    done = kubectl(cp, *args, check=False)
    answer = done.stdout.strip()
    if answer not in ("yes", "no"):
        raise AssertionError(f"kubectl {' '.join(args)}: {done.stdout} {done.stderr}")
    return answer == "yes"


__all__ = ["CHART", "kubectl", "helm", "install_crd", "unique", "can_i"]
