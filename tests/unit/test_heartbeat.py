"""The heartbeat is one rule with two readers: the agent's write schedule and the operator's
staleness bound. These tests run the agent's real schedule (must_write over jittered waits)
against the operator's real bound (stale_after), so the two halves cannot drift apart."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.reporter import jittered
from retransmit_operator.aggregate import aggregate_summary, stale_nodes
from retransmit_operator.api import NodeStatus
from retransmit_operator.conditions import Observation, compute_status
from retransmit_operator.heartbeat import HEARTBEAT_INTERVALS, WRITE_TIMEOUT_SECONDS, must_write, stale_after

pytestmark = pytest.mark.unit


def quiet_agent_writes(interval: float, rng, reports: int = 200) -> list[float]:
    """Times a quiet agent (nothing ever changes) stores a write, with the agent's own waits."""
    t, last, writes = 0.0, None, []
    for _ in range(reports):
        if must_write(False, None if last is None else t - last, interval):
            # The write itself takes up to its timeout before it is stored.
            last = t
            writes.append(t)
        t += jittered(interval, rng=rng)
    return writes


@pytest.mark.parametrize("interval", [1.0, 10.0, 60.0])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0], ids=["shortest", "middle", "longest"])
def test_a_quiet_agent_writes_within_the_operators_staleness_bound(interval, jitter):
    writes = quiet_agent_writes(interval, lambda: jitter)
    gaps = [b - a for a, b in zip(writes, writes[1:])]
    assert len(writes) > 20
    # The longest gap plus a write that took its whole timeout stays inside the bound.
    assert max(gaps) + WRITE_TIMEOUT_SECONDS < stale_after(interval).total_seconds()
    # And the agent does not write more than needed: about one write per heartbeat period.
    assert min(gaps) >= (HEARTBEAT_INTERVALS - 1) * interval


def test_a_changed_report_is_written_at_once_and_a_first_report_always():
    assert must_write(True, 0.1, 10.0)
    assert must_write(False, None, 10.0)
    assert not must_write(False, 10.0, 10.0)


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def entry(name: str, age: timedelta, phase: str = "Running") -> NodeStatus:
    return NodeStatus(node=name, phase=phase, last_report_time=NOW - age)


def test_a_node_silent_past_the_bound_is_named_in_agents_ready():
    bound = stale_after(10.0)
    nodes = [entry("quiet", bound - timedelta(seconds=1)), entry("gone", bound + timedelta(seconds=1)),
             entry("broken", bound * 10, phase="Failed")]
    summary = aggregate_summary(nodes, nodes_desired=3, top_n=10, pod_index=None, now=NOW, stale_after=bound)
    assert summary.nodes == "1/3"
    assert stale_nodes(nodes, NOW, bound) == ["gone"]
    status = compute_status(Observation(generation=1, spec_error=None, start_time=NOW, completion_time=None,
                                        nodes=nodes[:2], summary=aggregate_summary(nodes[:2], 2, 10, None, now=NOW, stale_after=bound),
                                        now=NOW, stale_nodes=["gone"], stale_after=bound), [])
    agents = next(c for c in status.conditions if c.type == "AgentsReady")
    assert agents.status == "False" and agents.reason == "AgentsNotReporting"
    assert "gone" in agents.message and "quiet" not in agents.message.split("from", 1)[1]
