"""Status stays under etcd's object limit at 1,000 nodes: entries shrink, counts do not."""

import json
from datetime import datetime, timezone

import pytest

from retransmit_agent.reporter import MANAGED_FIELDS_BYTES_PER_NODE, entry_budget_bytes, entry_size, fit_entry
from retransmit_operator.api import Endpoint, Flow, NodeStatus, PodCount, RecentEvent, RetransmitTraceStatus, to_api

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=timezone.utc)
ETCD_LIMIT = 1536 * 1024


def endpoint(i: int, pod: str) -> Endpoint:
    return Endpoint(ip=f"fd00:0:1:{i % 65536:x}::{i % 250 + 2:x}", port=40000 + i % 20000,
                    pod=f"{pod}-7d9c8b6f5-{i:05d}", namespace="payments-production")


def full_entry(node: int) -> NodeStatus:
    """A node entry at the spec's defaults (10 flows, 10 pods, 20 events), every side attributed."""
    flows = [Flow(local=endpoint(node * 100 + k, "checkout"), remote=endpoint(node * 100 + k + 50, "ledger"),
                  family="IPv6", retransmits=1000 - k, synack_retransmits=k, last_state="ESTABLISHED",
                  first_seen=NOW, last_seen=NOW) for k in range(10)]
    events = [RecentEvent(time=NOW, kind="retransmit", family="IPv6", local=endpoint(k, "checkout"),
                          remote=endpoint(k + 1, "ledger"), state="ESTABLISHED") for k in range(20)]
    name = f"ip-10-0-{node // 256}-{node % 256}.eu-west-1.compute.internal"
    pods = [PodCount(namespace="payments-production", pod=f"checkout-7d9c8b6f5-{node * 100 + k:05d}", node=name,
                     retransmits=100000 - k) for k in range(10)]
    return NodeStatus(node=name, phase="Running", top_pods=pods,
                      retransmits=123456789, synack_retransmits=4321, lost_events=98765, flows=31234,
                      by_state={"ESTABLISHED": 123000000, "SYN_SENT": 456789, "SYN_RECV": 4321},
                      top_flows=flows, recent_events=events, last_report_time=NOW,
                      kernel="5.14.0-427.13.1.el9_4.x86_64", agent_version="0.1.0")


def test_a_small_cluster_keeps_every_flow_and_event():
    entry = full_entry(1)
    assert fit_entry(entry, entry_budget_bytes(3)) == entry


@pytest.mark.parametrize("nodes", [100, 500, 1000])
def test_all_entries_together_stay_under_a_mebibyte_and_keep_their_counts(nodes):
    entries = [fit_entry(full_entry(n), entry_budget_bytes(nodes)) for n in range(nodes)]
    status = RetransmitTraceStatus(nodes=entries)
    size = len(json.dumps(to_api(status), separators=(",", ":")))
    # Each node's field manager adds a managedFields record to the object: it counts too.
    assert size + nodes * MANAGED_FIELDS_BYTES_PER_NODE <= 1024 * 1024 < ETCD_LIMIT
    for entry in entries:
        assert entry.retransmits == 123456789 and entry.by_state["ESTABLISHED"] == 123000000
        # Within its share, or down to counts only where even those exceed it (the floor).
        counts_only = entry.model_copy(update={"top_flows": [], "recent_events": [], "top_pods": []})
        assert entry_size(entry) <= max(entry_budget_bytes(nodes), entry_size(counts_only))


def test_samples_go_before_flows_and_the_busiest_flows_stay():
    entry = full_entry(7)
    without_events = entry.model_copy(update={"recent_events": []})
    trimmed = fit_entry(entry, entry_size(without_events))
    assert trimmed.recent_events == [] and trimmed.top_flows == entry.top_flows
    fewer = fit_entry(entry, entry_size(without_events) - 10)
    assert fewer.top_flows == entry.top_flows[:len(fewer.top_flows)] and len(fewer.top_flows) < 10


def test_a_hundred_node_trace_keeps_some_flows_and_some_pods_per_node():
    """The summary needs both: which connections (flows) and exact per-pod totals (pods)."""
    entry = fit_entry(full_entry(3).model_copy(update={"top_pods": _pods(10)}), entry_budget_bytes(100))
    assert entry.top_flows and entry.top_pods and entry.recent_events == []


def _pods(n: int):
    from retransmit_operator.api import PodCount
    return [PodCount(pod=f"checkout-{i:05d}", namespace="payments-production", node="n", retransmits=100 - i)
            for i in range(n)]
