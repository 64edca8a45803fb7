"""status.summary and status.nodes[] rows from the nodes' reports: exact sums, cluster-wide top
flows and pods, remote-side attribution from the pod IP index (IPv4 and IPv6), and rows
bounded so the trace stays small at 5,000 nodes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.api import MAX_NODE_ROWS, Condition, NodeStatus, RetransmitTraceStatus, to_api
from retransmit_core.podindex import PodIndex
from retransmit_operator.aggregate import aggregate_summary, node_rows
from retransmit_operator.conditions import Observation, compute_status

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
    if pods is not None:
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
    assert i.owner("198.18.0.5").pod == "new"
    i.observe(old, deleted=True)            # the old pod's deletion leaves the new owner
    assert i.owner("198.18.0.5").pod == "new"
    i.observe({**new, "status": {**new["status"], "phase": "Succeeded"}})
    assert i.owner("198.18.0.5") is None   # finished pods release their IPs
    i.observe(pod("v6", "ns", "n1", ["FD00::0001"]))
    assert i.owner("fd00::1").pod == "v6" and i.owner("::ffff:198.18.0.5") is None


def test_stale_running_entry_stops_counting_as_reporting_but_keeps_its_counts(index):
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    fresh = node("a", retransmits=1).model_copy(update={"last_report_time": now - timedelta(seconds=10)})
    stale = node("b", retransmits=2).model_copy(update={"last_report_time": now - timedelta(minutes=10)})
    s = aggregate_summary([fresh, stale], nodes_desired=2, top_n=10, pod_index=index, now=now, stale_after=timedelta(minutes=1))
    assert (s.nodes, s.retransmits) == ("1/2", 3)
    assert aggregate_summary([fresh, stale], 2, 10, index).nodes == "2/2"  # no bound: completed traces


NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_rows_list_failed_then_silent_then_departed_then_the_busiest_and_count_the_rest():
    bound = timedelta(seconds=45)
    nodes = [node(f"busy-{i}", retransmits=i).model_copy(update={"last_report_time": NOW}) for i in range(10)]
    nodes += [node("broken", phase="Failed", message="x" * 1000),
              node("silent", retransmits=1).model_copy(update={"last_report_time": NOW - bound * 2}),
              node("gone", retransmits=2).model_copy(update={"last_report_time": NOW - bound * 2})]
    rows, left_out = node_rows(nodes, NOW, bound, departed=frozenset({"gone"}), limit=6)
    assert [r.node for r in rows] == ["broken", "silent", "gone", "busy-9", "busy-8", "busy-7"]
    assert left_out == len(nodes) - 6
    assert len(rows[0].message) <= 200 and rows[0].message.endswith("...")
    assert [r.reporting for r in rows] == [False, False, False, True, True, True]
    assert rows[2].departed and not rows[1].departed
    s = aggregate_summary(nodes, 13, 10, None, now=NOW, stale_after=bound, departed=frozenset({"gone"}), nodes_not_listed=left_out)
    assert s.nodes == "10/13" and s.nodes_not_listed == left_out
    assert s.retransmits == sum(range(10)) + 1 + 2  # every report counts, departed and silent ones too


def _worst_case_node(i: int) -> NodeStatus:
    """A node as large as a row can make it: a long name, a failure message past the cap, big counts."""
    return NodeStatus(node=f"ip-10-{i // 250}-{i % 250}-7.eu-west-1.compute.internal-{'x' * 20}", phase="Failed",
                      retransmits=10**12 + i, synack_retransmits=10**9, lost_events=10**9,
                      message="the tracepoint tcp:tcp_retransmit_skb is missing " * 20,
                      last_report_time=NOW, top_flows=[], top_pods=[])


def test_a_trace_at_5000_nodes_stays_under_512_kib():
    """The whole status the operator writes (rows, summary with 100 flows and pods, conditions)."""
    nodes = [_worst_case_node(i) for i in range(5000)]
    rows, left_out = node_rows(nodes, NOW, timedelta(seconds=45))
    assert len(rows) == MAX_NODE_ROWS and left_out == 5000 - MAX_NODE_ROWS
    busy = [node(f"n{i}", flows=[flow(f"fd00::{i:x}:{j:x}", 40000 + j, f"fd00::1:{i:x}:{j:x}", 5432, 10**6, family="IPv6",
                                      local_pod="p" * 63, local_ns="n" * 63) for j in range(100)],
                 pods=[("n" * 63, f"{'p' * 50}-{i}-{j}", 10**6) for j in range(100)]) for i in range(3)]
    summary = aggregate_summary(nodes + busy, 5003, 100, None, now=NOW, stale_after=timedelta(seconds=45),
                                nodes_not_listed=left_out)
    assert len(summary.top_flows) == 100 and len(summary.top_pods) == 100
    status = compute_status(Observation(generation=1, spec_error=None, start_time=NOW, completion_time=None,
                                        nodes=nodes, summary=summary, now=NOW, rows=rows), [])
    written = to_api(status)
    # The operator's managedFields entry names every field it applied (the rows are one atomic list).
    fields = {f"f:{k}": {} for k in written}
    doc = {"apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace",
           "metadata": {"name": "t" * 56, "managedFields": [{"manager": "rtrace-operator", "operation": "Apply",
                                                             "fieldsType": "FieldsV1", "fieldsV1": {"f:status": fields}}]},
           "spec": {}, "status": written}
    size = len(json.dumps(doc, separators=(",", ":")))
    assert size < 512 * 1024, f"{size} bytes"
    assert RetransmitTraceStatus.model_validate(to_api(status)).nodes == rows  # the CRD's model takes it
    assert all(isinstance(c, Condition) for c in status.conditions)


def test_a_node_is_departed_when_its_agent_pod_is_gone_and_its_report_silent_and_back_with_a_pod():
    from retransmit_operator.aggregate import departed

    bound = timedelta(seconds=45)
    fresh = lambda name: node(name).model_copy(update={"last_report_time": NOW})  # noqa: E731
    silent = lambda name: node(name).model_copy(update={"last_report_time": NOW - bound * 2})  # noqa: E731
    nodes = [fresh("running"), fresh("rolling"), silent("left"), silent("stuck"), silent("was-gone")]
    # "rolling": its pod is being replaced (no pod) but its report is fresh: not departed.
    # "stuck": silent but its pod exists: stale (named in AgentsReady), not departed.
    # "was-gone": marked before, its pod is back: unmarked.
    got = departed(nodes, marked=frozenset({"was-gone"}), agent_nodes=frozenset({"running", "stuck", "was-gone"}),
                   now=NOW, stale_after=bound)
    assert got == {"left"}
    # Once marked, it stays marked while no pod runs there, even if it wrote one more report (SIGTERM flush).
    assert departed([fresh("left")], frozenset({"left"}), frozenset(), NOW, bound) == {"left"}


def test_causes_failed_attempts_and_missed_events_add_and_unknown_is_not_zero():
    index = PodIndex()
    new_kernel = NodeStatus(node="a", phase="Running", retransmits=5, missed_events=2, failed_attempts=3,
                            by_cause={"fast": 4, "timeout": 1})
    old_kernel = NodeStatus(node="b", phase="Running", retransmits=2, by_cause={"unknown": 2})
    s = aggregate_summary([new_kernel, old_kernel], nodes_desired=2, top_n=10, pod_index=index)
    assert s.by_cause == {"fast": 4, "timeout": 1, "unknown": 2}
    assert (s.failed_attempts, s.missed_events) == (3, 2)     # what the nodes that can tell report
    only_old = aggregate_summary([old_kernel], nodes_desired=1, top_n=10, pod_index=index)
    assert only_old.failed_attempts is None and only_old.missed_events is None
    assert "failedAttempts" not in to_api(only_old) and "missedEvents" not in to_api(only_old)
