"""`helm install` on the real API server, then a sample trace end to end: the operator
Deployment's pod and the agents' DaemonSet pods run (node simulator) with ONLY their own
ServiceAccount tokens, so every permission they need must be granted by the chart. Then the
things they must not do are refused (403), by `kubectl auth can-i` and by real requests
made with their tokens."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest
import yaml

from helm.render_manifests import MANIFESTS
from tests.deploy.kube import CHART, can_i, get_json, helm, kubectl, unique, wait_for
from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter, involving, per_flow

pytestmark = pytest.mark.deploy


def token_subject(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]


class Release:
    def __init__(self, cp, sim):
        self.cp, self.sim = cp, sim
        self.name = unique("e2e")
        self.ns = unique("rtrace-e2e")
        self.operator_sa = self.name              # fullnameOverride = release name
        self.agent_sa = self.name + "-agent"

    def install(self) -> None:
        helm(self.cp, "install", self.name, str(CHART), "--set", f"namespace.name={self.ns}",
             "--set", f"fullnameOverride={self.name}", "--wait", "--timeout", "180s")

    def uninstall(self) -> None:
        helm(self.cp, "uninstall", self.name, "--wait", "--timeout", "120s", check=False)

    def pods(self, component: str) -> list[dict]:
        out = get_json(self.cp, "pods", "-n", self.ns, "-l", f"app.kubernetes.io/component={component}") or {}
        return out.get("items", [])

    def operator_pod(self) -> dict:
        return wait_for("the operator pod", lambda: next(iter(self.pods("operator")), None))

    def logs(self, pod: dict) -> str:
        try:
            return self.sim.log_path(self.ns, pod["metadata"]["name"]).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def token_of(self, pod: dict) -> str:
        return (self.sim.pod_dir(self.ns, pod["metadata"]["name"]) / "serviceaccount" / "token").read_text().strip()


@pytest.fixture(scope="module")
def release(control_plane, node_simulator):
    rel = Release(control_plane, node_simulator)
    rel.install()
    yield rel
    rel.uninstall()


def test_sample_trace_runs_end_to_end_with_the_charts_service_accounts(release, control_plane):
    cp = release.cp
    operator = release.operator_pod()
    assert operator["spec"]["serviceAccountName"] == release.operator_sa
    assert token_subject(release.token_of(operator)) == f"system:serviceaccount:{release.ns}:{release.operator_sa}"

    with ReferenceCounter() as ref, LossNamespace(prefix="rtdep") as ns:
        ours = sorted(ns.v4)
        # The whole-cluster sample, narrowed to this test's own addresses: the simulated nodes
        # share this machine's kernel with every other test's traffic.
        trace = yaml.safe_load((MANIFESTS / "samples" / "whole-cluster.yaml").read_text())
        name = trace["metadata"]["name"] = unique("whole-cluster")
        trace["spec"].update(duration="150s", reportInterval="2s",
                             filter={"remoteCIDRs": [f"{ip}/32" for ip in ours]})
        kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump(trace))

        def nodes_running():
            status = (get_json(cp, "rtrace", name) or {}).get("status") or {}
            entries = {n["node"]: n for n in status.get("nodes") or []}
            running = [n for n in ("node-a", "node-b") if entries.get(n, {}).get("phase") == "Running"]
            return entries if len(running) == 2 else None

        wait_for("both agents attached and reporting", nodes_running, timeout=240)
        agents = release.pods("agent")
        assert {p["spec"]["nodeName"] for p in agents} == {"node-a", "node-b"}
        for pod in agents:
            assert pod["spec"]["serviceAccountName"] == release.agent_sa
            assert token_subject(release.token_of(pod)) == f"system:serviceaccount:{release.ns}:{release.agent_sa}"

        ns.random_loss(10)
        traffic = ns.python("tests.harness.traffic", "bulk", "--server-ip", ours[0], "--client-ip", ours[1],
                            "--port", str(21000 + os.getpid() % 20000), "--connections", "4",
                            "--bytes", str(2 << 20), "--duplex", stdout=subprocess.PIPE, text=True)
        assert traffic.wait(timeout=240) == 0
        ns.clear_loss()
        ns.wait_quiet()
        expected = sum(r for r, _s in per_flow(ref.read(), involving(set(ours))).values())
    assert expected > 0, "the loss rule made no retransmits: the test proves nothing"

    # Both simulated nodes run on this one kernel: each agent counts every one of our retransmits.
    def reported():
        status = (get_json(cp, "rtrace", name) or {}).get("status") or {}
        counts = {n["node"]: n.get("retransmits", 0) for n in status.get("nodes") or []}
        return status if counts == {"node-a": expected, "node-b": expected} else None

    status = wait_for(f"both nodes to report {expected} retransmits", reported, timeout=120)
    print(f"e2e: {expected} retransmits per node, summary {status.get('summary', {}).get('retransmits')}")

    completed = wait_for("the trace to complete", lambda: (
        (get_json(cp, "rtrace", name) or {}).get("status", {}).get("phase") == "Completed"), timeout=300)
    assert completed
    wait_for("the DaemonSet to be deleted", lambda: get_json(cp, "daemonset", "-n", release.ns, "rtrace-" + name) is None)
    final = get_json(cp, "rtrace", name)["status"]
    assert final["summary"]["retransmits"] == 2 * expected
    assert {n["node"]: n["retransmits"] for n in final["nodes"]} == {"node-a": expected, "node-b": expected}

    # Nothing they tried was refused: every permission they needed is granted.
    for pod in [operator, *agents]:
        log = release.logs(pod)
        assert " 403" not in log and "Forbidden" not in log, f"{pod['metadata']['name']}:\n{log[-3000:]}"
    kubectl(cp, "delete", "rtrace", name, "--wait=false")


# (verb, resource, namespace or None for all, subresource): refused for both accounts.
FORBIDDEN_BOTH = [
    ("get", "secrets", "OWN", None),
    ("list", "secrets", None, None),
    ("create", "pods", "OWN", None),
    ("delete", "pods", "OWN", None),
    ("create", "retransmittraces.retransmit.dev", None, None),
    ("update", "retransmittraces.retransmit.dev", None, None),
    ("delete", "retransmittraces.retransmit.dev", None, None),
    ("create", "daemonsets.apps", "default", None),
    ("create", "daemonsets.apps", "kube-system", None),
    ("get", "configmaps", "kube-system", None),
    ("create", "configmaps", "OWN", None),
    ("delete", "namespaces", None, None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
    ("create", "rolebindings.rbac.authorization.k8s.io", "OWN", None),
    ("patch", "nodes", None, None),
    ("create", "serviceaccounts", "OWN", "token"),
    ("create", "pods", "OWN", "exec"),
]
FORBIDDEN_AGENT = [
    ("patch", "retransmittraces.retransmit.dev", None, None),
    ("get", "retransmittraces.retransmit.dev", None, None),          # reports only: the trace is the operator's
    ("patch", "retransmittraces.retransmit.dev", None, "status"),
    ("list", "retransmittraces.retransmit.dev", None, None),
    ("create", "retransmitnodereports.retransmit.dev", "default", None),   # its own namespace only
    ("delete", "retransmitnodereports.retransmit.dev", "OWN", None),
    ("patch", "retransmitnodereports.retransmit.dev", "OWN", "status"),    # the operator's marks
    ("create", "daemonsets.apps", "OWN", None),
    ("create", "events", "default", None),
]
# What each needs (granted), so the refusals above are not an account that can do nothing.
ALLOWED_OPERATOR = [
    ("watch", "retransmittraces.retransmit.dev", None, None),
    ("patch", "retransmittraces.retransmit.dev", None, "status"),
    ("create", "daemonsets.apps", "OWN", None),
    ("delete", "daemonsets.apps", "OWN", None),
    ("watch", "daemonsets.apps", "OWN", None),
    ("list", "pods", None, None),
    ("create", "events", "default", None),
    ("watch", "retransmitnodereports.retransmit.dev", "OWN", None),
    ("patch", "retransmitnodereports.retransmit.dev", "OWN", "status"),
]
ALLOWED_AGENT = [
    ("get", "retransmitnodereports.retransmit.dev", "OWN", None),
    ("create", "retransmitnodereports.retransmit.dev", "OWN", None),
    ("patch", "retransmitnodereports.retransmit.dev", "OWN", None),
    ("watch", "pods", None, None),
]
# The operator reads the reports; only agents write them.
FORBIDDEN_OPERATOR = [
    ("create", "retransmitnodereports.retransmit.dev", "OWN", None),
    ("patch", "retransmitnodereports.retransmit.dev", "OWN", None),
]


def check(release, sa: str, rules, want: bool) -> list[str]:
    wrong = []
    for verb, resource, where, sub in rules:
        namespace = release.ns if where == "OWN" else where
        if can_i(release.cp, verb, resource, as_sa=(release.ns, sa), namespace=namespace, subresource=sub) != want:
            wrong.append(f"{verb} {resource}{'/' + sub if sub else ''} in {namespace or 'all namespaces'}")
    return wrong


def test_service_accounts_have_what_they_need_and_nothing_forbidden(release):
    assert check(release, release.operator_sa, FORBIDDEN_BOTH + FORBIDDEN_OPERATOR, False) == []
    assert check(release, release.agent_sa, FORBIDDEN_BOTH + FORBIDDEN_AGENT, False) == []
    assert check(release, release.operator_sa, ALLOWED_OPERATOR, True) == []
    assert check(release, release.agent_sa, ALLOWED_AGENT, True) == []


def test_forbidden_requests_with_real_tokens_are_refused(release, control_plane):
    """Real requests, authenticated with each account's own token: 403, never done."""
    import kubernetes
    from kubernetes.client.rest import ApiException

    cp = release.cp
    name = unique("guarded")
    kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace",
        "metadata": {"name": name}, "spec": {"duration": "1s", "nodeSelector": {"no-such-node": "x"}}}))
    try:
        for sa in (release.operator_sa, release.agent_sa):
            token = cp.service_account_token(release.ns, sa, create=False)
            with cp.api_client(token=token) as api:
                core, apps = kubernetes.client.CoreV1Api(api), kubernetes.client.AppsV1Api(api)
                custom = kubernetes.client.CustomObjectsApi(api)
                attempts = {
                    "read secrets": lambda: core.list_namespaced_secret(release.ns),
                    "read secrets everywhere": lambda: core.list_secret_for_all_namespaces(),
                    "write the trace spec": lambda: custom.patch_cluster_custom_object(
                        "retransmit.dev", "v1alpha1", "retransmittraces", name, {"spec": {"topFlows": 99}}),
                    "delete the trace": lambda: custom.delete_cluster_custom_object(
                        "retransmit.dev", "v1alpha1", "retransmittraces", name),
                    "create pods": lambda: core.create_namespaced_pod(release.ns, {
                        "metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}}),
                    "touch another namespace": lambda: apps.create_namespaced_daemon_set("default", {
                        "metadata": {"name": "x"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                            "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "x", "image": "x"}]}}}}),
                    "read another namespace": lambda: core.list_namespaced_config_map("kube-system"),
                }
                allowed = []
                for what, attempt in attempts.items():
                    try:
                        attempt()
                        allowed.append(what)
                    except ApiException as e:
                        if e.status != 403:
                            allowed.append(f"{what}: HTTP {e.status} instead of 403")
                assert allowed == [], f"{sa} was not refused: {allowed}"
                # The same token does work for what the account is for (both read pods).
                core.list_pod_for_all_namespaces(limit=1)
        spec = get_json(cp, "rtrace", name)["spec"]
        assert spec.get("topFlows") != 99
    finally:
        kubectl(cp, "delete", "rtrace", name, "--wait=false")
