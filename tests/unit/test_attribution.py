"""Local-side attribution: the pod index, hostNetwork and node addresses, the selector -> IP set."""

from pathlib import Path

import pytest

from retransmit_agent.attribution import (
    Owner,
    PodFacts,
    PodIndex,
    PodSelection,
    attribute,
    node_addresses,
    normalize_ip,
    selector_matches,
)
from retransmit_operator.api import LabelSelector

pytestmark = pytest.mark.unit


def pod(name, ns="default", ips=(), labels=None, host_network=False, phase="Running", host_ips=("10.1.0.5",), uid=None):
    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}", "labels": labels or {}},
        "spec": {"nodeName": "n1", "hostNetwork": host_network},
        "status": {
            "phase": phase,
            "podIP": ips[0] if ips else None,
            "podIPs": [{"ip": ip} for ip in ips],
            "hostIP": host_ips[0] if host_ips else None,
            "hostIPs": [{"ip": ip} for ip in host_ips],
        },
    }


def index_with(*pods, node_ips=("10.1.0.5",)):
    idx = PodIndex("n1", node_ips)
    for p in pods:
        idx.apply_event("ADDED", p)
    return idx


def test_dual_stack_pod_owns_both_addresses():
    idx = index_with(pod("web", "shop", ips=("198.18.0.2", "fd00::2")))
    assert idx.owner("198.18.0.2") == Owner(pod="web", namespace="shop")
    assert idx.owner("fd00:0:0:0:0:0:0:2") == Owner(pod="web", namespace="shop")


def test_ipv4_mapped_ipv6_address_is_attributed_like_ipv4():
    idx = index_with(pod("web", ips=("198.18.0.2",)))
    assert normalize_ip("::ffff:198.18.0.2") == "198.18.0.2"
    assert idx.owner("::ffff:198.18.0.2") == Owner(pod="web", namespace="default")


def test_host_network_pods_and_node_addresses_belong_to_the_node():
    idx = index_with(pod("agent", "kube-system", ips=("10.1.0.5",), host_network=True),
                     node_ips=("10.1.0.5", "fe80::1"))
    assert idx.owner("10.1.0.5") == Owner(node="n1")
    assert idx.owner("fe80::1") == Owner(node="n1")
    assert idx.owner("127.0.0.1") == Owner(node="n1")
    assert idx.owner("203.0.113.9") is None


def test_host_ip_of_pods_counts_as_a_node_address():
    idx = index_with(pod("web", ips=("198.18.0.2",), host_ips=("10.9.9.9", "fd00:99::9")), node_ips=())
    assert idx.owner("10.9.9.9") == Owner(node="n1")
    assert idx.owner("fd00:99::9") == Owner(node="n1")


def test_deleted_and_finished_pods_release_their_addresses():
    web = pod("web", ips=("198.18.0.2",))
    idx = index_with(web, pod("job", ips=("198.18.0.9",)))
    idx.apply_event("DELETED", web)
    idx.apply_event("MODIFIED", pod("job", ips=("198.18.0.9",), phase="Succeeded"))
    assert idx.owner("198.18.0.2") is None
    assert idx.owner("198.18.0.9") is None


def test_an_address_reused_by_a_new_pod_points_to_the_new_pod():
    idx = index_with(pod("old", ips=("198.18.0.2",), phase="Failed"), pod("new", ips=("198.18.0.2",)))
    assert idx.owner("198.18.0.2") == Owner(pod="new", namespace="default")


def test_a_relist_replaces_everything_known():
    idx = index_with(pod("gone", ips=("198.18.0.2",)))
    idx.replace_all([PodFacts.from_object(pod("kept", ips=("198.18.0.3",)))])
    assert idx.owner("198.18.0.2") is None
    assert idx.owner("198.18.0.3") == Owner(pod="kept", namespace="default")


def test_lookup_table_agrees_with_owner():
    idx = index_with(pod("web", ips=("198.18.0.2", "fd00::2")), pod("h", ips=("10.1.0.5",), host_network=True))
    table = idx.lookup_table()
    for ip in ("198.18.0.2", "fd00::2", "10.1.0.5", "::1", "127.0.0.1", "192.0.2.1"):
        assert attribute(table, ip, "n1") == idx.owner(ip), ip


# ---------------------------------------------------------------- selection -> kernel filter

def test_no_namespaces_and_no_selector_means_no_local_ip_filter():
    idx = index_with(pod("web", ips=("198.18.0.2",)))
    assert idx.selected_ips(PodSelection()) is None
    assert idx.selected_ips(PodSelection(selector=LabelSelector())) is None


def test_namespaces_select_their_pods_addresses():
    idx = index_with(pod("a", "shop", ips=("198.18.0.2", "fd00::2")), pod("b", "other", ips=("198.18.0.3",)))
    assert idx.selected_ips(PodSelection(namespaces=frozenset({"shop"}))) == {"198.18.0.2", "fd00::2"}


def test_pod_selector_and_namespaces_both_apply():
    idx = index_with(
        pod("a", "shop", ips=("198.18.0.2",), labels={"app": "web"}),
        pod("b", "shop", ips=("198.18.0.3",), labels={"app": "db"}),
        pod("c", "other", ips=("198.18.0.4",), labels={"app": "web"}),
    )
    sel = LabelSelector(match_labels={"app": "web"})
    assert idx.selected_ips(PodSelection(selector=sel)) == {"198.18.0.2", "198.18.0.4"}
    assert idx.selected_ips(PodSelection(frozenset({"shop"}), sel)) == {"198.18.0.2"}


def test_a_selection_matching_nothing_is_an_empty_set_not_no_filter():
    idx = index_with(pod("a", "shop", ips=("198.18.0.2",)))
    assert idx.selected_ips(PodSelection(namespaces=frozenset({"nobody"}))) == frozenset()


def test_host_network_pods_never_enter_the_filter():
    idx = index_with(pod("h", "shop", ips=("10.1.0.5",), host_network=True), pod("a", "shop", ips=("198.18.0.2",)))
    assert idx.selected_ips(PodSelection(namespaces=frozenset({"shop"}))) == {"198.18.0.2"}


def test_filter_follows_pods_as_they_come_and_go():
    sel = PodSelection(selector=LabelSelector(match_labels={"app": "web"}))
    idx = index_with()
    assert idx.selected_ips(sel) == frozenset()
    idx.apply_event("ADDED", pod("a", labels={"app": "web"}))  # no IP yet
    assert idx.selected_ips(sel) == frozenset()
    idx.apply_event("MODIFIED", pod("a", ips=("198.18.0.2",), labels={"app": "web"}))
    assert idx.selected_ips(sel) == {"198.18.0.2"}
    idx.apply_event("MODIFIED", pod("a", ips=("198.18.0.2",), labels={"app": "other"}))
    assert idx.selected_ips(sel) == frozenset()


@pytest.mark.parametrize("expr,labels,expected", [
    ({"key": "tier", "operator": "In", "values": ["a", "b"]}, {"tier": "b"}, True),
    ({"key": "tier", "operator": "In", "values": ["a"]}, {}, False),
    ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {"tier": "b"}, True),
    ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {}, True),
    ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {"tier": "a"}, False),
    ({"key": "tier", "operator": "Exists"}, {"tier": ""}, True),
    ({"key": "tier", "operator": "Exists"}, {}, False),
    ({"key": "tier", "operator": "DoesNotExist"}, {}, True),
    ({"key": "tier", "operator": "DoesNotExist"}, {"tier": "x"}, False),
])
def test_match_expressions_follow_kubernetes_semantics(expr, labels, expected):
    sel = LabelSelector.model_validate({"matchExpressions": [expr]})
    assert selector_matches(sel, labels) is expected


def test_match_labels_and_expressions_must_all_hold():
    sel = LabelSelector.model_validate({"matchLabels": {"app": "web"},
                                        "matchExpressions": [{"key": "tier", "operator": "Exists"}]})
    assert selector_matches(sel, {"app": "web", "tier": "1"})
    assert not selector_matches(sel, {"app": "web"})
    assert not selector_matches(sel, {"tier": "1"})
    assert selector_matches(None, {})


# ---------------------------------------------------------------- the node's own addresses

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.1.0.0/24 2 0 2
        |-- 10.1.0.0
           /24 link UNICAST
        |-- 10.1.0.5
           /32 host LOCAL
  +-- 127.0.0.0/8 2 0 2
     |-- 127.0.0.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.1.0.5
        /32 host LOCAL
"""
IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
"""


def test_node_addresses_are_read_from_proc(tmp_path: Path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "net" / "if_inet6").write_text(IF_INET6)
    assert node_addresses(tmp_path) == {"10.1.0.5", "127.0.0.1", "::1", "fe80::1"}


def test_node_addresses_of_this_machine_include_loopback():
    found = node_addresses()
    assert "127.0.0.1" in found
