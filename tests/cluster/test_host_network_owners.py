"""hostNetwork pods and node processes on simulated nodes, told apart by their sockets' cgroups.

A hostNetwork pod on node-a (the simulator runs its container in a kubepods cgroup of the
host's cgroup v2 hierarchy, as kubelet's cgroupfs driver lays it out) and a node process in a
system.slice unit cgroup both connect from node-a's own address to a server pod on node-b,
whose namespace drops 10% of what arrives: the same local address, only the cgroup tells
who sent. The pod's traffic runs "in" its container (a process that joins the container's
cgroup, as kubectl exec does). Ground truth: the reference counter.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter

import pytest

from retransmit_agent.cgroups import find_cgroup2
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.nodesim.cgroups import SimCgroups, remove_tree
from tests.harness.refcount import succeeded
from tests.harness.tracecluster import NODE_A, NODE_B, running

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

POD_PORT, UNIT_PORT = 5411, 5412
UNIT = "rtrace-probe.service"


def host_network_pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": NODE_A, "hostNetwork": True, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": "pause", "command": ["sleep", "infinity"]}]}}


@pytest.fixture
def server_namespace(core):
    name = f"srv-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.list_namespaced_service_account(name).items, "default ServiceAccount", timeout=60)
    yield name
    core.delete_namespace(name)


@pytest.fixture
def unit_cgroup():
    root, problem = find_cgroup2(("/sys/fs/cgroup/unified", "/sys/fs/cgroup"))
    assert root is not None, f"this test needs the host's cgroup v2 hierarchy: {problem}"
    top = root / f"rtrace-test-{uuid.uuid4().hex[:8]}"
    unit = top / "system.slice" / UNIT
    unit.mkdir(parents=True)
    yield unit
    remove_tree(top, root)


def client_in(cgroup, local_ip: str, server_ip: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(SimCgroups.exec_prefix(cgroup) + [
        sys.executable, "-m", "tests.harness.hostclient", "--local-ip", local_ip, "--server-ip", server_ip,
        "--port", str(port), "--connections", "3", "--bytes", str(1 << 20)],
        cwd=str(podtraffic.ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_host_network_pod_is_named_and_counted_as_a_pod_and_a_node_process_by_its_unit(
        operator, reference, node_simulator, core, namespace, server_namespace, unit_cgroup, traces):
    node_ip = node_simulator.nodes_by_name[NODE_A].ip_v4
    core.create_namespaced_pod(namespace, host_network_pod("edge"))
    podtraffic.create_pod(core, server_namespace, "server", NODE_B, {"app": "server"})
    server_ip = podtraffic.wait_pod_ips(core, server_namespace, "server")[0]
    wait_until(lambda: core.read_namespaced_pod("edge", namespace).status.phase == "Running", "edge running",
               timeout=60)
    server = podtraffic.PodNet.of(node_simulator, server_namespace, "server")
    container = node_simulator.container_cgroup(namespace, "edge", "main")

    # One trace selects the hostNetwork pod's namespace; another keeps both ports, to show names.
    selected = traces(namespaces=[namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    named = traces(filter={"ports": [POD_PORT, UNIT_PORT]}, nodeSelector={"kubernetes.io/hostname": NODE_A})
    for trace in (selected, named):
        entry = trace.wait_entry("agent attached and reporting", running)
        assert entry.socket_owners == "cgroup", entry.kernel_checks

    before = reference.read()
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.random_loss(10)
    try:
        for cgroup, port in ((container, POD_PORT), (unit_cgroup, UNIT_PORT)):
            srv = server.python("serve", "--ip", server_ip, "--port", str(port), "--connections", "3",
                                "--bytes", str(1 << 20), **pipes)
            podtraffic._wait_line(srv, "listening")
            podtraffic._finish(client_in(cgroup, node_ip, server_ip, port))
            podtraffic._finish(srv)
    finally:
        server.clear_loss()
    server.wait_quiet()

    def want(port: int) -> int:
        diff = reference.read() - before
        return sum(n for e, n in diff.items() if succeeded(e) and e.local_ip == node_ip
                   and e.remote_ip == server_ip and e.remote_port == port)

    # The namespaces trace counts exactly the hostNetwork pod's retransmits, as that pod's.
    entry = selected.wait_entry("the pod's retransmits, exactly",
                                lambda e: want(POD_PORT) > 0 and e.retransmits + e.synack_retransmits == want(POD_PORT),
                                timeout=120)
    assert {(p.namespace, p.pod): p.retransmits for p in entry.top_pods} == {(namespace, "edge"): want(POD_PORT)}
    assert entry.top_flows and all((f.local.pod, f.local.namespace, f.local.ip) == ("edge", namespace, node_ip)
                                   for f in entry.top_flows)

    # The other trace names the pod's flows as the pod and the node process's by its unit.
    def flows_named(e) -> bool:
        ours = [f for f in e.top_flows if f.local.ip == node_ip and f.remote.ip == server_ip]
        return {f.remote.port for f in ours} == {POD_PORT, UNIT_PORT} and \
            sum(f.retransmits + f.synack_retransmits for f in ours) == want(POD_PORT) + want(UNIT_PORT)
    entry = named.wait_entry("both kinds of flows", flows_named, timeout=120)
    ours = [f for f in entry.top_flows if f.local.ip == node_ip and f.remote.ip == server_ip]
    assert {(f.local.pod, f.local.namespace, f.local.unit) for f in ours if f.remote.port == POD_PORT} == {
        ("edge", namespace, None)}
    assert {(f.local.pod, f.local.node, f.local.unit) for f in ours if f.remote.port == UNIT_PORT} == {
        (None, NODE_A, UNIT)}
    pods = Counter({(p.namespace, p.pod): p.retransmits for p in entry.top_pods})
    assert pods[(namespace, "edge")] == want(POD_PORT)
    assert not any(pod == UNIT for _ns, pod in pods)
