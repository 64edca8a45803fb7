"""The chart on a real node: kubelet + containerd on this host (tests/harness/realnode.py) run
the project's images as real containers, with the images, mounts, probes, securityContext and
resource limits the chart and the operator render (the node simulator applies none of them).

The node runs kube-proxy (nftables mode, tests/harness/kubeproxy.py), so the operator and the
agents reach the API server through the `kubernetes` Service's ClusterIP as on any cluster.

One module, in order: helm install with the chart's defaults (security mode auto: agents
with BPF and PERFMON only, as this 6.18 kernel allows), a hostNetwork pod's flows named as
that pod from their sockets' cgroup, a Service routed by the node's kube-proxy named with
its backend pod, then the privileged security mode
with the operator at an arbitrary uid, then auto on a runtime that withholds CAP_PERFMON from
unprivileged containers (the agent finds it may not load BPF, asks for privileged, and a
privileged agent takes the node over), then helm uninstall and the node's teardown, compared
with the host as it was before. Each trace's agent counts lossy
IPv4, IPv6 and SYN-ACK traffic between two pods of the node with addresses of their own; its
node report must equal the reference counter.

Test values (beside the chart's defaults): the local images with pullPolicy Never (no
registry), and the operator pinned to the real node (simulated nodes may share the cluster).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime
from typing import Any, Optional

import kubernetes
import pytest

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION, NodeStatus
from retransmit_core.naming import (
    agent_selector_labels, daemonset_name, privileged_daemonset_name, report_name,
)
from retransmit_operator.privilege import recorded_privileged_nodes
from tests.deploy.images import AGENT_IMAGE, OPERATOR_IMAGE, build, chart_values
from tests.deploy.kube import CHART, helm, kubectl, unique
from tests.harness import podtraffic
from tests.harness.controlplane import wait_gone, wait_until
from tests.harness.kubeproxy import KubeProxy, real_node_network
from tests.harness.realnode import BRIDGE, NODE_IP, NODE_IP_V6, SANDBOX_IMAGE, RealNode
from tests.harness.realnode_host import HostState
from tests.harness.refcount import ReferenceCounter, per_flow, succeeded
from tests.harness.services import dual_stack_service, wait_backends_listed, wait_service_counted

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1500)]

ARBITRARY_UID = 1000680000          # as OpenShift's restricted-v2 SCC assigns, with gid 0
TEST_LABEL = "rtrace.dev/real-node-test"


@pytest.fixture(scope="module")
def images() -> list[str]:
    """Both images as the tree is now (layers cached: seconds when nothing changed), and the
    node's runtime packages."""
    build("real-node-tools")
    return [OPERATOR_IMAGE, AGENT_IMAGE]


class Node:
    """The started RealNode, its kube-proxy and the host as it was before both started."""

    def __init__(self, node: RealNode, proxy: KubeProxy, before: HostState) -> None:
        self.node, self.proxy, self.before = node, proxy, before

    def host_now(self) -> HostState:
        return HostState.capture(self.node.state, re.compile(f"^{BRIDGE}$"))


@pytest.fixture(scope="module")
def real(control_plane, images):
    node = RealNode(control_plane, images=images)
    before = HostState.capture(node.state, re.compile(f"^{BRIDGE}$"))
    node.start()
    print(f"\nreal node set-up {node.timings['total']:.1f}s: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in node.timings.items() if k != "total"))
    try:
        proxy = KubeProxy(control_plane.kubeconfig, real_node_network(node), workdir=node.state).start()
    except BaseException:
        node.stop()
        raise
    yield Node(node, proxy, before)
    proxy.stop(verify=False)     # the teardown test stops it first, and checks
    node.stop()


@pytest.fixture
def core(kube):
    return kubernetes.client.CoreV1Api(kube)


@pytest.fixture(scope="module")
def reference():
    with ReferenceCounter() as ref:
        yield ref


class Release:
    """One helm release of the chart, its operator pinned to the real node."""

    def __init__(self, cp, node: RealNode) -> None:
        self.cp, self.node = cp, node
        self.name = unique("rn")
        self.ns = unique("rtrace-rn")
        self.values = ["--set", f"namespace.name={self.ns}", "--set", f"fullnameOverride={self.name}",
                       *chart_values("Never"),
                       "--set-json", f"operator.nodeSelector={json.dumps({'kubernetes.io/hostname': node.name})}"]

    def install(self, *extra: str) -> None:
        helm(self.cp, "install", self.name, str(CHART), *self.values, *extra, "--wait", "--timeout", "300s")

    def upgrade(self, *extra: str) -> None:
        helm(self.cp, "upgrade", self.name, str(CHART), *self.values, *extra, "--wait", "--timeout", "300s")

    def uninstall(self) -> None:
        helm(self.cp, "uninstall", self.name, "--wait", "--timeout", "300s")

    def pods(self, **labels: str) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        out = kubectl(self.cp, "get", "pods", "-n", self.ns, "-l", selector, "-o", "json")
        return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]


@pytest.fixture(scope="module")
def release(control_plane, real):
    rel = Release(control_plane, real.node)
    try:
        rel.install()
        yield rel
    finally:
        helm(control_plane, "uninstall", rel.name, "--wait", "--timeout", "300s", check=False)


# ---------------------------------------------------------------- helpers

def ready(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def container_status(pod: dict, name: str) -> dict:
    return next(c for c in pod["status"]["containerStatuses"] if c["name"] == name)


def proc_status(pid: int) -> dict[str, str]:
    lines = open(f"/proc/{pid}/status").read().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def mounts(pid: int) -> dict[str, tuple[str, list[str]]]:
    """mount point -> (mount options, propagation fields such as master:N), as the process
    sees them (its container's mount namespace)."""
    out = {}
    for line in open(f"/proc/{pid}/mountinfo"):
        fields = line.split()
        out[fields[4]] = (fields[5], fields[6:fields.index("-")])
    return out


def main_pid(node: RealNode, pod: dict, container: str) -> int:
    """The container's first process (its entry point), from its cgroup."""
    procs = (node.container_cgroup(pod, container, "pids") / "cgroup.procs").read_text().split()
    assert procs, f"container {container} of {pod['metadata']['name']} has no process"
    return min(int(p) for p in procs)


def chart_agent_memory_limit() -> int:
    """agent.resources.limits.memory of the chart's values, in bytes (Ki/Mi/Gi)."""
    import yaml

    value = yaml.safe_load((CHART / "values.yaml").read_text())["agent"]["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)([KMG]i)", value).groups()
    return int(number) * {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def capabilities(mask: str) -> set[str]:
    from tests.harness.runc_capfilter import CAPABILITIES

    value = int(mask, 16)
    return {name for bit, name in enumerate(CAPABILITIES) if value >> bit & 1}


class PodPair:
    """A server and a client pod on the real node (the sandbox image, nothing else), each
    with its own network namespace and IPv4 + IPv6 addresses from the node's CNI bridge."""

    def __init__(self, core: Any, node: RealNode, namespace: str) -> None:
        self.namespace = namespace
        for name in ("server", "client"):
            core.create_namespaced_pod(namespace, {
                "metadata": {"name": name, "labels": {"app": name, TEST_LABEL: "traffic"}},
                "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "main", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never"}]}})
        self.server_ips = podtraffic.wait_pod_ips(core, namespace, "server", timeout=120)
        self.client_ips = podtraffic.wait_pod_ips(core, namespace, "client", timeout=120)
        uid = {n: core.read_namespaced_pod(n, namespace).metadata.uid for n in ("server", "client")}
        self.server = podtraffic.PodNet(node.netns_path(uid["server"]))
        self.client = podtraffic.PodNet(node.netns_path(uid["client"]))

    @property
    def ips(self) -> set[str]:
        return set(self.server_ips + self.client_ips)

    @property
    def owners(self) -> dict[str, str]:
        return {**{ip: "server" for ip in self.server_ips}, **{ip: "client" for ip in self.client_ips}}

    def lossy_traffic(self, port: int) -> None:
        """Duplex bulk over IPv4 and IPv6 with 10% loss arriving at either pod, then SYN-ACK
        retransmits (the server never gets the handshake's last ACK), then quiet."""
        self.server.random_loss(10)
        self.client.random_loss(10)
        try:
            for i, ip in enumerate(self.server_ips):
                podtraffic.bulk(self.server, self.client, ip, port + i, connections=3, nbytes=1 << 20)
        finally:
            self.server.clear_loss()
            self.client.clear_loss()
        podtraffic.synack(self.server, self.client, self.server_ips[0], port + 10, connections=2)
        for pod in (self.server, self.client):
            pod.wait_quiet()


def entry_flows(entry: NodeStatus) -> dict:
    return {(f.family, f.local.ip, f.local.port, f.remote.ip, f.remote.port): (f.retransmits, f.synack_retransmits)
            for f in entry.top_flows}


class Trace:
    def __init__(self, cp, node: RealNode, namespace: str, operator_namespace: str) -> None:
        self.cp, self.node, self.operator_namespace = cp, node, operator_namespace
        self.name = unique("rn-trace")
        self.objects = kubernetes.client.CustomObjectsApi(cp.api_client())
        self.objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": self.name},
            "spec": {"namespaces": [namespace], "nodeSelector": {"kubernetes.io/hostname": node.name},
                     "reportInterval": "2s", "topFlows": 100}})

    def entry(self) -> Optional[NodeStatus]:
        """The node's report (RetransmitNodeReport) as its agent wrote it."""
        try:
            report = self.objects.get_namespaced_custom_object(GROUP, VERSION, self.operator_namespace, REPORT_PLURAL,
                                                               report_name(self.name, self.node.name))
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise
        return NodeStatus.model_validate(report["spec"])

    def wait_entry(self, what: str, predicate, timeout: float = 180) -> NodeStatus:
        def check():
            e = self.entry()
            return e if e is not None and predicate(e) else None
        try:
            return wait_until(check, f"trace {self.name} on {self.node.name}: {what}", timeout=timeout, interval=0.5)
        except TimeoutError as e:
            raise AssertionError(f"{e}; last entry: {self.entry()}") from None

    def delete(self) -> None:
        self.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, self.name)


def run_trace_and_compare(cp, release: Release, real: Node, reference, core, namespace: str, port: int,
                          while_running=None) -> dict:
    """A trace on the real node, lossy traffic between two pods there, the node's report equal
    to the reference; returns the agent pod and the figures measured on it. `while_running`
    (trace) checks more before the trace is deleted."""
    node = real.node
    pods = PodPair(core, node, namespace)
    trace = Trace(cp, node, namespace, release.ns)
    labels = agent_selector_labels(trace.name)
    agent = wait_until(lambda: next((p for p in release.pods(**labels) if ready(p)), None),
                       f"the agent pod of {trace.name} Running and Ready", timeout=240)
    assert agent["spec"]["nodeName"] == node.name
    assert container_status(agent, "agent")["image"].endswith(AGENT_IMAGE.split("/", 1)[1])
    trace.wait_entry("agent attached and reporting", lambda e: e.phase == "Running")

    before = reference.read()
    pods.lossy_traffic(port)
    after = reference.read()
    want = per_flow(after - before, lambda e: succeeded(e) and e.local_ip in pods.ips)
    want_r, want_s = sum(r for r, _ in want.values()), sum(s for _, s in want.values())
    assert want_r > 0 and want_s > 0, f"the loss made no retransmits ({want_r}, {want_s}): the test proves nothing"
    assert {flow[0] for flow in want} == {"IPv4", "IPv6"}

    entry = trace.wait_entry(f"{want_r} retransmits and {want_s} SYN-ACK retransmits, flow by flow",
                             lambda e: entry_flows(e) == want)
    assert (entry.retransmits, entry.synack_retransmits) == (want_r, want_s)
    owners = pods.owners
    for flow in entry.top_flows:     # both ends attributed to their pods
        assert (flow.local.pod, flow.local.namespace) == (owners[flow.local.ip], namespace), flow
        assert (flow.remote.pod, flow.remote.namespace) == (owners[flow.remote.ip], namespace), flow
    want_pods = Counter()
    for (_family, local_ip, *_rest), (r, s) in want.items():
        want_pods[(namespace, owners[local_ip])] += r + s
    assert {(p.namespace, p.pod): p.retransmits for p in entry.top_pods or []} == dict(want_pods)

    # The agent as a real container: its own mounts, read-only root, kubectl logs through the kubelet.
    agent = core.api_client.sanitize_for_serialization(core.read_namespaced_pod(agent["metadata"]["name"], release.ns))
    pid = main_pid(node, agent, "agent")
    seen = mounts(pid)
    assert {"/sys/kernel/debug", "/sys/kernel/tracing", "/sys/kernel/btf", "/tmp"} <= set(seen), sorted(seen)
    assert "ro" in seen["/"][0].split(","), seen["/"]
    for path in ("/sys/kernel/debug", "/sys/kernel/tracing"):   # mountPropagation: HostToContainer
        assert "ro" in seen[path][0].split(",") and any(f.startswith("master:") for f in seen[path][1]), seen[path]
    logs = kubectl(cp, "logs", "-n", release.ns, agent["metadata"]["name"], "--timestamps").stdout
    attached = next((line for line in logs.splitlines() if "kernel program attached" in line), None)
    assert attached, f"kubectl logs of the agent has no 'kernel program attached' line:\n{logs[-3000:]}"

    status = container_status(agent, "agent")
    assert status["restartCount"] == 0, status
    started = datetime.fromisoformat(status["state"]["running"]["startedAt"].replace("Z", "+00:00"))
    attached_at = datetime.fromisoformat(attached.split()[0].replace("Z", "+00:00"))
    peak, limit = node.memory_peak_and_limit(node.container_cgroup(agent, "agent", "memory"))
    assert limit == chart_agent_memory_limit(), f"the agent's cgroup limit {limit} is not the chart's"
    figures = {
        "retransmits": want_r, "synack_retransmits": want_s, "flows": len(want),
        "agent_peak_memory_mib": round(peak / 2**20, 1),
        "agent_memory_limit_mib": limit / 2**20,
        "agent_start_to_attached_s": (attached_at - started).total_seconds(),
        "agent_restarts": status["restartCount"],
        "agent_capabilities": sorted(capabilities(proc_status(pid)["CapEff"])),
        "agent_uid": proc_status(pid)["Uid"].split()[0],
    }

    if while_running is not None:
        while_running(trace)
    # Deleting the trace removes its agent pods (the DaemonSets go with their owner).
    trace.delete()
    wait_until(lambda: not release.pods(**labels), f"the agent pods of {trace.name} gone", timeout=240)
    return figures


# ---------------------------------------------------------------- the tests

def test_default_install_runs_on_real_containers_and_counts_like_the_reference(
        control_plane, real, release, reference, core, namespace):
    operator = wait_until(lambda: next((p for p in release.pods(**{"app.kubernetes.io/component": "operator"})
                                        if ready(p)), None), "the operator pod Ready", timeout=300)
    assert operator["spec"]["nodeName"] == real.node.name
    assert container_status(operator, "operator")["image"].endswith(OPERATOR_IMAGE.split("/", 1)[1])
    pid = main_pid(real.node, operator, "operator")
    assert proc_status(pid)["Uid"].split()[0] == "65532"          # the image's user: non-root
    assert "ro" in mounts(pid)["/"][0].split(",")                   # read-only root filesystem
    assert capabilities(proc_status(pid)["CapEff"]) == set()

    def capabilities_only(trace: Trace) -> None:
        # This kernel and runtime allow BPF with capabilities: no node needs a privileged agent.
        apps = kubernetes.client.AppsV1Api(core.api_client)
        main = apps.api_client.sanitize_for_serialization(apps.read_namespaced_daemon_set(
            daemonset_name(trace.name), release.ns))
        assert recorded_privileged_nodes(main) == {}
        assert not apps.list_namespaced_daemon_set(
            release.ns, field_selector=f"metadata.name={privileged_daemonset_name(trace.name)}").items

    figures = run_trace_and_compare(control_plane, release, real, reference, core, namespace, port=5401,
                                    while_running=capabilities_only)
    assert figures["agent_uid"] == "0"
    # The chart's default asks for BPF, PERFMON and SYS_RESOURCE; this host cannot grant
    # SYS_RESOURCE (the test-only runc wrapper drops it), and the agent counts with the other two.
    assert figures["agent_capabilities"] == ["BPF", "PERFMON"]
    print(f"\nagent of the default security mode (auto) on the real node: {figures}")
    operator = core.api_client.sanitize_for_serialization(
        core.read_namespaced_pod(operator["metadata"]["name"], release.ns))
    assert ready(operator) and container_status(operator, "operator")["restartCount"] == 0


def test_a_host_network_pods_flows_are_named_as_that_pod(control_plane, real, release, reference, core, namespace):
    """runc (cgroupfs driver) on this hybrid host puts each container into the unified
    hierarchy too (kubepods/<qos>/pod<uid>/<id>): a hostNetwork pod's sockets carry that
    cgroup, the agent (the host's /sys/fs/cgroup mounted read-only) names them as the pod, and
    the trace of its namespace counts them. The pod's traffic is a host process that joins
    the container's cgroup (as `kubectl exec` would) and connects from the node's address to
    a server pod of the node, whose namespace drops 10% of what arrives."""
    node = real.node
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "edge", "labels": {"app": "edge", TEST_LABEL: "traffic"}},
        "spec": {"nodeName": node.name, "hostNetwork": True, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never"}]}})
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "server", "labels": {"app": "server", TEST_LABEL: "traffic"}},
        "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never"}]}})
    server_ips = podtraffic.wait_pod_ips(core, namespace, "server", timeout=120)
    edge = wait_until(lambda: (lambda p: p if ready(p) else None)(core.api_client.sanitize_for_serialization(
        core.read_namespaced_pod("edge", namespace))), "the hostNetwork pod Ready", timeout=120)
    container = node.container_cgroup(edge, "main", "unified")   # LookupError: runc left it out of cgroup v2
    server = podtraffic.PodNet(node.netns_path(core.read_namespaced_pod("server", namespace).metadata.uid))

    trace = Trace(control_plane, node, namespace, release.ns)
    entry = trace.wait_entry("agent attached and reporting", lambda e: e.phase == "Running")
    assert entry.socket_owners == "cgroup", entry.kernel_checks

    port, server_ip = 5451, server_ips[0]
    before = reference.read()
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.random_loss(10)
    try:
        srv = server.python("serve", "--ip", server_ip, "--port", str(port), "--connections", "3",
                            "--bytes", str(1 << 20), **pipes)
        podtraffic._wait_line(srv, "listening")
        client = subprocess.Popen(["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                                   str(container / "cgroup.procs"), sys.executable, "-m", "tests.harness.hostclient",
                                   "--local-ip", NODE_IP, "--server-ip", server_ip, "--port", str(port)],
                                  cwd=str(podtraffic.ROOT), **pipes)
        podtraffic._finish(client)
        podtraffic._finish(srv)
    finally:
        server.clear_loss()
    server.wait_quiet()

    def want() -> dict:
        return per_flow(reference.read() - before, lambda e: succeeded(e) and (
            e.local_ip == server_ip or (e.local_ip == NODE_IP and e.remote_ip == server_ip)) and port in (
            e.local_port, e.remote_port))
    entry = trace.wait_entry("the hostNetwork pod's and the server's flows, flow by flow",
                             lambda e: {k: v for k, v in entry_flows(e).items() if port in (k[2], k[4])} == want())
    mine = [f for f in entry.top_flows if f.local.ip == NODE_IP]
    assert mine and sum(f.retransmits for f in mine) > 0, "the hostNetwork pod retransmitted nothing"
    assert {(f.local.pod, f.local.namespace) for f in mine} == {("edge", namespace)}
    pods = {(p.namespace, p.pod): p.retransmits for p in entry.top_pods}
    assert pods[(namespace, "edge")] == sum(f.retransmits + f.synack_retransmits for f in mine)
    trace.delete()


SERVICE, SERVICE_PORT_NAME, SERVICE_PORT, SERVICE_TARGET_PORT = "web", "bulk", 8080, 5701


def test_a_service_routed_by_the_nodes_kube_proxy_names_the_service_and_its_backend_pod(
        control_plane, real, release, reference, core, namespace):
    """A client pod reaches a server pod of the node through a dual-stack Service's
    ClusterIPs and through its NodePort on the node's own addresses, translated by the node's
    kube-proxy, with 10% loss arriving at either pod. The client's sockets know only the
    Service's address; the agent (a real container, hostNetwork) reads the backend from the
    node's conntrack table, and the operator (a real pod reaching the API server through the
    `kubernetes` ClusterIP) names the Service, its port and the backend pod. Per-flow, per-pod
    and per-Service counts equal the reference counter."""
    node = real.node
    pods = PodPair(core, node, namespace)
    svc = dual_stack_service(core, namespace, SERVICE, {"app": "server"}, port_name=SERVICE_PORT_NAME,
                             port=SERVICE_PORT, target_port=SERVICE_TARGET_PORT)
    wait_backends_listed(core.api_client, namespace, SERVICE, set(pods.server_ips))
    targets = [(ip, SERVICE_PORT) for ip in svc["cluster_ips"]] + [
        (NODE_IP, svc["node_port"]), (NODE_IP_V6, svc["node_port"])]
    trace = Trace(control_plane, node, namespace, release.ns)
    trace.wait_entry("agent attached and reporting", lambda e: e.phase == "Running")

    before = reference.read()
    pods.server.random_loss(10)
    pods.client.random_loss(10)
    try:
        for ip, port in targets:    # the server listens on [::] at the targetPort: only kube-proxy's DNAT leads there
            podtraffic.bulk(pods.server, pods.client, ip, port, connections=2, nbytes=1 << 20,
                            listen_ip="::", listen_port=SERVICE_TARGET_PORT)
    finally:
        pods.server.clear_loss()
        pods.client.clear_loss()
    for pod in (pods.server, pods.client):
        pod.wait_quiet()
    counted = reference.read() - before
    client_flows = per_flow(counted, lambda e: succeeded(e) and e.local_ip in pods.client_ips)
    server_flows = per_flow(counted, lambda e: succeeded(e) and e.local_ip in pods.server_ips)
    per_target = Counter()
    for (_family, _lip, _lport, rip, rport), (r, s) in client_flows.items():
        per_target[(rip, rport)] += r + s
    assert set(per_target) == set(targets) and all(per_target.values()), \
        f"every way in must retransmit, else this test shows nothing: {per_target}"
    want_service = sum(per_target.values())
    want_pods = {(namespace, "client"): want_service,
                 (namespace, "server"): sum(r + s for r, s in server_flows.values())}
    print(f"\nretransmits towards {namespace}/{SERVICE} through the real node's kube-proxy, by address: "
          f"{dict(per_target)}; the server's: {want_pods[(namespace, 'server')]}")

    summary = wait_service_counted(
        lambda: (trace.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name).get("status") or {}
                 ).get("summary"), namespace, SERVICE, client_flows=client_flows, want_pods=want_pods)

    server_ip_of = {("IPv6" if ":" in ip else "IPv4"): ip for ip in pods.server_ips}
    for flow in summary["topFlows"]:
        remote = flow["remote"]
        if flow["local"].get("pod") == "client":
            assert (remote.get("service"), remote.get("namespace"), remote.get("servicePort")) == \
                (SERVICE, namespace, SERVICE_PORT_NAME), flow
            assert remote["backend"] == {"ip": server_ip_of[flow["family"]], "port": SERVICE_TARGET_PORT,
                                         "pod": "server", "namespace": namespace}, flow
        elif flow["local"].get("pod") == "server":
            # Through a ClusterIP the client pod's own address (no masquerade inside the cluster
            # CIDR); through the NodePort the node's (SNAT, externalTrafficPolicy Cluster).
            assert "backend" not in remote, flow
            assert (remote.get("pod") == "client" if remote["ip"] in pods.client_ips
                    else remote.get("node") == node.name), flow
    trace.delete()


def test_privileged_mode_with_the_operator_at_an_arbitrary_uid(control_plane, real, release, reference, core,
                                                                 namespace):
    release.upgrade("--set", "agent.securityMode=privileged")
    # OpenShift's restricted-v2 runs the operator as an arbitrary uid with gid 0 and no
    # passwd entry: the same Deployment must come up Ready.
    kubectl(control_plane, "patch", "deployment", "-n", release.ns, release.name, "--type", "merge", "-p",
            json.dumps({"spec": {"template": {"spec": {"securityContext": {
                "runAsUser": ARBITRARY_UID, "runAsGroup": 0}}}}}))
    operator = wait_until(lambda: next((p for p in release.pods(**{"app.kubernetes.io/component": "operator"})
                                        if ready(p) and p["spec"]["securityContext"].get("runAsUser") == ARBITRARY_UID),
                                       None), f"the operator Ready as uid {ARBITRARY_UID}", timeout=300)
    pid = main_pid(real.node, operator, "operator")
    assert proc_status(pid)["Uid"].split()[0] == str(ARBITRARY_UID)
    assert proc_status(pid)["Gid"].split()[0] == "0"

    figures = run_trace_and_compare(control_plane, release, real, reference, core, namespace, port=5501)
    assert {"BPF", "PERFMON", "SYS_ADMIN"} <= set(figures["agent_capabilities"])
    figures["agent_capabilities"] = f"{len(figures['agent_capabilities'])} (privileged)"
    print(f"\nprivileged agent on the real node: {figures}")


def test_auto_mode_falls_back_to_a_privileged_agent_where_the_runtime_withholds_perfmon(
        control_plane, real, release, reference, core, namespace):
    release.upgrade()   # the chart's defaults again: auto
    node = real.node.name

    def privileged_there(trace: Trace) -> None:
        apps = kubernetes.client.AppsV1Api(core.api_client)
        read = lambda name: apps.api_client.sanitize_for_serialization(  # noqa: E731
            apps.read_namespaced_daemon_set(name, release.ns))
        recorded = recorded_privileged_nodes(read(daemonset_name(trace.name)))
        assert set(recorded) == {node} and "CAP_PERFMON" in recorded[node], recorded
        terms = read(privileged_daemonset_name(trace.name))["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]
        status = trace.objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name)["status"]
        assert [(g["nodes"], g["reason"]) for g in status["summary"]["privilegedNodes"]] == [([node], recorded[node])]

    # The runtime gives unprivileged containers no CAP_PERFMON: the capabilities agent really
    # fails to get BPF, says needsPrivileged, and the privileged agent that replaces it counts.
    with real.node.withhold_capabilities("CAP_PERFMON"):
        figures = run_trace_and_compare(control_plane, release, real, reference, core, namespace, port=5601,
                                        while_running=privileged_there)
    assert {"BPF", "PERFMON", "SYS_ADMIN"} <= set(figures["agent_capabilities"])
    figures["agent_capabilities"] = f"{len(figures['agent_capabilities'])} (privileged)"
    print(f"\nauto mode's privileged agent on the real node: {figures}")


def test_helm_uninstall_and_teardown_leave_the_host_as_it_was(control_plane, real, release, core):
    release.uninstall()

    wait_gone(lambda: core.read_namespace(release.ns), f"namespace {release.ns} deleted", timeout=300)
    # The earlier tests' traffic pods go with their namespaces. (Pods of other modules'
    # leftovers, if any, are the node teardown's to drain.)
    wait_until(lambda: not core.list_pod_for_all_namespaces(label_selector=TEST_LABEL).items,
               "this module's traffic pods gone", timeout=300)

    real.proxy.stop()     # KubeProxyError if its tables or the bridge's settings are left behind
    real.node.stop()
    after = real.host_now()
    assert real.before.differences(after) == {}
