"""status.summary from status.nodes[]: exact sums, cluster-wide top flows and pods, and
remote-side attribution from the pod IP index (IPv4 and IPv6)."""

from __future__ import annotations

import pytest

from retransmit_operator.aggregate import aggregate_summary
from retransmit_operator.api import NodeStatus
from retransmit_operator.podindex import PodIndex

pytestmark = pytest.mark.unit


def pod(name, ns, node, ips, host_network=False, uid=None, phase="Running"):
    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}"},
        "spec": {"nodeName": node, "hostNetwork": host_network},
        "status": {"phase": phase, "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]},
    }


def flow(lip, lport, rip, rport, n, family="IPv4", synack=0, local_pod=None, local_ns=None):
    local = {"ip": lip, "port": lport}
    if local_pod:
        local.update(pod=local_pod, namespace=local_ns)
    return {"local": local, "remote": {"ip": rip, "port": rport}, "family": family,
            "retransmits": n, "synackRetransmits": synack, "lastState": "ESTABLISHED"}


def node(name, phase="Running", flows=(), retransmits=0, synack=0, lost=0, by_state=None, message=None, pods=None, missed=0):
    raw = {
        "node": name, "phase": phase, "retransmits": retransmits, "synackRetransmits": synack,
        "lostEvents": lost, "missedEvents": missed, "byState": by_state or {}, "topFlows": list(flows), "message": message,
    }
    if pods is not None:  # agents that predate topPods leave it out
        raw["topPods"] = [{"namespace": ns, "pod": name_, "node": name, "retransmits": n} for ns, name_, n in pods]
    return NodeStatus.model_validate(raw)


@pytest.fixture
def index():
    i = PodIndex()
    i.observe(pod("client", "shop", "node-a", ["198.18.0.10", "fd00::a:10"]))
    i.observe(pod("db", "data", "node-b", ["198.18.1.20", "fd00::b:20"]))
    i.observe(pod("kube-proxy", "kube-system", "node-b", ["10.0.0.2"], host_network=True))
    return i


def test_totals_and_by_state_are_exact_sums(index):
    nodes = [
        node("node-a", retransmits=10, synack=2, lost=1, missed=7, by_state={"ESTABLISHED": 8, "SYN_SENT": 2}),
        node("node-b", retransmits=5, synack=0, lost=3, missed=2, by_state={"ESTABLISHED": 5}),
    ]
    s = aggregate_summary(nodes, nodes_desired=2, top_n=10, pod_index=index)
    assert (s.retransmits, s.synack_retransmits, s.lost_events, s.missed_events) == (15, 2, 4, 9)
    assert s.by_state == {"ESTABLISHED": 13, "SYN_SENT": 2}


def test_nodes_reporting_counts_running_and_completed_entries_not_failed_or_pending(index):
    nodes = [node("a"), node("b", phase="Completed"), node("c", phase="Failed", message="no tracefs"), node("d", phase="Pending")]
    s = aggregate_summary(nodes, nodes_desired=5, top_n=10, pod_index=index)
    assert (s.nodes_reporting, s.nodes_desired, s.nodes) == (2, 5, "2/5")


def test_top_flows_cluster_wide_busiest_first_truncated_with_their_node(index):
    nodes = [
        node("node-a", flows=[flow("198.18.0.10", 40000, "198.18.1.20", 5432, 7), flow("198.18.0.10", 40001, "203.0.113.9", 443, 1)]),
        node("node-b", flows=[flow("198.18.1.20", 5432, "198.18.0.10", 40000, 9)]),
    ]
    s = aggregate_summary(nodes, nodes_desired=2, top_n=2, pod_index=index)
    assert [(f.node, f.retransmits) for f in s.top_flows] == [("node-b", 9), ("node-a", 7)]


def test_remote_and_local_sides_attributed_from_the_index_for_ipv4_and_ipv6(index):
    nodes = [node("node-a", flows=[
        flow("198.18.0.10", 40000, "198.18.1.20", 5432, 3),
        # non-canonical IPv6 spelling must still hit the index
        flow("fd00:0:0:0::a:10", 40002, "fd00:0::b:20", 5432, 2, family="IPv6"),
        flow("198.18.0.10", 40003, "10.0.0.2", 10250, 1),
        flow("198.18.0.10", 40004, "203.0.113.9", 443, 1),
    ])]
    s = aggregate_summary(nodes, nodes_desired=1, top_n=10, pod_index=index)
    by_port = {f.local.port: f for f in s.top_flows}
    assert (by_port[40000].remote.pod, by_port[40000].remote.namespace) == ("db", "data")
    assert (by_port[40000].local.pod, by_port[40000].local.namespace) == ("client", "shop")
    assert (by_port[40002].remote.pod, by_port[40002].local.pod) == ("db", "client")
    assert by_port[40003].remote.pod is None and by_port[40003].remote.node == "node-b"  # hostNetwork: the node
    assert by_port[40004].remote.pod is None and by_port[40004].remote.node is None      # outside the cluster


def test_agent_attribution_is_kept(index):
    nodes = [node("node-a", flows=[flow("198.18.0.10", 1, "198.18.1.20", 2, 1, local_pod="renamed", local_ns="x")])]
    s = aggregate_summary(nodes, nodes_desired=1, top_n=10, pod_index=index)
    assert s.top_flows[0].local.pod == "renamed"


def test_top_pods_from_both_ends_of_all_node_flows(index):
    nodes = [
        node("node-a", flows=[flow("198.18.0.10", 40000, "198.18.1.20", 5432, 7, synack=1)]),
        node("node-b", flows=[flow("198.18.1.20", 5432, "198.18.0.10", 40000, 4)]),
    ]
    s = aggregate_summary(nodes, nodes_desired=2, top_n=10, pod_index=index)
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in s.top_pods] == [
        ("data", "db", "node-b", 12), ("shop", "client", "node-a", 12),
    ]


def test_top_pods_are_the_sums_of_the_nodes_top_pods_not_of_their_top_flows(index):
    """The demo's case: the top flows hold 190 of a pod's 2,208 retransmits; its topPods all."""
    nodes = [
        node("node-a", retransmits=2300, flows=[flow("198.18.0.10", 40000, "198.18.1.20", 5432, 190)],
             pods=[("shop", "client", 2208), ("shop", "cart", 92)]),
        node("node-b", retransmits=700, flows=[flow("198.18.1.20", 5432, "198.18.0.10", 40000, 150)],
             pods=[("data", "db", 700)]),
    ]
    s = aggregate_summary(nodes, nodes_desired=2, top_n=10, pod_index=index)
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in s.top_pods] == [
        ("shop", "client", "node-a", 2208), ("data", "db", "node-b", 700), ("shop", "cart", "node-a", 92),
    ]
    assert sum(p.retransmits for p in s.top_pods) == s.retransmits
    assert s.top_flows[0].remote.pod == "db"  # remote-side attribution of flows stays
    assert [p.pod for p in aggregate_summary(nodes, 2, 2, index).top_pods] == ["client", "db"]


def test_a_pod_reported_by_two_nodes_adds_up(index):
    """Two simulated nodes on one host, or a pod name reused after a move: counts add."""
    nodes = [node("node-a", pods=[("shop", "client", 5)]), node("node-b", pods=[("shop", "client", 7)])]
    s = aggregate_summary(nodes, 2, 10, index)
    assert [(p.pod, p.node, p.retransmits) for p in s.top_pods] == [("client", "node-a", 12)]


def test_entries_without_top_pods_count_both_ends_of_their_flows_entries_with_them_do_not(index):
    nodes = [
        # an older agent: its flow counts for both ends, as before topPods existed
        node("node-a", flows=[flow("198.18.0.10", 40000, "198.18.1.20", 5432, 7, synack=1)]),
        # a current agent: its pods' own counts; its host's flow to a pod adds nothing to that pod
        node("node-b", flows=[flow("10.0.0.2", 22, "198.18.0.10", 40000, 50)], pods=[("data", "db", 3)]),
        node("node-c", flows=[flow("10.0.0.3", 22, "198.18.1.20", 5432, 40)], pods=[]),
    ]
    s = aggregate_summary(nodes, 3, 10, index)
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in s.top_pods] == [
        ("data", "db", "node-b", 11), ("shop", "client", "node-a", 8),
    ]


def test_summary_is_deterministic_for_equal_input(index):
    nodes = [node("n", flows=[flow("198.18.0.10", p, "198.18.1.20", 1, 1) for p in range(5)])]
    a = aggregate_summary(nodes, 1, 3, index)
    b = aggregate_summary(list(reversed(nodes)), 1, 3, index)
    assert a == b


def test_pod_index_ip_reuse_and_deletion():
    i = PodIndex()
    old = pod("old", "ns", "n1", ["198.18.0.5"], uid="u-old")
    new = pod("new", "ns", "n1", ["198.18.0.5"], uid="u-new")
    i.observe(old)
    i.observe(new)
    assert i.lookup("198.18.0.5").pod == "new"
    i.observe(old, deleted=True)            # the old pod's deletion leaves the new owner
    assert i.lookup("198.18.0.5").pod == "new"
    i.observe({**new, "status": {**new["status"], "phase": "Succeeded"}})
    assert i.lookup("198.18.0.5") is None   # finished pods release their IPs
    i.observe(pod("v6", "ns", "n1", ["FD00::0001"]))
    assert i.lookup("fd00::1").pod == "v6" and i.lookup("::ffff:198.18.0.5") is None


def test_stale_running_entry_stops_counting_as_reporting_but_keeps_its_counts(index):
    from datetime import datetime, timedelta, timezone
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    fresh = node("a", retransmits=1).model_copy(update={"last_report_time": now - timedelta(seconds=10)})
    stale = node("b", retransmits=2).model_copy(update={"last_report_time": now - timedelta(minutes=10)})
    s = aggregate_summary([fresh, stale], nodes_desired=2, top_n=10, pod_index=index, now=now, stale_after=timedelta(minutes=1))
    assert (s.nodes, s.retransmits) == ("1/2", 3)
    assert aggregate_summary([fresh, stale], 2, 10, index).nodes == "2/2"  # no bound: completed traces
