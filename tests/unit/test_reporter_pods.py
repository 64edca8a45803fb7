"""Per-pod counts of one node: every flow in the kernel map by local pod, resumed across restarts."""

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.flows import FlowCounters
from retransmit_agent.resume import (
    Baseline,
    cumulative_pods,
    pod_totals,
    ranked_pods,
)
from retransmit_core.api import Endpoint, Flow, NodeStatus, PodCount, RecentEvent, to_api

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PODS = {"198.18.0.2": ("shop", "web"), "fd00::2": ("shop", "web"), "198.18.0.3": ("data", "db")}


def counters(local_ip, local_port, retransmits, synack=0, family="IPv4"):
    return FlowCounters(family=family, local_ip=local_ip, local_port=local_port, remote_ip="203.0.113.9",
                        remote_port=443, retransmits=retransmits, synack_retransmits=synack,
                        last_state="ESTABLISHED", first_seen=T0, last_seen=T0 + timedelta(seconds=1))


def entry(**kw):
    return NodeStatus(node="n1", phase="Running", **kw)


def test_pod_totals_add_every_flow_and_synacks_by_local_pod_and_skip_non_pods():
    flows = [counters("198.18.0.2", 1000 + i, 3) for i in range(50)]          # 50 flows: far more than a top N
    flows += [counters("fd00::2", 1, 2, synack=1, family="IPv6"),             # same pod, IPv6
              counters("198.18.0.3", 5432, 0, synack=4),                      # SYN-ACKs only
              counters("10.1.0.5", 22, 9),                                    # the node / hostNetwork
              counters("203.0.113.7", 80, 5)]                                 # unknown address
    assert pod_totals(flows, PODS.get) == {("shop", "web"): 153, ("data", "db"): 4}


def test_a_restarted_agent_adds_its_fresh_counts_to_the_earlier_agents_pods():
    before = entry(retransmits=100, top_pods=[PodCount(namespace="shop", pod="web", node="n1", retransmits=80),
                                              PodCount(namespace="data", pod="db", node="n1", retransmits=20)])
    baseline = Baseline.from_entry(NodeStatus.model_validate(to_api(before)))  # as read back from the API
    assert baseline.top_pods == {("shop", "web"): 80, ("data", "db"): 20} and not baseline.empty
    # The new kernel map starts empty: web has 5 new retransmits, db none yet, cache is new.
    counts = cumulative_pods(baseline, {("shop", "web"): 5, ("shop", "cache"): 1}, {})
    assert counts == {("shop", "web"): 85, ("data", "db"): 20, ("shop", "cache"): 1}


def test_pod_counts_never_go_down_when_flows_leave_the_kernel_map_or_pods_the_index():
    baseline = Baseline.from_entry(entry(top_pods=[PodCount(namespace="shop", pod="web", retransmits=10)]))
    first = cumulative_pods(baseline, {("shop", "web"): 30, ("data", "db"): 7}, {})
    # Next report: an evicted flow took 25 of web's fresh count; db's pod was deleted.
    second = cumulative_pods(baseline, {("shop", "web"): 8}, first)
    assert first == {("shop", "web"): 40, ("data", "db"): 7}
    assert second == first
    third = cumulative_pods(baseline, {("shop", "web"): 45}, second)
    assert third[("shop", "web")] == 55


def test_counts_survive_repeated_restarts():
    previous, reported = None, []
    for new in (5, 0, 8):
        baseline = Baseline.from_entry(previous)
        counts = cumulative_pods(baseline, {("shop", "web"): new} if new else {}, {})
        pods = ranked_pods(counts, "n1", 10)
        reported.append([p.retransmits for p in pods])
        previous = NodeStatus.model_validate(to_api(entry(top_pods=pods)))
    assert reported == [[5], [5], [13]]


def test_ranked_pods_busiest_first_with_stable_ties_and_at_most_top_n():
    counts = {("b", "x"): 5, ("a", "y"): 5, ("a", "z"): 9, ("a", "idle"): 0}
    pods = ranked_pods(counts, "n1", 2)
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in pods] == [("a", "z", "n1", 9), ("a", "y", "n1", 5)]
    assert len(ranked_pods(counts, "n1", 0)) == 3


def full_entry():
    flows = [Flow(local=Endpoint(ip="198.18.0.2", port=k, pod="web", namespace="shop"),
                  remote=Endpoint(ip="198.18.0.3", port=5432, pod="db", namespace="data"),
                  family="IPv4", retransmits=100 - k, last_state="ESTABLISHED", first_seen=T0, last_seen=T0)
             for k in range(10)]
    events = [RecentEvent(time=T0, kind="retransmit", family="IPv4", local=f.local, remote=f.remote) for f in flows]
    pods = [PodCount(namespace="shop", pod=f"web-{k}", node="n1", retransmits=1000 - k) for k in range(10)]
    return entry(retransmits=5000, top_flows=flows, recent_events=events, top_pods=pods)
