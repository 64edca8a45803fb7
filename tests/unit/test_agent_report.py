"""A kernel snapshot becomes the API's node entry (NodeStatus), as `retransmit-agent local` makes it:
node_entry without a baseline and without attribution."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.flows import FlowCounters
from retransmit_agent.kernel import KernelSnapshot
from retransmit_agent.nodeentry import NodeFacts, node_entry
from retransmit_core.api import Endpoint, NodeStatus, RecentEvent, to_api

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def flow(port: int, retransmits: int, synacks: int = 0, family: str = "IPv4") -> FlowCounters:
    local, remote = ("10.0.0.1", "10.0.0.2") if family == "IPv4" else ("fd00::1", "fd00::2")
    return FlowCounters(family, local, port, remote, 443, retransmits, synacks, "ESTABLISHED",
                        T0, T0 + timedelta(seconds=port))


def snapshot(flows: list[FlowCounters]) -> KernelSnapshot:
    return KernelSnapshot(retransmits=1000, synack_retransmits=3, lost_events=17, sampled_events=986,
                          failed_attempts=2, missed_events=5, by_state={"SYN_RECV": 3, "ESTABLISHED": 1000}, flow_counters=flows)


def local_entry(snap: KernelSnapshot, top_n: int, node: str = "n", kernel: str | None = None, version: str | None = None,
                events=(), keep_events: int = 20) -> NodeStatus:
    return node_entry(snap, NodeFacts(node, kernel, version), top_flows=top_n, keep_events=keep_events, now=T0,
                      recent_events=events).entry


def test_totals_come_from_the_kernel_totals_not_the_flow_sum():
    report = local_entry(snapshot([flow(1, 5)]), 10, "node-a", "6.18", "0.1.0")
    assert (report.retransmits, report.synack_retransmits, report.lost_events) == (1000, 3, 17)
    assert report.missed_events == 5  # hits the kernel skipped: the counts may be low by this much
    assert report.flows == 1
    assert report.by_state == {"ESTABLISHED": 1000, "SYN_RECV": 3}
    assert report.phase == "Running" and report.node == "node-a"
    assert report.kernel == "6.18" and report.agent_version == "0.1.0" and report.last_report_time == T0


def test_top_n_keeps_the_busiest_flows_and_zero_keeps_all():
    flows = [flow(1, 5), flow(2, 50), flow(3, 0, synacks=9), flow(4, 1, family="IPv6")]
    top2 = local_entry(snapshot(flows), 2)
    assert [f.local.port for f in top2.top_flows] == [2, 3]
    assert top2.flows == 4
    everything = local_entry(snapshot(flows), 0)
    assert [f.local.port for f in everything.top_flows] == [2, 3, 1, 4]


def test_report_serialises_with_the_api_names():
    events = [RecentEvent(time=T0, kind="retransmit", family="IPv4", local=Endpoint(ip="10.0.0.1", port=1),
                          remote=Endpoint(ip="10.0.0.2", port=443), state="ESTABLISHED")] * 3
    entry = local_entry(snapshot([flow(7, 2, family="IPv6")]), 10, events=events, keep_events=2)
    doc = to_api(entry)
    assert {"retransmits", "synackRetransmits", "lostEvents", "missedEvents", "flows", "topFlows", "byState", "recentEvents"} <= set(doc)
    top = doc["topFlows"][0]
    assert top["family"] == "IPv6" and top["local"] == {"ip": "fd00::1", "port": 7}
    assert top["remote"] == {"ip": "fd00::2", "port": 443}
    assert top["lastState"] == "ESTABLISHED" and top["firstSeen"].startswith("2026-01-01T00:00:00")
    assert len(doc["recentEvents"]) == 2
    assert doc["missedEvents"] == 5
    assert NodeStatus.model_validate(doc) == entry


def test_a_node_that_needs_privileged_says_so_in_its_failed_entry():
    why = "not permitted to load BPF programs (uid 0): this kernel has no CAP_BPF or CAP_PERFMON (cap_last_cap is 37)"
    entry = node_entry(None, NodeFacts("old", problem=why, needs_privileged=True), top_flows=10, keep_events=5,
                       now=T0).entry
    assert (entry.phase, entry.message, entry.needs_privileged) == ("Failed", why, True)
    assert to_api(entry)["needsPrivileged"] is True
    # Any other problem (privileges would not help), and a node that traces, do not ask.
    other = node_entry(None, NodeFacts("n", problem="tracefs is not mounted"), top_flows=10, keep_events=5, now=T0).entry
    assert other.needs_privileged is None and "needsPrivileged" not in to_api(other)
    assert local_entry(snapshot([]), 10).needs_privileged is None
