"""Services routed by the real kube-proxy (nftables mode, tests/harness/kubeproxy.py): a
client pod on node-a reaches a server pod on node-b through a dual-stack Service's
ClusterIPs and through its NodePort on node-b's addresses, with loss both ways.

The client's sockets talk to the Service's address (the kernel's DNAT is invisible to them),
so the retransmits of the client-side flows name the Service; the server's sockets see the
client pod's own address (no masquerade inside the cluster CIDR), so those flows name the
client pod. Ground truth: the reference counter on the same tracepoints.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_A, NODE_B, expected, running, totals

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

SERVICE = "web"
PORT_NAME = "bulk"
SERVICE_PORT = 8080
TARGET_PORT = 5201


def _dual_stack_service(core, namespace: str) -> dict:
    core.create_namespaced_service(namespace, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE},
        "spec": {"type": "NodePort", "selector": {"app": "server"},
                 "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": SERVICE_PORT,
                            "targetPort": TARGET_PORT}]}})
    svc = core.read_namespaced_service(SERVICE, namespace)
    return {"cluster_ips": list(svc.spec.cluster_ips), "node_port": svc.spec.ports[0].node_port}


def _ready_backends(discovery, namespace: str) -> set[str]:
    """The addresses of ready endpoints in the Service's EndpointSlices (both families)."""
    slices = discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={SERVICE}").items
    return {ip for s in slices for e in s.endpoints or []
            if e.conditions is None or e.conditions.ready is not False for ip in e.addresses}


def test_a_service_routed_by_kube_proxy_is_named_on_client_flows_and_counted(
        kube_proxy, operator, reference, core, kube, namespace, node_simulator, traces):
    import kubernetes

    podtraffic.create_pod(core, namespace, "server", NODE_B, {"app": "server"})
    podtraffic.create_pod(core, namespace, "client", NODE_A, {"app": "client"})
    server_ips = podtraffic.wait_pod_ips(core, namespace, "server")
    client_ips = podtraffic.wait_pod_ips(core, namespace, "client")
    server = podtraffic.PodNet.of(node_simulator, namespace, "server")
    client = podtraffic.PodNet.of(node_simulator, namespace, "client")
    svc = _dual_stack_service(core, namespace)
    assert len(svc["cluster_ips"]) == 2 and svc["node_port"], svc
    # The EndpointSlice controller (controller-manager) publishes the server pod's addresses.
    discovery = kubernetes.client.DiscoveryV1Api(kube)
    wait_until(lambda: _ready_backends(discovery, namespace) >= set(server_ips),
               "the Service's EndpointSlices to list the server pod's IPv4 and IPv6 addresses")

    node_b = node_simulator.nodes_by_name[NODE_B]
    # (address the client dials, port) for each way in: both ClusterIPs, the NodePort on both
    # of node-b's addresses.
    targets = [(ip, SERVICE_PORT) for ip in svc["cluster_ips"]]
    targets += [(node_b.ip_v4, svc["node_port"]), (node_b.ip_v6, svc["node_port"])]

    trace = traces(namespaces=[namespace])
    for node in (NODE_A, NODE_B):
        trace.wait_entry(f"the agent on {node} attached", running, node=node)

    before = reference.read()
    server.random_loss(10)
    client.random_loss(10)
    try:
        for ip, port in targets:
            # The server listens on [::] (both families) at the targetPort; kube-proxy's DNAT
            # (and, for replies, the bridge's conntrack) is all that joins the two.
            podtraffic.bulk(server, client, ip, port, connections=2, nbytes=1 << 20,
                            listen_ip="::", listen_port=TARGET_PORT)
    finally:
        server.clear_loss()
        client.clear_loss()
    server.wait_quiet()
    client.wait_quiet()
    after = reference.read()

    client_flows = expected(after, set(client_ips), before)
    per_target = Counter()
    for (_family, _lip, _lport, rip, rport), (r, s) in client_flows.items():
        assert (rip, rport) in targets, f"a client flow not towards the Service: {rip}:{rport}"
        per_target[(rip, rport)] += r + s
    # Loss on every way in, so each one's flows retransmitted (else this test shows nothing).
    assert set(per_target) == set(targets) and all(per_target.values()), per_target
    want_service = sum(per_target.values())
    # The server sees the client pod itself through a ClusterIP, and node-b (the node that took
    # the connection, SNAT as with externalTrafficPolicy Cluster) through the NodePort.
    server_flows = expected(after, set(server_ips), before)
    seen_by_server = {rip for (_f, _l, _p, rip, _rp) in server_flows}
    assert seen_by_server and seen_by_server <= set(client_ips) | {node_b.ip_v4, node_b.ip_v6}, server_flows

    last: dict = {}

    def summary_counts_it():
        summary = last["summary"] = (trace.get().get("status") or {}).get("summary") or {}
        services = {(s["namespace"], s["service"]): s["retransmits"] for s in summary.get("topServices", [])}
        return summary if (services.get((namespace, SERVICE)) == want_service and
                           (summary.get("retransmits"), summary.get("synackRetransmits")) == want) else None
    want = totals({**client_flows, **server_flows})
    try:
        summary = wait_until(summary_counts_it, f"summary.topServices to count {want_service} retransmits "
                             f"towards {namespace}/{SERVICE} and the totals to be {want}", timeout=180)
    except TimeoutError as e:
        seen = last.get("summary") or {}
        raise AssertionError(f"{e}: topServices {seen.get('topServices')}, totals "
                             f"{(seen.get('retransmits'), seen.get('synackRetransmits'))}, client flows "
                             f"{[f for f in seen.get('topFlows', []) if f['local'].get('pod') == 'client']}, "
                             f"reference {client_flows}") from None

    named = [f for f in summary["topFlows"] if f["local"].get("pod") == "client"]
    assert named, summary["topFlows"]
    for flow in named:
        remote = flow["remote"]
        assert (remote.get("service"), remote.get("namespace"), remote.get("servicePort")) == \
            (SERVICE, namespace, PORT_NAME), flow
        assert (remote["ip"], remote["port"]) in targets, flow
    for flow in (f for f in summary["topFlows"] if f["local"].get("pod") == "server"):
        remote = flow["remote"]
        if remote["ip"] in client_ips:
            assert (remote.get("pod"), remote.get("namespace")) == ("client", namespace), flow
        else:
            assert remote.get("node") == NODE_B, flow
    # Every client-side flow the reference saw is there, with its count.
    client_entry = {(f["family"], f["local"]["ip"], f["local"]["port"], f["remote"]["ip"], f["remote"]["port"]):
                    (f["retransmits"], f.get("synackRetransmits", 0)) for f in named}
    assert client_entry == client_flows
