"""The heartbeat is one rule with two readers: the agent's write schedule and the operator's
staleness bound. These tests run the agent's real schedule (next_write over jittered waits)
against the operator's real bound (stale_after) for the same cluster-wide agent count, so the
two halves cannot drift apart."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.backoff import jittered
from retransmit_operator.aggregate import aggregate_summary, stale_nodes
from retransmit_core.api import NodeStatus
from retransmit_operator.conditions import Observation, compute_status
from retransmit_core.schedule import (
    HEARTBEAT_INTERVALS,
    LEASE_RENEWALS_PER_SECOND,
    REPORT_WRITES_PER_SECOND,
    WRITE_TIMEOUT_SECONDS,
    Write,
    heartbeat_seconds,
    next_write,
    report_period,
    stale_after,
)

pytestmark = pytest.mark.unit


def agent_writes(interval: float, rng, nodes: int = 1, busy: bool = False, wakeups: int = 400
                 ) -> list[tuple[float, Write]]:
    """(time, kind) of each write an agent stores, with the agent's own jittered waits; a busy
    agent's counts change between every two wake-ups, a quiet agent's never do."""
    t, last_report, last_write, writes = 0.0, None, None, []
    for _ in range(wakeups):
        since = lambda at: None if at is None else t - at  # noqa: E731
        write = next_write(busy, since(last_report), since(last_write), interval, nodes)
        if write is not Write.NOTHING:
            writes.append((t, write))
            last_write = t
            if write is Write.REPORT:
                last_report = t
        t += jittered(interval, rng=rng)
    return writes


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("interval", [1.0, 10.0, 60.0])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0], ids=["shortest", "middle", "longest"])
@pytest.mark.parametrize("agents", [1, 5000, 25000])
def test_a_quiet_agent_renews_its_heartbeat_within_the_operators_staleness_bound(interval, jitter, agents):
    writes = agent_writes(interval, lambda: jitter, nodes=agents, wakeups=400 * max(1, round(agents / 1000)))
    assert writes[0][1] is Write.REPORT and {w for _, w in writes[1:]} == {Write.HEARTBEAT}
    between = gaps([t for t, _ in writes])
    assert len(writes) > 20
    # The longest gap plus a write that took its whole timeout stays inside the bound.
    assert max(between) + WRITE_TIMEOUT_SECONDS < stale_after(interval, agents).total_seconds()
    # And the agent does not write more than needed: about one write per heartbeat period.
    assert min(between) >= heartbeat_seconds(interval, agents) - interval / 2
    assert min(between) >= (HEARTBEAT_INTERVALS - 1) * interval


@pytest.mark.parametrize("nodes", [1, 1000, 5000, 20000, 25000, 100000])
def test_a_busy_agent_writes_its_report_every_period_and_stays_within_the_bound(nodes):
    interval = 10.0
    writes = agent_writes(interval, random.Random(nodes).random, nodes=nodes, busy=True, wakeups=4000)
    reports = [t for t, w in writes if w is Write.REPORT]
    period = report_period(interval, nodes)
    # Report writes: about one per period, never sooner than half an interval before it ends.
    assert min(gaps(reports)) >= period - interval / 2
    assert max(gaps(reports)) <= period + interval * 1.1
    # Between them, heartbeats keep the node inside the operator's bound, whatever the size.
    assert max(gaps([t for t, _ in writes])) + WRITE_TIMEOUT_SECONDS < stale_after(interval, nodes).total_seconds()
    if period > heartbeat_seconds(interval, nodes):
        assert any(w is Write.HEARTBEAT for _, w in writes)


@pytest.mark.parametrize("interval", [1.0, 10.0, 60.0])
def test_all_agents_of_the_cluster_stay_within_the_write_budgets(interval):
    """agents / period report writes and agents / heartbeat Lease renewals per second: the
    interval's rate while it is within the budget, the budget beyond, for the agents of every
    running trace together."""
    for agents in (10, 1000, 5000, 20000, 25000, 100000):
        assert agents / report_period(interval, agents) == pytest.approx(min(agents / interval, REPORT_WRITES_PER_SECOND))
        assert agents / heartbeat_seconds(interval, agents) == pytest.approx(
            min(agents / (HEARTBEAT_INTERVALS * interval), LEASE_RENEWALS_PER_SECOND))
    assert report_period(10.0, 5000) == 50.0 and report_period(10.0, 0) == 10.0
    # The case: a 1 s trace on 5,000 nodes renewed ~1,700 Leases/s; now the budget.
    assert 5000 / heartbeat_seconds(1.0, 5000) == LEASE_RENEWALS_PER_SECOND


def test_five_traces_share_one_traces_budget():
    """Five traces of 5,000 nodes: each agent follows the count of all 25,000, so together they
    send what one trace of 5,000 sent before, not five times that."""
    one, five = 5000, 5 * 5000
    assert five / report_period(10.0, five) == one / report_period(10.0, one) == REPORT_WRITES_PER_SECOND
    assert five / heartbeat_seconds(10.0, five) == LEASE_RENEWALS_PER_SECOND
    assert report_period(10.0, five) == 5 * report_period(10.0, one)
    # And the operator's bound follows the same count: a quiet agent of 25,000 is not stale.
    assert stale_after(10.0, five) > stale_after(10.0, one) > stale_after(10.0, 1)
    assert stale_after(10.0, five).total_seconds() > heartbeat_seconds(10.0, five) * 1.1 + WRITE_TIMEOUT_SECONDS


@pytest.mark.parametrize("interval", [10.0, 30.0, 60.0])
def test_one_trace_below_1000_nodes_keeps_its_schedule(interval):
    """The default interval and longer: below 1,000 agents, nothing stretches; the period is
    the interval, the heartbeat 3 intervals and the bound the one before the shared budget."""
    for agents in (0, 1, 10, 500, 999, 1000):
        assert report_period(interval, agents) == interval
        assert heartbeat_seconds(interval, agents) == HEARTBEAT_INTERVALS * interval
        longest_wait = interval * 1.1
        assert stale_after(interval, agents).total_seconds() == pytest.approx(
            HEARTBEAT_INTERVALS * longest_wait + longest_wait + WRITE_TIMEOUT_SECONDS)


def test_a_changed_report_is_written_at_once_and_a_first_report_always():
    assert next_write(True, 10.0, 10.0, 10.0, 1) is Write.REPORT
    assert next_write(False, None, None, 10.0, 1) is Write.REPORT
    assert next_write(False, 10.0, 10.0, 10.0, 1) is Write.NOTHING
    assert next_write(False, 30.0, 25.0, 10.0, 1) is Write.HEARTBEAT
    # On 5,000 agents a change waits for the 50 s period, and the heartbeat is stretched as
    # long: a busy agent writes its report and nothing in between, a quiet one its Lease.
    assert next_write(True, 20.0, 20.0, 10.0, 5000) is Write.NOTHING
    assert next_write(True, 36.0, 36.0, 10.0, 5000) is Write.NOTHING
    assert next_write(True, 46.0, 46.0, 10.0, 5000) is Write.REPORT
    assert next_write(False, 36.0, 36.0, 10.0, 5000) is Write.NOTHING
    assert next_write(False, 46.0, 46.0, 10.0, 5000) is Write.HEARTBEAT
    # Below 1,000 agents at the default interval, as before: a Lease every 3 intervals.
    assert next_write(False, 26.0, 26.0, 10.0, 999) is Write.HEARTBEAT


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def entry(name: str, age: timedelta, phase: str = "Running") -> NodeStatus:
    return NodeStatus(node=name, phase=phase, last_report_time=NOW - age)


def test_a_node_silent_past_the_bound_is_named_in_agents_ready():
    bound = stale_after(10.0, 3)
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
