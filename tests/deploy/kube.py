"""kubectl and helm against the test control plane, for the deploy tests."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Callable, Optional

import yaml

from helm.render_manifests import CHART, MANIFESTS, tool
from retransmit_core.api import GROUP, VERSION


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


def get_json(cp, *args: str) -> Optional[dict]:
    """`kubectl get ... -o json`, None when it fails (not found)."""
    done = kubectl(cp, "get", *args, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait_for(what: str, probe: Callable[[], Optional[object]], timeout: float = 180, every: float = 1.0):
    """Poll until probe() returns something truthy; fail naming `what` (never a timing assertion:
    the timeout only bounds a wait for a state that must come)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def install_crd(cp) -> None:
    """The generated CRDs (others may have installed them already: server-side apply is idempotent)."""
    for path, name in (("crd.yaml", "retransmittraces"), ("crd-nodereports.yaml", "retransmitnodereports")):
        kubectl(cp, "apply", "--server-side", "--force-conflicts", "-f", str(MANIFESTS / path))
        kubectl(cp, "wait", "--for=condition=Established", f"crd/{name}.retransmit.dev", "--timeout=60s")


def apply_trace(cp, name: str, addresses, **spec) -> None:
    """`kubectl apply` a RetransmitTrace counting only flows to `addresses` (a test's own
    namespace: the simulated nodes share this kernel with every other test's traffic)."""
    trace = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name},
             "spec": {**spec, "filter": {"remoteCIDRs": [f"{ip}/32" for ip in sorted(addresses)]}}}
    kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump(trace))


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


def access_review(cp, sa: tuple[str, str], verb: str, group: str, resource: str, *,
                  namespace: Optional[str] = None, name: Optional[str] = None) -> bool:
    """A SubjectAccessReview for a ServiceAccount: what the API server's own admission (for
    example OpenShift's SCC admission asking for `use`) gets. Works for resource types the
    server does not serve, where `kubectl auth can-i` cannot resolve the type."""
    import kubernetes

    attrs = {"verb": verb, "group": group, "resource": resource}
    if namespace:
        attrs["namespace"] = namespace
    if name:
        attrs["name"] = name
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": f"system:serviceaccount:{sa[0]}:{sa[1]}",
                     "groups": ["system:serviceaccounts", f"system:serviceaccounts:{sa[0]}", "system:authenticated"],
                     "resourceAttributes": attrs}}
    with cp.api_client() as api:
        review = kubernetes.client.AuthorizationV1Api(api).create_subject_access_review(body)
    return bool(review.status.allowed)


__all__ = ["CHART", "kubectl", "helm", "get_json", "wait_for", "install_crd", "apply_trace", "unique", "can_i", "access_review"]
