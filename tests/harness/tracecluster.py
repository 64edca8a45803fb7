"""What the cluster tests share: the install as a user does it (manifests/), the node names,
a trace handle, a labelled server/client pod pair, and the reference comparison.

The pytest fixtures built on these live in tests/cluster/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import kubernetes

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION, NodeStatus
from retransmit_core.naming import (
    DEFAULT_NAMESPACE, agent_selector_labels, daemonset_name, privileged_daemonset_name, report_name, trace_selector,
)
from retransmit_operator.settings import Settings
from retransmit_operator.slots import port_of
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.refcount import per_flow, succeeded

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_NS = DEFAULT_NAMESPACE
AGENT_SA = "retransmit-operator-agent"
MANIFESTS = ["00-namespace.yaml", "crd.yaml", "crd-nodereports.yaml", "agent-serviceaccount.yaml",
             "agent-clusterrole.yaml", "agent-clusterrolebinding.yaml", "agent-role.yaml", "agent-rolebinding.yaml",
             "agent-report-guard-policy.yaml", "agent-report-guard-binding.yaml"]
REPORT_GUARD = "retransmit-operator-report-guard"
NODE_A, NODE_B = "node-a", "node-b"
REPORT = "1s"
# kubectl finds the plugin on PATH as kubectl-retransmit: the installed entry point.
PLUGIN = str(Path(sys.executable).parent / "kubectl-retransmit")
# ... and, kubectl 1.26+, its completion as kubectl_complete-retransmit beside it.
PLUGIN_COMPLETE = str(Path(sys.executable).parent / "kubectl_complete-retransmit")


def apply_manifest(api: Any, doc: dict) -> None:
    from kubernetes.dynamic import DynamicClient

    dyn = DynamicClient(api)
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    dyn.server_side_apply(resource, body=doc, field_manager="rtrace-e2e", force_conflicts=True)


def install_crds(api: Any) -> None:
    """Both CRDs from manifests/, server-side applied (idempotent: other modules install them too)."""
    import yaml

    for path in ("crd.yaml", "crd-nodereports.yaml"):
        apply_manifest(api, yaml.safe_load((ROOT / "manifests" / path).read_text()))


def sleeping_agents_operator(control_plane: Any, api: Any, namespace: str) -> Settings:
    """Settings of an operator in `namespace` (its CRDs installed, its agents' ServiceAccount
    made) whose agents only sleep: for tests of the operator itself, not of counting."""
    install_crds(api)
    kubernetes.client.CoreV1Api(api).create_namespaced_service_account(namespace, {"metadata": {"name": "retransmit-agent"}})
    return Settings(kubeconfig=str(control_plane.kubeconfig), namespace=namespace, metrics_port=0, sync_interval=1.0,
                    agent_command=("/bin/sh", "-c", "exec sleep 1000", "--"))


def operator_settings(control_plane: Any, agent_state: Path, metrics_port: int = 0) -> Settings:
    """The embedded operator's settings: agents run the agent_state wrapper under the manifests'
    ServiceAccount, one sync pass a second."""
    return Settings(namespace=SYSTEM_NS, agent_service_account=AGENT_SA, agent_command=(str(agent_state / "agent"),),
                    sync_interval=1.0, metrics_port=metrics_port, kubeconfig=str(control_plane.kubeconfig))


class Pods:
    """A server and a client pod on node-a (or `node`; the server on `server_node` when given),
    labelled, each with its own netns and addresses."""

    def __init__(self, core: Any, sim: Any, namespace: str, node: str = NODE_A,
                 server_node: Optional[str] = None) -> None:
        podtraffic.create_pod(core, namespace, "server", server_node or node, {"app": "server"})
        podtraffic.create_pod(core, namespace, "client", node, {"app": "client"})
        self.namespace = namespace
        self.server_ips = podtraffic.wait_pod_ips(core, namespace, "server")
        self.client_ips = podtraffic.wait_pod_ips(core, namespace, "client")
        self.server = podtraffic.PodNet.of(sim, namespace, "server")
        self.client = podtraffic.PodNet.of(sim, namespace, "client")

    @property
    def owners(self) -> dict[str, str]:
        return {**{ip: "server" for ip in self.server_ips}, **{ip: "client" for ip in self.client_ips}}

    def lossy_bulk(self, loss: int = 10, connections: int = 3, nbytes: int = 1 << 20, port: int = 5201) -> None:
        """IPv4 and IPv6 duplex bulk client <-> server under `loss`% (arriving at either pod), then quiet."""
        self.server.random_loss(loss)
        self.client.random_loss(loss)
        try:
            for i, ip in enumerate(self.server_ips):
                podtraffic.bulk(self.server, self.client, ip, port + i, connections, nbytes)
        finally:
            self.server.clear_loss()
            self.client.clear_loss()
        self.quiet()

    def synack(self, port: int = 5301) -> None:
        podtraffic.synack(self.server, self.client, self.server_ips[0], port, connections=2)
        self.quiet()

    def quiet(self) -> None:
        self.server.wait_quiet()
        self.client.wait_quiet()


def trace_body(name: str, **spec: Any) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name},
            "spec": {"reportInterval": REPORT, "topFlows": 100, **spec}}


class Trace:
    def __init__(self, objects: Any, core: Any, name: str, **spec: Any) -> None:
        self.objects, self.core, self.name = objects, core, name
        objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, trace_body(name, **spec))

    @classmethod
    def existing(cls, objects: Any, core: Any, name: str) -> "Trace":
        """A handle on a trace made another way (kubectl apply of a sample)."""
        trace = cls.__new__(cls)
        trace.objects, trace.core, trace.name = objects, core, name
        return trace

    def get(self) -> dict:
        return self.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.name)

    def report(self, node: str = NODE_A) -> Optional[dict]:
        try:
            return self.objects.get_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL,
                                                             report_name(self.name, node))
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def entry(self, node: str = NODE_A) -> Optional[NodeStatus]:
        """The node's report as its agent wrote it."""
        report = self.report(node)
        return NodeStatus.model_validate(report["spec"]) if report else None

    def reports(self) -> list[dict]:
        return self.objects.list_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL,
                                                          label_selector=trace_selector(self.name))["items"]

    def wait_entry(self, what: str, predicate: Callable[[NodeStatus], bool], node: str = NODE_A,
                   timeout: float = 120.0) -> NodeStatus:
        def check():
            e = self.entry(node)
            return e if e is not None and predicate(e) else None
        return wait_until(check, f"trace {self.name} node {node}: {what}", timeout=timeout, interval=0.5)

    def metrics_port(self) -> int:
        """The port the operator gave this trace's agents (recorded on their DaemonSet)."""
        apps = kubernetes.client.AppsV1Api(self.core.api_client)
        daemonset = apps.read_namespaced_daemon_set(daemonset_name(self.name), SYSTEM_NS)
        return port_of(apps.api_client.sanitize_for_serialization(daemonset))

    def agent_pod(self, node: str = NODE_A) -> str:
        selector = ",".join(f"{k}={v}" for k, v in agent_selector_labels(self.name).items())
        for pod in self.core.list_namespaced_pod(SYSTEM_NS, label_selector=selector).items:
            if pod.spec.node_name == node and pod.metadata.deletion_timestamp is None:
                return pod.metadata.name
        raise LookupError(f"no agent pod of trace {self.name} on {node}")

    def delete(self) -> None:
        try:
            self.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, self.name)
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise
        # Garbage collection would remove the DaemonSets too, but the controller-manager's
        # collector resolves the owner (a custom resource) only after its periodic discovery,
        # and it backs off after an API server restart: delete it here so teardown is prompt.
        apps = kubernetes.client.AppsV1Api(self.core.api_client)
        for name in (daemonset_name(self.name), privileged_daemonset_name(self.name)):
            try:
                apps.delete_namespaced_daemon_set(name, SYSTEM_NS)
            except kubernetes.client.ApiException as e:
                if e.status != 404:
                    raise
        selector = ",".join(f"{k}={v}" for k, v in agent_selector_labels(self.name).items())
        try:
            wait_until(lambda: not self.core.list_namespaced_pod(SYSTEM_NS, label_selector=selector).items,
                       f"agent pods of {self.name} gone", timeout=120)
        except TimeoutError as e:
            left = [(p.metadata.name, p.status.phase, p.metadata.deletion_timestamp, p.metadata.owner_references)
                    for p in self.core.list_namespaced_pod(SYSTEM_NS, label_selector=selector).items]
            raise TimeoutError(f"{e}: {left}") from None


def expected(counts: Counter, local_ips: set[str], before: Optional[Counter] = None) -> dict:
    """Reference per flow (retransmits, synack) for events whose local side is in `local_ips`."""
    diff = counts - before if before is not None else counts
    return per_flow(diff, lambda e: succeeded(e) and e.local_ip in local_ips)


def totals(flows: dict) -> tuple[int, int]:
    return sum(r for r, _ in flows.values()), sum(s for _, s in flows.values())


def entry_flows(entry: NodeStatus) -> dict:
    return {(f.family, f.local.ip, f.local.port, f.remote.ip, f.remote.port): (f.retransmits, f.synack_retransmits)
            for f in entry.top_flows}


def running(e: NodeStatus) -> bool:
    return e.phase == "Running"


def plugin_command(*args: str) -> list[str]:
    """`kubectl retransmit ARGS --operator-namespace retransmit-system` (a global flag after
    the subcommand, as kubectl users type them)."""
    return [PLUGIN, *args, "--operator-namespace", SYSTEM_NS]


def plugin(control_plane: Any, *args: str, kubeconfig: Any = None, timeout: float = 300,
           **kwargs: Any) -> subprocess.CompletedProcess:
    """The plugin run to completion against the test cluster (as admin, or as the user of
    another `kubeconfig`)."""
    env = control_plane.env() if kubeconfig is None else {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(plugin_command(*args), capture_output=True, text=True, env=env,
                          timeout=timeout, **kwargs)


def one_line(done: subprocess.CompletedProcess) -> str:
    """The plugin's error: exactly one line on stderr."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]
