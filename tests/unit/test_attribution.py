"""Pod attribution (retransmit_core.podindex, shared by agent and operator): canonical
addresses, pods as the API returns them, the agent's node-scoped index (hostNetwork and node
addresses, the selector -> IP set) and the operator's cluster-wide one; the agent's node
addresses from /proc."""

from pathlib import Path

import pytest

from retransmit_agent.podselection import PodSelection, selected_ips, selector_matches
from retransmit_agent.podwatch import node_addresses
from retransmit_operator.aggregate import attributed_endpoint
from retransmit_core.api import Endpoint, LabelSelector
from retransmit_core.podindex import (
    Owner,
    PodFacts,
    PodIndex,
    owner_in_table,
    canonical_ip,
    canonical_ips,
    with_owner,
)

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


# ---------------------------------------------------------------- shared pure functions

@pytest.mark.parametrize("text,expected", [
    ("198.18.0.2", "198.18.0.2"),
    ("FD00:0:0:0:0:0:0:2", "fd00::2"),
    ("::ffff:198.18.0.2", "198.18.0.2"),   # IPv4-mapped IPv6 is the IPv4 address
    ("fe80::1%eth0", "fe80::1"),           # a zone is not part of the address
    ("::1", "::1"),
    ("", None),
    ("198.18.0.256", None),
    ("web.shop", None),
])
def test_canonical_ip(text, expected):
    assert canonical_ip(text) == expected


def test_canonical_ips_keep_first_order_once_each_and_drop_what_is_no_address():
    assert canonical_ips(["fd00::0:2", None, "", "198.18.0.2", "fd00::2", "nope", "::ffff:198.18.0.2"]) == (
        "fd00::2", "198.18.0.2")


def test_pod_facts_from_a_pod_object():
    facts = PodFacts.from_object({
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running", "podIP": "198.18.0.2",
                   "podIPs": [{"ip": "198.18.0.2"}, {"ip": "FD00:0::2"}],
                   "hostIP": "10.1.0.5", "hostIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00:99::9"}]},
    })
    assert facts == PodFacts(uid="u1", name="web", namespace="shop", node_name="n1", labels={"app": "web"},
                             host_network=False, ips=("198.18.0.2", "fd00::2"), host_ips=("10.1.0.5", "fd00:99::9"),
                             terminal=False)


def test_pod_facts_of_an_old_style_pod_without_uid_or_ip_lists():
    facts = PodFacts.from_object({"metadata": {"name": "job", "namespace": "ns"}, "spec": {"hostNetwork": True},
                                  "status": {"phase": "Succeeded", "podIP": "::ffff:10.1.0.5", "hostIP": "10.1.0.5"}})
    assert (facts.uid, facts.node_name, facts.ips, facts.host_ips) == ("ns/job", None, ("10.1.0.5",), ("10.1.0.5",))
    assert facts.host_network and facts.terminal


def test_pod_facts_of_a_pod_not_yet_scheduled():
    facts = PodFacts.from_object({"metadata": {"name": "p", "namespace": "ns", "uid": "u"}})
    assert (facts.ips, facts.host_ips, facts.node_name, facts.host_network, facts.terminal) == ((), (), None, False, False)


# ---------------------------------------------------------------- the agent's index: one node

def index_with(*pods, node_ips=("10.1.0.5",)):
    idx = PodIndex("n1", node_ips)
    for p in pods:
        idx.observe(p)
    return idx


def test_dual_stack_pod_owns_both_addresses():
    idx = index_with(pod("web", "shop", ips=("198.18.0.2", "fd00::2")))
    assert idx.owner("198.18.0.2") == Owner(pod="web", namespace="shop")
    assert idx.owner("fd00:0:0:0:0:0:0:2") == Owner(pod="web", namespace="shop")


def test_ipv4_mapped_ipv6_address_is_attributed_like_ipv4():
    idx = index_with(pod("web", ips=("198.18.0.2",)))
    assert canonical_ip("::ffff:198.18.0.2") == "198.18.0.2"
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
    idx.observe(web, deleted=True)
    idx.observe(pod("job", ips=("198.18.0.9",), phase="Succeeded"))
    assert idx.owner("198.18.0.2") is None
    assert idx.owner("198.18.0.9") is None


def test_an_address_reused_by_a_new_pod_points_to_the_new_pod():
    idx = index_with(pod("old", ips=("198.18.0.2",), phase="Failed"), pod("new", ips=("198.18.0.2",)))
    assert idx.owner("198.18.0.2") == Owner(pod="new", namespace="default")


def test_a_relist_replaces_everything_known():
    idx = index_with(pod("gone", ips=("198.18.0.2",)))
    idx.replace_all([pod("kept", ips=("198.18.0.3",))])
    assert idx.owner("198.18.0.2") is None
    assert idx.owner("198.18.0.3") == Owner(pod="kept", namespace="default")


def test_lookup_table_agrees_with_owner():
    idx = index_with(pod("web", ips=("198.18.0.2", "fd00::2")), pod("h", ips=("10.1.0.5",), host_network=True))
    table = idx.lookup_table()
    for ip in ("198.18.0.2", "fd00::2", "10.1.0.5", "::1", "127.0.0.1", "192.0.2.1"):
        assert owner_in_table(table, ip, "n1") == idx.owner(ip), ip


@pytest.mark.parametrize("node", [None, "n1"], ids=["cluster-wide", "one-node"])
def test_two_live_pods_on_one_address_the_one_seen_last_owns_it_until_it_goes(node):
    idx = PodIndex(node)
    first, second = pod("first", ips=("198.18.0.2",)), pod("second", ips=("198.18.0.2",))
    idx.observe(first)
    idx.observe(second)
    assert idx.owner("198.18.0.2") == Owner(pod="second", namespace="default")
    assert idx.lookup_table()["198.18.0.2"] == Owner(pod="second", namespace="default")
    idx.observe(first)                      # a MODIFIED event makes it the latest
    assert idx.owner("198.18.0.2") == Owner(pod="first", namespace="default")
    idx.observe(first, deleted=True)
    assert idx.owner("198.18.0.2") == Owner(pod="second", namespace="default")
    idx.observe(second, deleted=True)
    assert idx.owner("198.18.0.2") is None and len(idx) == 0


# ---------------------------------------------------------------- the operator's index: every pod

def cluster_pod(name, node, ips, host_network=False, ns="default"):
    p = pod(name, ns, ips=ips, host_network=host_network, host_ips=("10.1.0.5",))
    p["spec"]["nodeName"] = node
    return p


def test_cluster_wide_a_host_network_address_belongs_to_that_pods_node():
    idx = PodIndex()
    idx.observe(cluster_pod("kube-proxy", "node-b", ("10.0.0.2",), host_network=True, ns="kube-system"))
    assert idx.owner("10.0.0.2") == Owner(node="node-b")


def test_cluster_wide_a_pod_wins_over_a_host_network_pod_on_the_same_address():
    idx = PodIndex()
    idx.observe(cluster_pod("web", "node-a", ("10.0.0.2",)))
    idx.observe(cluster_pod("agent", "node-a", ("10.0.0.2",), host_network=True))
    assert idx.owner("10.0.0.2") == Owner(pod="web", namespace="default")


def test_cluster_wide_only_pod_addresses_are_known():
    """No node addresses, hostIPs or loopback: the operator knows no node's own addresses."""
    idx = PodIndex()
    idx.observe(cluster_pod("web", "node-a", ("198.18.0.2", "fd00::2")))
    assert len(idx) == 2
    assert idx.node_ips() == set()
    for ip in ("10.1.0.5", "127.0.0.1", "::1", "not-an-ip"):
        assert idx.owner(ip) is None, ip
    assert idx.lookup_table() == {ip: Owner(pod="web", namespace="default") for ip in ("198.18.0.2", "fd00::2")}


def test_both_scopes_attribute_pods_alike():
    pods = [cluster_pod("web", "n1", ("198.18.0.2", "fd00::2"), ns="shop"),
            cluster_pod("db", "n1", ("198.18.0.3",), ns="data")]
    wide, local = PodIndex(), PodIndex("n1", ("10.1.0.5",))
    wide.replace_all(pods)
    local.replace_all(pods)
    for ip in ("198.18.0.2", "fd00:0::2", "::ffff:198.18.0.3"):
        assert wide.owner(ip) == local.owner(ip) is not None, ip
        assert wide.owner(ip).node is None   # a pod is named by pod and namespace


def test_an_endpoint_takes_its_owner_a_pods_by_name_a_nodes_by_node():
    bare = Endpoint(ip="198.18.0.2", port=80)
    assert with_owner(bare, None) == bare
    assert with_owner(bare, Owner(pod="web", namespace="shop")) == Endpoint(ip="198.18.0.2", port=80, pod="web",
                                                                           namespace="shop")
    assert with_owner(bare, Owner(node="n1")) == Endpoint(ip="198.18.0.2", port=80, node="n1")


def test_the_summary_attributes_like_the_agent_and_keeps_what_the_agent_wrote():
    wide = PodIndex()
    wide.replace_all([cluster_pod("web", "n1", ("198.18.0.2",), ns="shop"),
                      cluster_pod("kube-proxy", "n2", ("10.0.0.2",), host_network=True, ns="kube-system")])
    for ip in ("198.18.0.2", "10.0.0.2", "10.9.9.9"):
        bare = Endpoint(ip=ip, port=80)
        assert attributed_endpoint(bare, wide) == with_owner(bare, wide.owner(ip)), ip
    written = Endpoint(ip="198.18.0.2", port=80, pod="old", namespace="shop")
    assert attributed_endpoint(written, wide) == written
    assert attributed_endpoint(Endpoint(ip="198.18.0.2", port=80), None) == Endpoint(ip="198.18.0.2", port=80)


# ---------------------------------------------------------------- selection -> kernel filter

def test_no_namespaces_and_no_selector_means_no_local_ip_filter():
    idx = index_with(pod("web", ips=("198.18.0.2",)))
    assert selected_ips(idx, PodSelection()) is None
    assert selected_ips(idx, PodSelection(selector=LabelSelector())) is None


def test_namespaces_select_their_pods_addresses():
    idx = index_with(pod("a", "shop", ips=("198.18.0.2", "fd00::2")), pod("b", "other", ips=("198.18.0.3",)))
    assert selected_ips(idx, PodSelection(namespaces=frozenset({"shop"}))) == {"198.18.0.2", "fd00::2"}


def test_pod_selector_and_namespaces_both_apply():
    idx = index_with(
        pod("a", "shop", ips=("198.18.0.2",), labels={"app": "web"}),
        pod("b", "shop", ips=("198.18.0.3",), labels={"app": "db"}),
        pod("c", "other", ips=("198.18.0.4",), labels={"app": "web"}),
    )
    sel = LabelSelector(match_labels={"app": "web"})
    assert selected_ips(idx, PodSelection(selector=sel)) == {"198.18.0.2", "198.18.0.4"}
    assert selected_ips(idx, PodSelection(frozenset({"shop"}), sel)) == {"198.18.0.2"}


def test_a_selection_matching_nothing_is_an_empty_set_not_no_filter():
    idx = index_with(pod("a", "shop", ips=("198.18.0.2",)))
    assert selected_ips(idx, PodSelection(namespaces=frozenset({"nobody"}))) == frozenset()


def test_host_network_pods_never_enter_the_filter():
    idx = index_with(pod("h", "shop", ips=("10.1.0.5",), host_network=True), pod("a", "shop", ips=("198.18.0.2",)))
    assert selected_ips(idx, PodSelection(namespaces=frozenset({"shop"}))) == {"198.18.0.2"}


def test_filter_follows_pods_as_they_come_and_go():
    sel = PodSelection(selector=LabelSelector(match_labels={"app": "web"}))
    idx = index_with()
    assert selected_ips(idx, sel) == frozenset()
    idx.observe(pod("a", labels={"app": "web"}))  # no IP yet
    assert selected_ips(idx, sel) == frozenset()
    idx.observe(pod("a", ips=("198.18.0.2",), labels={"app": "web"}))
    assert selected_ips(idx, sel) == {"198.18.0.2"}
    idx.observe(pod("a", ips=("198.18.0.2",), labels={"app": "other"}))
    assert selected_ips(idx, sel) == frozenset()


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


def test_the_filter_check_says_how_many_addresses_did_not_fit_and_goes_when_all_fit():
    from retransmit_agent.podselection import FILTER_CHECK, with_filter_check
    from retransmit_core.api import KernelCheck

    tracefs = KernelCheck(name="tracefs", status="ok", detail="mounted")
    checks = with_filter_check((tracefs,), 3, 1024)
    assert checks[0] == tracefs and checks[1].name == FILTER_CHECK and checks[1].status == "degraded"
    assert checks[1].detail.startswith("3 address(es) of selected pods do not fit") and "1024" in checks[1].detail
    assert with_filter_check(checks, 0, 1024) == (tracefs,)
    assert len(with_filter_check(checks, 5, 1024)) == 2   # replaced, not added twice
