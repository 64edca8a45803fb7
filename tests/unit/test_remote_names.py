"""Naming a flow's remote end cluster-wide (operator/remotenames.py): pod, Service (cluster,
external and load-balancer IPs; NodePort on a node's address) with its backend, node, or
outside; in both IP families, and with pods that come and go on a reused address."""

from __future__ import annotations

import pytest

from retransmit_core.api import Backend, Endpoint, Flow, NodeStatus
from retransmit_core.podindex import PodIndex
from retransmit_operator.aggregate import aggregate_summary
from retransmit_operator.remotenames import ClusterNames, ServiceIndex, name_remote, node_addresses

pytestmark = pytest.mark.unit


def service(name, ns="shop", cluster_ips=("198.19.0.110", "fd00:19::110"), ports=(("http", 80, 30080),),
            external=(), lb=(), protocol="TCP"):
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}"},
            "spec": {"clusterIP": cluster_ips[0] if cluster_ips else "None", "clusterIPs": list(cluster_ips),
                     "externalIPs": list(external),
                     "ports": [{"name": n, "port": p, "nodePort": np, "protocol": protocol} for n, p, np in ports]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb]}}}


NODES = node_addresses([{"metadata": {"name": "node-b"},
                         "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.20"},
                                                  {"type": "InternalIP", "address": "fd00::20"},
                                                  {"type": "Hostname", "address": "node-b"}]}}])


def pods():
    index = PodIndex()
    index.observe({"metadata": {"name": "db", "namespace": "shop", "uid": "db"}, "spec": {"nodeName": "node-b"},
                   "status": {"phase": "Running", "podIP": "198.18.1.5", "podIPs": [{"ip": "198.18.1.5"}]}})
    return index


def services(*objects):
    index = ServiceIndex()
    for obj in objects:
        index.observe(obj)
    return index


def remote(ip, port, svc=None):
    return name_remote(Endpoint(ip=ip, port=port), pods(), svc if svc is not None else services(service("web")), NODES)


def test_a_cluster_ip_names_the_service_and_the_port_name_in_both_families():
    for ip in ("198.19.0.110", "fd00:19:0::110", "::ffff:198.19.0.110"):
        end = remote(ip, 80)
        assert (end.service, end.namespace, end.service_port, end.pod, end.outside) == ("web", "shop", "http", None, None)
    assert remote("198.19.0.110", 8080).service_port is None   # its address, not one of its ports


def test_external_and_load_balancer_ips_name_the_service_and_udp_ports_do_not_count():
    svc = services(service("edge", cluster_ips=("198.19.0.7",), external=("198.18.9.9",), lb=("198.18.9.10",),
                           ports=(("https", 443, None),)))
    assert remote("198.18.9.9", 443, svc).service == "edge" and remote("198.18.9.10", 443, svc).service == "edge"
    dns = services(service("dns", cluster_ips=("198.19.0.10",), ports=(("dns", 53, None),), protocol="UDP"))
    assert remote("198.19.0.10", 53, dns).service_port is None


def test_a_node_port_on_a_nodes_address_names_the_service_and_the_node():
    end = remote("198.18.0.20", 30080)
    assert (end.service, end.service_port, end.node) == ("web", "http", "node-b")
    assert (remote("fd00::20", 22).node, remote("fd00::20", 22).service) == ("node-b", None)


def test_a_pod_wins_and_an_address_of_nobody_is_outside():
    end = remote("198.18.1.5", 5432)
    assert (end.pod, end.namespace, end.service) == ("db", "shop", None)
    outside = remote("203.0.113.9", 443)
    assert outside.outside is True and not (outside.pod or outside.node or outside.service)


def test_a_node_port_on_the_agents_own_node_names_the_service_and_keeps_the_node():
    own = Endpoint(ip="198.18.0.30", port=30080, node="node-a")
    end = name_remote(own, pods(), services(service("web")), NODES)
    assert (end.service, end.namespace, end.service_port, end.node) == ("web", "shop", "http", "node-a")


def test_an_end_the_agent_named_stays_and_a_deleted_service_is_forgotten():
    named = Endpoint(ip="198.19.0.110", port=80, node="node-a")
    assert name_remote(named, pods(), services(service("web")), NODES) == named
    index = services(service("web"))
    index.observe(service("web"), deleted=True)
    assert remote("198.19.0.110", 80, index).outside is True


def test_the_summary_names_service_ends_and_counts_the_busiest_services():
    flows = [Flow(local=Endpoint(ip="198.18.1.9", port=40000 + i), remote=Endpoint(ip=ip, port=80),
                  family="IPv4", retransmits=n)
             for i, (ip, n) in enumerate([("198.19.0.110", 7), ("198.19.0.110", 5), ("198.19.0.111", 3),
                                          ("203.0.113.9", 9)])]
    names = ClusterNames(pods(), services(service("web"), service("api", cluster_ips=("198.19.0.111",))), NODES)
    summary = aggregate_summary([NodeStatus(node="node-a", top_flows=flows)], 1, 10, pods(), names=names)
    assert [(s.namespace, s.service, s.retransmits) for s in summary.top_services] == [("shop", "web", 12), ("shop", "api", 3)]
    by_port = {f.local.port: f.remote for f in summary.top_flows}
    assert by_port[40000].service == "web" and by_port[40003].outside is True


def test_an_updated_service_drops_its_old_addresses_and_node_ports_and_keeps_anothers():
    index = services(service("web"), service("api", cluster_ips=("198.19.0.111",), ports=(("grpc", 9090, 30090),)))
    index.observe(service("web", cluster_ips=("198.19.0.120",), ports=(("http", 80, 30081),)))
    assert index.at("198.19.0.110") is None and index.at("198.19.0.120").name == "web"
    assert index.node_port(30080) is None and index.node_port(30081).name == "web"
    assert index.at("198.19.0.111").name == "api" and index.node_port(30090).name == "api"
    index.observe(service("api", cluster_ips=("198.19.0.111",)), deleted=True)
    assert index.at("198.19.0.111") is None and len(index) == 1


def test_a_service_ends_backend_is_named_as_the_pod_or_node_that_has_its_address():
    svc = services(service("web"))
    by_pod = name_remote(Endpoint(ip="198.19.0.110", port=80, backend=Backend(ip="198.18.1.5", port=5432)),
                         pods(), svc, NODES)
    assert (by_pod.service, by_pod.service_port) == ("web", "http")
    assert by_pod.backend == Backend(ip="198.18.1.5", port=5432, pod="db", namespace="shop")
    host = name_remote(Endpoint(ip="fd00:19::110", port=80, backend=Backend(ip="fd00:0::20", port=6443)),
                       pods(), svc, NODES)
    assert (host.service, host.backend.node, host.backend.pod) == ("web", "node-b", None)
    bare = name_remote(Endpoint(ip="198.19.0.110", port=80, backend=Backend(ip="203.0.113.7", port=80)),
                       pods(), svc, NODES)
    assert bare.backend == Backend(ip="203.0.113.7", port=80)   # no pod or node has it: the address alone


def test_a_node_port_in_either_family_names_the_service_and_the_backend():
    for node_ip in ("198.18.0.20", "fd00::20"):
        end = name_remote(Endpoint(ip=node_ip, port=30080, backend=Backend(ip="198.18.1.5", port=5432)),
                          pods(), services(service("web")), NODES)
        assert (end.service, end.service_port, end.node, end.backend.pod) == ("web", "http", "node-b", "db")


def test_a_dual_stack_service_is_named_by_either_address_and_an_ipv4_only_one_by_its_own():
    svc = services(service("web"), service("v4only", cluster_ips=("198.19.0.120",)))
    assert remote("fd00:19::110", 80, svc).service == "web" and remote("198.19.0.110", 80, svc).service == "web"
    assert remote("198.19.0.120", 80, svc).service == "v4only"
    assert remote("fd00:19::120", 80, svc).outside is True


def test_a_reused_pod_address_names_the_pod_that_has_it_now_and_a_gone_one_is_forgotten():
    index = pods()
    index.observe({"metadata": {"name": "db", "namespace": "shop", "uid": "db"}}, deleted=True)
    index.observe({"metadata": {"name": "cache", "namespace": "ops", "uid": "cache"}, "spec": {"nodeName": "node-b"},
                   "status": {"phase": "Running", "podIP": "198.18.1.5", "podIPs": [{"ip": "198.18.1.5"}]}})
    end = name_remote(Endpoint(ip="198.18.1.5", port=5432), index, services(), NODES)
    assert (end.pod, end.namespace) == ("cache", "ops")
    # The new pod starts before the old one's deletion is seen: the newer holder wins.
    index.observe({"metadata": {"name": "cache-2", "namespace": "ops", "uid": "cache-2"}, "spec": {"nodeName": "node-b"},
                   "status": {"phase": "Running", "podIP": "198.18.1.5", "podIPs": [{"ip": "198.18.1.5"}]}})
    assert name_remote(Endpoint(ip="198.18.1.5", port=5432), index, services(), NODES).pod == "cache-2"
    # Both gone: the address is nobody's now (not a node's either).
    for uid in ("cache", "cache-2"):
        index.observe({"metadata": {"name": uid, "namespace": "ops", "uid": uid}}, deleted=True)
    assert name_remote(Endpoint(ip="198.18.1.5", port=5432), index, services(), NODES).outside is True


def test_a_nodes_address_without_a_node_port_names_the_node_in_both_families():
    for ip in ("198.18.0.20", "fd00::20", "fd00:0:0::20"):
        end = remote(ip, 10250)
        assert (end.node, end.service, end.pod, end.outside) == ("node-b", None, None, None)
