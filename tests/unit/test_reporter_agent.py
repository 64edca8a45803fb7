"""The cluster agent's entry step (nodeentry.node_entry): kernel snapshot + restart baseline + pod
attribution -> one entry, the pods' counts for the next step and the counts for /metrics.

The kernel side is a recorded KernelSnapshot (the real dataclass the real program returns) and
the pods a real PodIndex's lookup table, so this runs without root; the e2e tests run the same
code on real BPF.
"""

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.flows import FlowCounters
from retransmit_agent.kernel import KernelSnapshot
from retransmit_agent.metrics import AgentInfo, AgentState
from retransmit_agent.nodeentry import NodeFacts, node_entry
from retransmit_agent.resume import Baseline
from retransmit_core.api import Endpoint, Flow, NodeStatus, Phase, PodCount
from retransmit_core.podindex import PodIndex

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
WEB, DB = "198.18.0.2", "fd00::3"
FACTS = NodeFacts(node="n1", kernel_release="6.18", agent_version="0.1.0")


def counters(local_ip, local_port, retransmits, remote_ip="203.0.113.9", remote_port=443, family="IPv4", synack=0):
    return FlowCounters(family=family, local_ip=local_ip, local_port=local_port, remote_ip=remote_ip,
                        remote_port=remote_port, retransmits=retransmits, synack_retransmits=synack,
                        last_state="ESTABLISHED", first_seen=T0, last_seen=T0 + timedelta(seconds=1))


def snapshot(flows, by_local_address=None, owners_full=0):
    """A snapshot of `flows`; the kernel's per-address counts are theirs unless given (when the
    flow map evicted some, the per-address counts still hold them)."""
    total = sum(f.retransmits for f in flows)
    if by_local_address is None:
        by_local_address = {}
        for f in flows:
            by_local_address[f.local_ip] = by_local_address.get(f.local_ip, 0) + f.retransmits + f.synack_retransmits
    return KernelSnapshot(retransmits=total, synack_retransmits=sum(f.synack_retransmits for f in flows), lost_events=0, sampled_events=0,
                          failed_attempts=0, missed_events=0, by_state={"ESTABLISHED": total}, flow_counters=flows,
                          by_local_address=by_local_address, owners_full=owners_full)


def pod(name, ns, ips, host_network=False):
    return {"metadata": {"name": name, "namespace": ns, "uid": name}, "spec": {"hostNetwork": host_network},
            "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}}


@pytest.fixture
def owners():
    """Node n1's pod index as its agent's pod watch fills it, read as the loop reads it."""
    index = PodIndex("n1", ["10.1.0.5"])
    index.observe(pod("web", "shop", [WEB]))
    index.observe(pod("db", "shop", [DB, "198.18.0.3"]))
    return index.lookup_table()


def step(snap, owners, baseline=Baseline(), previous_pods=None, facts=FACTS):
    """One wake-up of the agent with the trace's topFlows 3 and events.keep 5."""
    return node_entry(snap, facts, top_flows=3, keep_events=5, now=T0, baseline=baseline,
                      previous_pods=previous_pods, owners=owners)


def test_a_fresh_agent_reports_the_kernels_counts_with_both_sides_attributed(owners):
    entry = step(snapshot([counters(WEB, 40000, 5, remote_ip="198.18.0.3", remote_port=5432),
                           counters("10.1.0.5", 22, 2)]), owners).entry
    assert entry.phase == "Running" and (entry.retransmits, entry.flows) == (7, 2)
    top = entry.top_flows[0]
    assert (top.local.pod, top.local.namespace, top.remote.pod) == ("web", "shop", "db")
    assert entry.top_flows[1].local.node == "n1" and entry.top_flows[1].local.pod is None


def test_a_restarted_agent_adds_to_its_baseline_and_a_quiet_old_flow_still_ranks(owners):
    old = Flow(local=Endpoint(ip=WEB, port=1), remote=Endpoint(ip="203.0.113.9", port=443), family="IPv4",
               retransmits=100, last_state="ESTABLISHED", first_seen=T0, last_seen=T0)
    baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=120, flows=9,
                                              by_state={"ESTABLISHED": 120}, top_flows=[old]))
    # Flow port 1 is quiet now (1 new event): without its baseline it would rank last of 8.
    fresh = [counters(WEB, 1, 1)] + [counters(WEB, 1000 + i, 10 + i) for i in range(7)]
    entry = step(snapshot(fresh), owners, baseline).entry
    assert entry.retransmits == 120 + sum(f.retransmits for f in fresh)
    assert entry.by_state == {"ESTABLISHED": entry.retransmits}
    assert entry.flows == 9  # never fewer than before the restart
    assert [(f.local.port, f.retransmits) for f in entry.top_flows] == [(1, 101), (1006, 16), (1005, 15)]
    assert all(f.local.pod == "web" for f in entry.top_flows)


def test_a_node_that_cannot_trace_reports_failed_and_keeps_earlier_counts(owners):
    baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=42))
    problem = "tracepoint tcp:tcp_retransmit_skb is missing (...): use Linux 4.16 or later"
    result = step(None, owners, baseline, facts=NodeFacts(node="n1", problem=problem))
    assert result.entry.phase == "Failed" and result.entry.message == problem
    assert result.entry.retransmits == 42
    assert result.by_pod_port is None   # no program: nothing new for /metrics


def test_metrics_count_by_local_pod_and_remote_port(owners):
    result = step(snapshot([counters(WEB, 1, 4, remote_port=5432), counters(WEB, 2, 3, remote_port=5432),
                            counters(DB, 3, 2, family="IPv6", remote_ip="fd00::9")]), owners)
    state = AgentState(trace="t1", node="n1", info=AgentInfo(version="0.1.0", kernel="6.18.0", mode="privileged"))
    state.publish_entry(result.entry, result.by_pod_port)
    assert state.by_pod_port == {("shop", "web", "5432"): 7, ("shop", "db", "443"): 2}
    assert state.retransmits == 9


def test_metrics_carry_the_baselines_flows_with_their_earlier_counts(owners):
    old = [Flow(local=Endpoint(ip=WEB, port=port), remote=Endpoint(ip="203.0.113.9", port=5432), family="IPv4",
                retransmits=n, first_seen=T0, last_seen=T0) for port, n in ((1, 100), (2, 30))]
    baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=130, top_flows=old))
    # Flow 1 is in the kernel map again (4 more), flow 2 is not (yet).
    result = step(snapshot([counters(WEB, 1, 4, remote_port=5432)]), owners, baseline)
    assert result.by_pod_port == {("shop", "web", "5432"): 134}


def test_top_pods_carry_every_pod_by_the_kernels_per_address_counts_and_skip_the_node(owners):
    # 3 top flows kept (topFlows), yet every pod is a row: a restarted agent resumes each.
    flows = [counters(WEB, 1000 + i, 2) for i in range(30)]
    flows += [counters(DB, 5432, 20, family="IPv6", remote_ip="fd00::9", synack=3), counters("198.18.0.3", 5433, 4)]
    flows += [counters("10.1.0.5", 2200 + i, 50 + i) for i in range(8)]  # the node's own address: no pod
    index = PodIndex("n1", ["10.1.0.5"])
    for i in range(6):
        index.observe(pod(f"idle-{i}", "shop", [f"198.18.1.{i}"]))
        flows.append(counters(f"198.18.1.{i}", 80, 1))
    entry = step(snapshot(flows), {**owners, **index.lookup_table()}).entry
    assert len(entry.top_flows) == 3 and all(f.local.node == "n1" for f in entry.top_flows)
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in entry.top_pods] == [
        ("shop", "web", "n1", 60), ("shop", "db", "n1", 27)] + [("shop", f"idle-{i}", "n1", 1) for i in range(6)]


def test_pod_counts_stay_exact_when_the_flow_map_evicts_their_flows(owners):
    first = step(snapshot([counters(WEB, 1, 7), counters(WEB, 2, 3)]), owners)
    assert [(p.pod, p.retransmits) for p in first.entry.top_pods] == [("web", 10)]
    # Flow 2 was evicted and flow 1 retransmitted 5 more: the per-address count has all 15.
    second = step(snapshot([counters(WEB, 1, 12)], by_local_address={WEB: 15}), owners,
                  previous_pods=first.pod_totals)
    assert [(p.pod, p.retransmits) for p in second.entry.top_pods] == [("web", 15)]


def test_a_restarted_agent_continues_its_pods_counts(owners):
    baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=500, top_pods=[
        PodCount(namespace="shop", pod="web", node="n1", retransmits=400),
        PodCount(namespace="shop", pod="db", node="n1", retransmits=100),
        PodCount(namespace="shop", pod="gone", node="n1", retransmits=1)]))
    first = step(snapshot([counters(WEB, 1, 7), counters(WEB, 2, 3)]), owners, baseline)
    assert [(p.pod, p.retransmits) for p in first.entry.top_pods] == [("web", 410), ("db", 100), ("gone", 1)]
    second = step(snapshot([counters(WEB, 1, 8), counters(WEB, 2, 3)]), owners, baseline, previous_pods=first.pod_totals)
    assert [(p.pod, p.retransmits) for p in second.entry.top_pods] == [("web", 411), ("db", 100), ("gone", 1)]


def test_retransmits_the_per_address_map_could_not_hold_are_reported_and_resumed(owners):
    entry = step(snapshot([counters(WEB, 1, 7)], owners_full=4), owners).entry
    assert entry.pod_counts_overflow == 4
    resumed = step(snapshot([], owners_full=1), owners, Baseline.from_entry(entry)).entry
    assert resumed.pod_counts_overflow == 5


def test_a_node_that_cannot_trace_keeps_its_earlier_pods(owners):
    baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=42, top_pods=[
        PodCount(namespace="shop", pod="web", node="n1", retransmits=42)]))
    entry = step(None, owners, baseline, facts=NodeFacts(node="n1", problem="BPF not permitted")).entry
    assert entry.phase == "Failed" and [(p.pod, p.retransmits) for p in entry.top_pods] == [("web", 42)]


def test_a_node_whose_program_is_not_open_yet_is_pending(owners):
    entry = step(None, owners).entry
    assert entry.phase == "Pending" and entry.message is None and entry.kernel == "6.18"
