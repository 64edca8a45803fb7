"""The cluster agent's entry assembly: kernel snapshot + restart baseline + pod attribution -> one entry.

The kernel side is a recorded KernelSnapshot (the real dataclass the real program returns),
so this runs without root; the e2e tests run the same code on real BPF.
"""

from datetime import datetime, timedelta, timezone

import kubernetes
import pytest

from retransmit_agent.cluster import ClusterAgent
from retransmit_agent.flows import FlowCounters
from retransmit_agent.kernel import KernelSnapshot
from retransmit_agent.reporter import Baseline
from retransmit_core.api import Endpoint, Flow, NodeStatus, Phase, PodCount, RetransmitTraceSpec
from retransmit_core.contract import AgentInvocation

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
WEB, DB = "198.18.0.2", "fd00::3"


class RecordedProgram:
    """Stands in for the kernel: returns a snapshot taken on a real run's shape."""

    def __init__(self, snapshot):
        self.snapshot_value = snapshot

    def snapshot(self):
        return self.snapshot_value

    def drain_events(self):
        return []


def counters(local_ip, local_port, retransmits, remote_ip="203.0.113.9", remote_port=443, family="IPv4", synack=0):
    return FlowCounters(family=family, local_ip=local_ip, local_port=local_port, remote_ip=remote_ip,
                        remote_port=remote_port, retransmits=retransmits, synack_retransmits=synack,
                        last_state="ESTABLISHED", first_seen=T0, last_seen=T0 + timedelta(seconds=1))


def snapshot(flows):
    total = sum(f.retransmits for f in flows)
    return KernelSnapshot(retransmits=total, synack_retransmits=sum(f.synack_retransmits for f in flows), lost_events=0, sampled_events=0,
                          failed_attempts=0, missed_events=0, by_state={"ESTABLISHED": total}, flow_counters=flows)


def pod(name, ns, ips, host_network=False):
    return {"metadata": {"name": name, "namespace": ns, "uid": name}, "spec": {"hostNetwork": host_network},
            "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}}


@pytest.fixture
def agent():
    spec = RetransmitTraceSpec(top_flows=3, events={"keep": 5})
    a = ClusterAgent(AgentInvocation(trace="t1", trace_uid="u1", spec=spec), "n1", "rs", kubernetes.client.ApiClient())
    a.index.observe(pod("web", "shop", [WEB]))
    a.index.observe(pod("db", "shop", [DB, "198.18.0.3"]))
    a.index.set_node_addresses(["10.1.0.5"])
    return a


def test_a_fresh_agent_reports_the_kernels_counts_with_both_sides_attributed(agent):
    agent.baseline = Baseline()
    agent.program = RecordedProgram(snapshot([counters(WEB, 40000, 5, remote_ip="198.18.0.3", remote_port=5432),
                                              counters("10.1.0.5", 22, 2)]))
    entry = agent.build_entry()
    assert entry.phase == "Running" and (entry.retransmits, entry.flows) == (7, 2)
    top = entry.top_flows[0]
    assert (top.local.pod, top.local.namespace, top.remote.pod) == ("web", "shop", "db")
    assert entry.top_flows[1].local.node == "n1" and entry.top_flows[1].local.pod is None


def test_a_restarted_agent_adds_to_its_baseline_and_a_quiet_old_flow_still_ranks(agent):
    old = Flow(local=Endpoint(ip=WEB, port=1), remote=Endpoint(ip="203.0.113.9", port=443), family="IPv4",
               retransmits=100, last_state="ESTABLISHED", first_seen=T0, last_seen=T0)
    agent.baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=120, flows=9,
                                                    by_state={"ESTABLISHED": 120}, top_flows=[old]))
    # Flow port 1 is quiet now (1 new event): without its baseline it would rank last of 8.
    fresh = [counters(WEB, 1, 1)] + [counters(WEB, 1000 + i, 10 + i) for i in range(7)]
    agent.program = RecordedProgram(snapshot(fresh))
    entry = agent.build_entry()
    assert entry.retransmits == 120 + sum(f.retransmits for f in fresh)
    assert entry.by_state == {"ESTABLISHED": entry.retransmits}
    assert entry.flows == 9  # never fewer than before the restart
    assert [(f.local.port, f.retransmits) for f in entry.top_flows] == [(1, 101), (1006, 16), (1005, 15)]
    assert all(f.local.pod == "web" for f in entry.top_flows)


def test_a_node_that_cannot_trace_reports_failed_and_keeps_earlier_counts(agent):
    agent.baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=42))
    agent.problem = "tracepoint tcp:tcp_retransmit_skb is missing (...): use Linux 4.16 or later"
    entry = agent.build_entry()
    assert entry.phase == "Failed" and entry.message == agent.problem
    assert entry.retransmits == 42


def test_metrics_count_by_local_pod_and_remote_port(agent):
    agent.baseline = Baseline()
    agent.program = RecordedProgram(snapshot([counters(WEB, 1, 4, remote_port=5432), counters(WEB, 2, 3, remote_port=5432),
                                              counters(DB, 3, 2, family="IPv6", remote_ip="fd00::9")]))
    agent.build_entry()
    assert agent.state.by_pod_port == {("shop", "web", "5432"): 7, ("shop", "db", "443"): 2}
    assert agent.state.retransmits == 9


def test_top_pods_count_every_flow_in_the_kernel_map_by_local_pod_and_skip_the_node(agent):
    agent.baseline = Baseline()
    # 3 top flows kept, 40 flows counted: web's many small flows are all in its count.
    flows = [counters(WEB, 1000 + i, 2) for i in range(30)]
    flows += [counters(DB, 5432, 20, family="IPv6", remote_ip="fd00::9", synack=3), counters("198.18.0.3", 5433, 4)]
    flows += [counters("10.1.0.5", 2200 + i, 50 + i) for i in range(8)]  # the node's own address: no pod
    agent.program = RecordedProgram(snapshot(flows))
    entry = agent.build_entry()
    assert len(entry.top_flows) == 3 and all(f.local.node == "n1" for f in entry.top_flows)
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in entry.top_pods] == [
        ("shop", "web", "n1", 60), ("shop", "db", "n1", 27),
    ]


def test_a_restarted_agent_continues_its_pods_counts_and_they_never_drop(agent):
    agent.baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=500, top_pods=[
        PodCount(namespace="shop", pod="web", node="n1", retransmits=400),
        PodCount(namespace="shop", pod="db", node="n1", retransmits=100)]))
    agent.program = RecordedProgram(snapshot([counters(WEB, 1, 7), counters(WEB, 2, 3)]))
    assert [(p.pod, p.retransmits) for p in agent.build_entry().top_pods] == [("web", 410), ("db", 100)]
    # The kernel's LRU map evicted flow 2: web's count holds.
    agent.program = RecordedProgram(snapshot([counters(WEB, 1, 8)]))
    assert [(p.pod, p.retransmits) for p in agent.build_entry().top_pods] == [("web", 410), ("db", 100)]


def test_a_node_that_cannot_trace_keeps_its_earlier_pods(agent):
    agent.baseline = Baseline.from_entry(NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=42, top_pods=[
        PodCount(namespace="shop", pod="web", node="n1", retransmits=42)]))
    agent.problem = "BPF not permitted"
    entry = agent.build_entry()
    assert entry.phase == "Failed" and [(p.pod, p.retransmits) for p in entry.top_pods] == [("web", 42)]
