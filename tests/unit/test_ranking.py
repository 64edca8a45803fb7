"""Busiest first is one order (retransmit_core.ranking) for the agent's kernel-map flows
(resume.merge_flows), its report's topFlows (resume.cumulative_entry) and the trace's summary
(aggregate.cluster_flows): count, then recency, then node, family, addresses and ports. Pods
have one order too (ranking.pod_key), for the agent's topPods (resume.ranked_pods) and the
summary's (aggregate.summary_pods): count, then namespace, then name."""

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.flows import FlowCounters
from retransmit_agent.resume import Baseline, CumulativeFlow, FlowKey, cumulative_entry, merge_flows, ranked_pods
from retransmit_operator.aggregate import cluster_flows, summary_pods
from retransmit_core.api import Endpoint, Flow, NodeStatus, PodCount
from retransmit_core.ranking import busiest_first_key, flow_key, pod_key

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

# Busiest first. Each row ties with the one before it on every field the order reads before
# the one it is there to show, and loses on that one although it wins on every field after.
# (name, retransmits, synack, last seen (s after T0, None = never), family, local ip, local port, remote ip, remote port)
BUSIEST_FIRST = [
    ("most retransmits",  9, 0, 10, "IPv6", "fd00::9", 9, "fd00::9", 9),
    ("latest",            2, 3, 50, "IPv6", "fd00::9", 9, "fd00::9", 9),   # SYN-ACKs count: 5 in all
    ("IPv4 before IPv6",  5, 0, 40, "IPv4", "198.18.0.9", 9, "198.18.0.9", 9),
    ("IPv6",              5, 0, 40, "IPv6", "100::1", 1, "100::1", 1),     # "100::1" < "198..." as text
    ("local ip",          5, 0, 30, "IPv4", "198.18.0.1", 9, "198.18.0.9", 9),
    ("local port",        5, 0, 30, "IPv4", "198.18.0.2", 1, "198.18.0.9", 9),
    ("remote ip",         5, 0, 30, "IPv4", "198.18.0.2", 2, "198.18.0.1", 9),
    ("remote port",       5, 0, 30, "IPv4", "198.18.0.2", 2, "198.18.0.2", 1),
    ("last of the ties",  5, 0, 30, "IPv4", "198.18.0.2", 2, "198.18.0.2", 2),
    ("never seen",        5, 0, None, "IPv4", "198.18.0.1", 1, "198.18.0.1", 1),
    ("fewest",            1, 0, 99, "IPv4", "198.18.0.1", 1, "198.18.0.1", 1),
]
NAMES = [row[0] for row in BUSIEST_FIRST]


def seen(seconds):
    return None if seconds is None else T0 + timedelta(seconds=seconds)


def api_flow(row) -> Flow:
    _, retransmits, synack, last, family, lip, lport, rip, rport = row
    return Flow(local=Endpoint(ip=lip, port=lport), remote=Endpoint(ip=rip, port=rport), family=family,
                retransmits=retransmits, synack_retransmits=synack, first_seen=seen(0), last_seen=seen(last))


def kernel_flow(row) -> FlowCounters:
    _, retransmits, synack, last, family, lip, lport, rip, rport = row
    return FlowCounters(family, lip, lport, rip, rport, retransmits, synack, "ESTABLISHED", seen(0), seen(last))


def shuffled(rows):
    """Worst first, then the middle out: no input order happens to be the answer."""
    rows = list(reversed(rows))
    return rows[len(rows) // 2:] + rows[: len(rows) // 2]


def name_of(flow) -> str:
    """The row a flow was built from, by its identity and counts."""
    for row in BUSIEST_FIRST:
        if api_flow(row).model_dump(include={"local", "remote", "family", "retransmits", "synack_retransmits"}) == \
                flow.model_dump(include={"local", "remote", "family", "retransmits", "synack_retransmits"}):
            return row[0]
    raise AssertionError(f"no row for {flow}")


def kernel_ranked(counters):
    """The agent's order of its kernel-map flows (resume.merge_flows sorts by CumulativeFlow.rank;
    the rows here share flow identities on purpose, which merge_flows would add up)."""
    return sorted((CumulativeFlow(FlowKey.of_counters(c), fresh=c) for c in counters), key=CumulativeFlow.rank)


def baseline_ranked(flows):
    """The same order for flows an earlier agent reported, as a restarted agent ranks them."""
    return sorted((CumulativeFlow(FlowKey.of_flow(f), old=f) for f in flows), key=CumulativeFlow.rank)


def test_the_agents_kernel_map_flows_are_ranked_count_then_recency_then_identity():
    rows = [row for row in BUSIEST_FIRST if row[3] is not None]  # the kernel always has a last time
    ranked = kernel_ranked([kernel_flow(row) for row in shuffled(rows)])
    assert [name_of(f.to_flow()) for f in ranked] == [row[0] for row in rows]


def test_the_reports_top_flows_are_ranked_the_same_way():
    ranked = baseline_ranked([api_flow(row) for row in shuffled(BUSIEST_FIRST)])
    assert [name_of(f.to_flow()) for f in ranked] == NAMES
    top3 = cumulative_entry(Baseline(), NodeStatus(node="n1", phase="Running"), ranked, 3, 0).top_flows
    assert [name_of(f) for f in top3] == NAMES[:3]


def test_a_flow_counted_before_and_after_a_restart_ranks_as_the_flow_it_becomes():
    # Every row split into what an earlier agent reported and what the kernel counted since.
    rows = [row for row in BUSIEST_FIRST if row[3] is not None]
    merged = [CumulativeFlow(FlowKey.of_counters(kernel_flow((name, r, s, last, *key))),
                             old=api_flow((name, r // 2, s // 2, 0, *key)),
                             fresh=kernel_flow((name, r - r // 2, s - s // 2, last, *key)))
              for name, r, s, last, *key in shuffled(rows)]
    assert all(f.rank() == flow_key(f.to_flow()) for f in merged)
    assert [name_of(f.to_flow()) for f in sorted(merged, key=CumulativeFlow.rank)] == [row[0] for row in rows]


def test_merge_flows_adds_a_flows_counts_from_before_and_after_a_restart():
    earlier = api_flow(BUSIEST_FIRST[-1])                                    # 1 retransmit
    again = kernel_flow(("fewest", 9, 0, 100, *BUSIEST_FIRST[-1][4:]))       # 9 more since
    baseline = Baseline.from_entry(NodeStatus(node="n1", phase="Running", top_flows=[earlier]))
    merged = merge_flows(baseline, [again, kernel_flow(BUSIEST_FIRST[0])])
    assert [(f.key.local_ip, f.retransmits) for f in merged] == [("198.18.0.1", 10), ("fd00::9", 9)]


def test_the_summarys_top_flows_are_ranked_the_same_way():
    node = NodeStatus(node="n1", phase="Running", top_flows=[api_flow(row) for row in shuffled(BUSIEST_FIRST)])
    assert [name_of(f) for f in cluster_flows([node], None)] == NAMES
    assert [name_of(f) for f in cluster_flows([node], None, top_n=4)] == NAMES[:4]


def test_across_nodes_count_and_recency_come_before_the_node_and_the_node_before_the_flow():
    worse, better = api_flow(BUSIEST_FIRST[8]), api_flow(BUSIEST_FIRST[4])   # same count and time
    latest = worse.model_copy(update={"last_seen": seen(31)})
    nodes = [
        NodeStatus(node="node-c", phase="Running", top_flows=[latest]),
        NodeStatus(node="node-b", phase="Running", top_flows=[better]),
        NodeStatus(node="node-a", phase="Running", top_flows=[worse, api_flow(BUSIEST_FIRST[-1])]),
    ]
    ranked = cluster_flows(nodes, None)
    assert [(f.node, f.local.ip, f.local.port) for f in ranked] == [
        ("node-c", "198.18.0.2", 2),   # latest of the fives
        ("node-a", "198.18.0.2", 2),   # the node decides before the flow's addresses do
        ("node-b", "198.18.0.1", 9),
        ("node-a", "198.18.0.1", 1),   # fewest
    ]


def test_the_key_of_an_api_flow_is_the_key_of_its_fields():
    flow = api_flow(BUSIEST_FIRST[1]).model_copy(update={"node": "n7"})
    assert flow_key(flow) == busiest_first_key(5, seen(50), "IPv6", "fd00::9", 9, "fd00::9", 9, node="n7")
    assert flow_key(flow, "n1") == busiest_first_key(5, seen(50), "IPv6", "fd00::9", 9, "fd00::9", 9, node="n1")
    assert busiest_first_key(5, None, "IPv4", "a", 1, "b", 2) > busiest_first_key(5, T0, "IPv4", "a", 1, "b", 2)


# (namespace, pod, retransmits), busiest first: each row ties with the one before it on what
# the order reads first and loses on the next field although it wins on the one after.
PODS_BUSIEST_FIRST = [
    ("zz", "zz", 9),
    ("aa", "zz", 4),   # namespace decides before the name
    ("bb", "aa", 4),
    ("bb", "ab", 4),
    ("aa", "aa", 1),   # fewest
]


def test_the_agents_top_pods_are_ranked_count_then_namespace_then_name():
    counts = {(ns, pod): n for ns, pod, n in shuffled(PODS_BUSIEST_FIRST)}
    counts[("aa", "idle")] = 0   # a pod without retransmits is not ranked
    ranked = ranked_pods(counts, "n1")
    assert [(p.namespace, p.pod, p.retransmits) for p in ranked] == PODS_BUSIEST_FIRST
    assert {p.node for p in ranked} == {"n1"}


def test_the_summarys_top_pods_are_summed_over_nodes_and_ranked_the_same_way():
    # Each pod's count split over two nodes' topPods: the summary ranks the sums.
    halves = [[PodCount(namespace=ns, pod=pod, node=node, retransmits=part) for ns, pod, n in shuffled(PODS_BUSIEST_FIRST)
               for part in [n // 2 if node == "n1" else n - n // 2] if part]
              for node in ("n1", "n2")]
    nodes = [NodeStatus(node=f"n{i + 1}", phase="Running", top_pods=pods) for i, pods in enumerate(halves)]
    ranked = summary_pods(nodes, top_n=10)
    assert [(p.namespace, p.pod, p.retransmits) for p in ranked] == PODS_BUSIEST_FIRST
    assert [(p.namespace, p.pod) for p in summary_pods(nodes, top_n=3)] == [(ns, pod) for ns, pod, _ in PODS_BUSIEST_FIRST[:3]]


def test_the_pod_key_is_count_then_namespace_then_name():
    assert pod_key(5, "b", "a") < pod_key(4, "a", "a") < pod_key(4, "a", "b") < pod_key(4, "b", "a")
