"""The cluster-wide agent count: how the operator sums it over every running trace's
DaemonSet, when it rewrites it, how agents and the operator's staleness bound read it back
(one function each, core/schedule.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.naming import AGENTS_LOWERED_ANNOTATION, CLUSTER_AGENTS_ANNOTATION
from retransmit_core.schedule import (
    AGENT_COUNT_REFRESH_SECONDS,
    AGENT_COUNT_TOLERANCE,
    annotated_agents,
    bound_agents,
    cluster_agents,
    desired_nodes,
    heartbeat_seconds,
    lowered_note,
    nodes_scheduled,
    report_period,
    shared_agent_count,
    stale_after,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def daemonset(desired: int, annotations: dict[str, str] | None = None, *, deleting: bool = False,
              generation: int = 1, observed: int = 1) -> dict:
    meta = {"name": "rtrace-x", "generation": generation, "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = NOW.isoformat()
    return {"metadata": meta, "status": {"desiredNumberScheduled": desired, "observedGeneration": observed}}


def test_the_cluster_count_sums_every_running_traces_agents():
    assert cluster_agents([daemonset(5000), daemonset(3000), daemonset(7, deleting=True)]) == 8000
    assert cluster_agents([]) == 0


def test_the_written_count_stays_until_it_is_more_than_the_tolerance_off():
    assert shared_agent_count([1000, 1000], 1000 + int(1000 * AGENT_COUNT_TOLERANCE)) == 1000
    assert shared_agent_count([1000, 1000], 1000 - int(1000 * AGENT_COUNT_TOLERANCE)) == 1000
    assert shared_agent_count([1000, 1000], 1101) == 1101
    assert shared_agent_count([1000, 1000], 899) == 899
    # Any DaemonSet without it, or two that disagree: every one gets the live sum.
    assert shared_agent_count([1000, None], 1000) == 1000 and shared_agent_count([None], 40) == 40
    assert shared_agent_count([1000, 1050], 1020) == 1020
    assert shared_agent_count([], 0) == 0 and shared_agent_count([0], 1) == 1


def test_agents_read_the_cluster_count_and_their_own_where_it_is_more():
    assert desired_nodes(daemonset(5000, {CLUSTER_AGENTS_ANNOTATION: "25000"})) == 25000
    assert desired_nodes(daemonset(5000)) == 5000 == nodes_scheduled(daemonset(5000, {CLUSTER_AGENTS_ANNOTATION: "25000"}))
    assert desired_nodes(daemonset(6000, {CLUSTER_AGENTS_ANNOTATION: "5000"})) == 6000
    # Before the controller saw the current generation, the annotated count alone.
    unseen = daemonset(0, {CLUSTER_AGENTS_ANNOTATION: "700"}, generation=2)
    assert nodes_scheduled(unseen) is None and desired_nodes(unseen) == 700
    assert desired_nodes(daemonset(0, generation=2)) is None and desired_nodes(None) is None
    assert annotated_agents(daemonset(1, {CLUSTER_AGENTS_ANNOTATION: "many"})) is None


def test_a_shared_count_stretches_every_traces_schedule_alike():
    five = [daemonset(5000, {CLUSTER_AGENTS_ANNOTATION: "25000"}) for _ in range(5)]
    counts = {desired_nodes(ds) for ds in five}
    assert counts == {25000}
    assert report_period(10.0, 25000) == 250.0 and heartbeat_seconds(10.0, 25000) == 250.0
    assert {stale_after(10.0, bound_agents(ds, 10.0, NOW)) for ds in five} == {stale_after(10.0, 25000)}


def test_a_lowered_count_keeps_the_bound_while_agents_may_follow_the_old_one():
    note = lowered_note(daemonset(5000, {CLUSTER_AGENTS_ANNOTATION: "25000"}), 5000, NOW)
    lowered = daemonset(5000, {CLUSTER_AGENTS_ANNOTATION: "5000", AGENTS_LOWERED_ANNOTATION: note})
    assert desired_nodes(lowered) == 5000   # what agents follow once they re-read it
    assert bound_agents(lowered, 10.0, NOW + timedelta(seconds=AGENT_COUNT_REFRESH_SECONDS)) == 25000
    after = AGENT_COUNT_REFRESH_SECONDS + stale_after(10.0, 25000).total_seconds() + 1
    assert bound_agents(lowered, 10.0, NOW + timedelta(seconds=after)) == 5000
    # Raised, or unchanged: no note.
    assert lowered_note(daemonset(1, {CLUSTER_AGENTS_ANNOTATION: "5000"}), 6000, NOW) is None
    assert lowered_note(daemonset(1), 6000, NOW) is None
    # Lowered twice within a refresh: the older, higher count stays in the note.
    again = lowered_note(lowered, 1000, NOW + timedelta(seconds=60))
    assert again is not None and again.split()[0] == "25000"
    later = lowered_note(lowered, 1000, NOW + timedelta(seconds=AGENT_COUNT_REFRESH_SECONDS + 1))
    assert later is not None and later.split()[0] == "5000"
    garbled = daemonset(5000, {CLUSTER_AGENTS_ANNOTATION: "5000", AGENTS_LOWERED_ANNOTATION: "25000 yesterday"})
    assert bound_agents(garbled, 10.0, NOW) == 5000
