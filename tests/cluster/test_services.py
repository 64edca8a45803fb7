"""Services routed by the real kube-proxy (nftables mode, tests/harness/kubeproxy.py): a
client pod on node-a reaches a server pod on node-b through a dual-stack Service's
ClusterIPs, and through its NodePort on node-b's addresses, with loss both ways.

The client's sockets talk to the Service's address (the kernel's DNAT is invisible to them),
so the retransmits of the client-side flows name the Service; node-a's agent reads the
backend kube-proxy chose from the node's conntrack table (agent/conntrack.py) while the
connection is there, so they name the server pod too. The server's sockets see the client
pod's own address through a ClusterIP (no masquerade inside the cluster CIDR), and node-b's
(the node that took the connection, SNAT as with externalTrafficPolicy Cluster) through the
NodePort. Ground truth: the reference counter on the same tracepoints, per flow, per pod and
per Service.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections import Counter

import pytest

from retransmit_agent.conntrack import find_backends, read_table
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.services import dual_stack_service, wait_backends_listed, wait_service_counted
from tests.harness.tracecluster import NODE_A, NODE_B, Pods, expected, plugin, running, totals

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

SERVICE = "web"
PORT_NAME = "bulk"
SERVICE_PORT = 8080
TARGET_PORT = 5201


class ServiceSetup:
    """The server pod on node-b behind the Service, the client pod on node-a, a trace of
    their namespace with both agents attached."""

    def __init__(self, kube, core, namespace, node_simulator, traces):
        pods = Pods(core, node_simulator, namespace, node=NODE_A, server_node=NODE_B)
        self.namespace, self.server, self.client = namespace, pods.server, pods.client
        self.server_ips, self.client_ips = pods.server_ips, pods.client_ips
        self.svc = dual_stack_service(core, namespace, SERVICE, {"app": "server"}, port_name=PORT_NAME,
                                      port=SERVICE_PORT, target_port=TARGET_PORT)
        # The EndpointSlice controller (controller-manager) publishes the server pod's addresses.
        wait_backends_listed(kube, namespace, SERVICE, set(self.server_ips))
        self.node_b = node_simulator.nodes_by_name[NODE_B]
        self.trace = traces(namespaces=[namespace])
        for node in (NODE_A, NODE_B):
            self.trace.wait_entry(f"the agent on {node} attached", running, node=node)

    def backend_of(self, family: str) -> str:
        return next(ip for ip in self.server_ips if (":" in ip) == (family == "IPv6"))

    def lossy_traffic(self, reference, targets: list) -> tuple[dict, dict]:
        """2 connections through each (address, port) of `targets` under 10% loss arriving at
        either pod; the reference's client-side and server-side flows."""
        before = reference.read()
        self.server.random_loss(10)
        self.client.random_loss(10)
        try:
            for ip, port in targets:
                # The server listens on [::] (both families) at the targetPort; kube-proxy's DNAT
                # (and, for replies, the bridge's conntrack) is all that joins the two.
                podtraffic.bulk(self.server, self.client, ip, port, connections=2, nbytes=1 << 20,
                                listen_ip="::", listen_port=TARGET_PORT)
        finally:
            self.server.clear_loss()
            self.client.clear_loss()
        self.server.wait_quiet()
        self.client.wait_quiet()
        after = reference.read()
        return expected(after, set(self.client_ips), before), expected(after, set(self.server_ips), before)


def _check_named_and_counted(setup: ServiceSetup, targets: list, client_flows: dict, server_flows: dict,
                             server_may_see: set, control_plane) -> None:
    namespace = setup.namespace
    per_target = Counter()
    for (_family, _lip, _lport, rip, rport), (r, s) in client_flows.items():
        assert (rip, rport) in targets, f"a client flow not towards the Service: {rip}:{rport}"
        per_target[(rip, rport)] += r + s
    # Loss on every way in, so each one's flows retransmitted (else this test shows nothing).
    assert set(per_target) == set(targets) and all(per_target.values()), per_target
    want_service = sum(per_target.values())
    seen_by_server = {rip for (_f, _l, _p, rip, _rp) in server_flows}
    assert seen_by_server and seen_by_server <= server_may_see, server_flows
    want_pods = {(namespace, "client"): want_service,
                 (namespace, "server"): sum(r + s for r, s in server_flows.values())}
    want = totals({**client_flows, **server_flows})

    summary = wait_service_counted(lambda: (setup.trace.get().get("status") or {}).get("summary"), namespace,
                                   SERVICE, client_flows=client_flows, want_pods=want_pods, want_totals=want)

    named = [f for f in summary["topFlows"] if f["local"].get("pod") == "client"]
    for flow in named:
        remote = flow["remote"]
        assert (remote.get("service"), remote.get("namespace"), remote.get("servicePort")) == \
            (SERVICE, namespace, PORT_NAME), flow
        assert (remote["ip"], remote["port"]) in targets, flow
        # The backend kube-proxy chose: the server pod, at the targetPort, in the flow's family.
        assert remote["backend"] == {"ip": setup.backend_of(flow["family"]), "port": TARGET_PORT,
                                     "pod": "server", "namespace": namespace}, flow
    for flow in (f for f in summary["topFlows"] if f["local"].get("pod") == "server"):
        remote = flow["remote"]
        assert "backend" not in remote, flow   # the accepting side: nothing was translated for it
        if remote["ip"] in setup.client_ips:
            assert (remote.get("pod"), remote.get("namespace")) == ("client", namespace), flow
        else:
            assert remote.get("node") == NODE_B, flow
    # The path: the client's retransmits went to node-b (the backend's node), none to "unknown".
    pairs = {(p["source"], p["destination"]): p["retransmits"] for p in summary.get("byNodePair") or []}
    assert pairs.get((NODE_A, NODE_B)) == want_service and not any("unknown" in pair for pair in pairs), pairs
    # What a person reads: the plugin names the Service and, after the arrow, its backend.
    shown = plugin(control_plane, "show", setup.trace.name, "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    service_lines = [line for line in shown.stdout.splitlines() if f"(service {namespace}/{SERVICE}:{PORT_NAME}" in line]
    assert len(service_lines) == len(client_flows) and all(
        f"({namespace}/client)" in line and "-> server)" in line for line in service_lines), shown.stdout


def test_a_cluster_ip_routed_by_kube_proxy_names_the_service_and_its_backend_pod_and_counts_exactly(
        kube_proxy, operator, reference, core, kube, namespace, node_simulator, traces, control_plane):
    setup = ServiceSetup(kube, core, namespace, node_simulator, traces)
    targets = [(ip, SERVICE_PORT) for ip in setup.svc["cluster_ips"]]   # both families
    client_flows, server_flows = setup.lossy_traffic(reference, targets)
    assert {family for family, *_ in client_flows} == {"IPv4", "IPv6"}
    _check_named_and_counted(setup, targets, client_flows, server_flows, set(setup.client_ips), control_plane)


def test_a_node_port_on_the_server_nodes_address_names_the_service_and_its_backend_pod_and_counts_exactly(
        kube_proxy, operator, reference, core, kube, namespace, node_simulator, traces, control_plane):
    setup = ServiceSetup(kube, core, namespace, node_simulator, traces)
    node_b = setup.node_b
    targets = [(node_b.ip_v4, setup.svc["node_port"]), (node_b.ip_v6, setup.svc["node_port"])]
    client_flows, server_flows = setup.lossy_traffic(reference, targets)
    assert {family for family, *_ in client_flows} == {"IPv4", "IPv6"}
    _check_named_and_counted(setup, targets, client_flows, server_flows,
                             set(setup.client_ips) | {node_b.ip_v4, node_b.ip_v6}, control_plane)


TLS_HANDSHAKE = """
import socket, ssl, sys
ip, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)
with socket.create_connection((ip, port), timeout=10) as s, context.wrap_socket(s, server_hostname=ip) as tls:
    print(tls.version())
"""


def test_the_kubernetes_service_is_programmed_and_reaches_the_apiserver_from_the_host_and_a_pod(
        kube_proxy, core, control_plane, namespace, node_simulator):
    """kube-proxy drops new connections to service-range addresses it did not program: the
    `kubernetes` Service must be one it programs, so hostNetwork agents (the real node's) and
    pods reach the API through it while kube-proxy runs."""
    svc = core.read_namespaced_service("kubernetes", "default")
    ip, port = svc.spec.cluster_ip, svc.spec.ports[0].port

    def programmed() -> bool:
        listed = subprocess.run(["nft", "list", "set", "ip", "kube-proxy", "cluster-ips"],
                                capture_output=True, text=True)
        return listed.returncode == 0 and ip in listed.stdout
    wait_until(programmed, f"kube-proxy's cluster-ips set to hold the kubernetes Service's {ip}")
    # From the host, as a hostNetwork process: the TLS handshake proves the apiserver answered
    # (its certificate names the ClusterIP), and the node's conntrack shows kube-proxy's DNAT
    # to the simulator's relay, read by the agent's own parser.
    context = ssl.create_default_context(cafile=str(control_plane.ca_file))
    with socket.create_connection((ip, port), timeout=10) as raw, context.wrap_socket(raw, server_hostname=ip) as tls:
        local_ip, local_port = tls.getsockname()[:2]
        found = find_backends(read_table(), [("IPv4", local_ip, local_port, ip, port)])
        assert tls.version()
    relay = node_simulator.nodes[0].ip_v4
    assert [(a.backend.ip, a.backend.port) for a in found.values() if a.backend] == [(relay, 443)], found
    # From a pod's own network namespace, through the host's DNAT.
    podtraffic.create_pod(core, namespace, "probe", NODE_A, {"app": "probe"})
    podtraffic.wait_pod_ips(core, namespace, "probe")
    probe = podtraffic.PodNet.of(node_simulator, namespace, "probe")
    done = subprocess.run(probe.enter(sys.executable, "-c", TLS_HANDSHAKE, ip, str(port), str(control_plane.ca_file)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("TLS"), done.stderr
