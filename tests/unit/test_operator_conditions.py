"""Phase, conditions and completion as pure functions of what the operator observed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.api import NodeStatus, Summary, UncoveredNodes
from retransmit_operator.conditions import (
    Observation, compute_status, deadline, is_due, transitions,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def obs(**kw):
    base = dict(generation=1, spec_error=None, start_time=T0, completion_time=None, nodes=[],
                summary=Summary(nodes_desired=2, nodes_reporting=2, nodes="2/2"), now=T0 + timedelta(seconds=5))
    base.update(kw)
    return Observation(**base)


def cond(status, type_):
    return next(c for c in status.conditions if c.type == type_)


def test_pending_before_the_daemonset_exists():
    s = compute_status(obs(start_time=None, summary=Summary()), [])
    assert s.phase == "Pending" and cond(s, "Ready").status == "False"


def test_running_and_ready_when_every_desired_agent_reports():
    s = compute_status(obs(), [])
    assert s.phase == "Running"
    assert cond(s, "Ready").status == "True" and cond(s, "AgentsReady").reason == "AllAgentsReporting"
    assert cond(s, "Degraded").status == "False"
    assert all(c.observed_generation == 1 for c in s.conditions) and s.observed_generation == 1


def test_agents_starting_until_all_report():
    s = compute_status(obs(summary=Summary(nodes_desired=3, nodes_reporting=1, nodes="1/3")), [])
    assert cond(s, "AgentsReady").status == "False" and cond(s, "AgentsReady").reason == "AgentsStarting"
    assert "1/3" in cond(s, "AgentsReady").message and cond(s, "Ready").status == "False"


def test_no_matching_nodes_says_what_to_check():
    s = compute_status(obs(summary=Summary(nodes_desired=0, nodes="0/0")), [])
    assert cond(s, "AgentsReady").reason == "NoMatchingNodes" and "nodeSelector" in cond(s, "AgentsReady").message


def test_desired_count_not_yet_known_is_not_reported_as_no_nodes():
    s = compute_status(obs(summary=Summary(nodes_desired=0, nodes="0/0"), nodes_desired_known=False), [])
    assert cond(s, "AgentsReady").reason == "AgentsScheduling"


def test_degraded_names_the_failed_node_and_its_message():
    failed = NodeStatus(node="node-b", phase="Failed", message="tracepoint tcp:tcp_retransmit_skb missing")
    s = compute_status(obs(nodes=[NodeStatus(node="node-a", phase="Running"), failed],
                           summary=Summary(nodes_desired=2, nodes_reporting=1, nodes="1/2")), [])
    d = cond(s, "Degraded")
    assert d.status == "True" and d.reason == "NodeFailed" and "node-b: tracepoint" in d.message
    assert cond(s, "AgentsReady").reason == "NodesFailed" and s.phase == "Running"


def test_invalid_spec_fails_with_reason_and_field():
    s = compute_status(obs(spec_error="spec.filter.remoteCIDRs[0]: '1:::2/64' is not a CIDR"), [])
    ready = cond(s, "Ready")
    assert s.phase == "Failed" and ready.status == "False" and ready.reason == "InvalidSpec"
    assert "spec.filter.remoteCIDRs[0]" in ready.message


def test_last_transition_time_kept_while_status_unchanged_and_moved_on_change():
    first = compute_status(obs(summary=Summary(nodes_desired=2, nodes_reporting=1, nodes="1/2")), [])
    later = T0 + timedelta(minutes=1)
    same = compute_status(obs(now=later, summary=Summary(nodes_desired=2, nodes_reporting=1, nodes="1/2", retransmits=5)), first.conditions)
    assert cond(same, "Ready").last_transition_time == cond(first, "Ready").last_transition_time
    flipped = compute_status(obs(now=later), first.conditions)
    assert cond(flipped, "Ready").last_transition_time == later
    assert cond(flipped, "Degraded").last_transition_time == cond(first, "Degraded").last_transition_time


def test_completion_is_due_at_start_plus_duration_regardless_of_who_asks():
    assert deadline(T0, 20) == T0 + timedelta(seconds=20)
    assert not is_due(T0, 20, T0 + timedelta(seconds=19))
    assert is_due(T0, 20, T0 + timedelta(seconds=20))
    assert is_due(T0, 20, T0 + timedelta(hours=5))     # operator was down past the end
    assert not is_due(T0, None, T0 + timedelta(days=9))  # no duration: until deleted
    assert not is_due(None, 20, T0)                     # not started


def test_completed_phase_and_conditions():
    s = compute_status(obs(completion_time=T0 + timedelta(seconds=20)), [])
    assert s.phase == "Completed" and s.completion_time == T0 + timedelta(seconds=20)
    assert cond(s, "Ready").reason == "Completed" and cond(s, "AgentsReady").reason == "TraceCompleted"


def test_events_on_transitions_only():
    starting = compute_status(obs(summary=Summary(nodes_desired=2, nodes_reporting=1, nodes="1/2")), [])
    assert transitions(None, starting) == []
    ready = compute_status(obs(), starting.conditions)
    assert [e[1] for e in transitions(starting, ready)] == ["AgentsReady"]
    assert transitions(ready, compute_status(obs(), ready.conditions)) == []
    done = compute_status(obs(completion_time=T0 + timedelta(seconds=20), summary=Summary(retransmits=42)), ready.conditions)
    (event,) = transitions(ready, done)
    assert event[:2] == ("Normal", "Completed") and "42 retransmits" in event[2]
    bad = compute_status(obs(spec_error="spec.topFlows: too many"), [])
    assert transitions(None, bad) == [("Warning", "InvalidSpec", "spec.topFlows: too many")]


def test_a_trace_beyond_the_limit_waits_pending_and_says_who_runs():
    waiting = "2 trace(s) run already (a, b), the most maxRunningTraces (2) allows: this trace starts when ..."
    s = compute_status(obs(start_time=None, summary=Summary(), waiting=waiting), [])
    assert s.phase == "Pending"
    assert (cond(s, "AgentsReady").reason, cond(s, "AgentsReady").message) == ("TraceLimitReached", waiting)
    assert cond(s, "Ready").reason == "TraceLimitReached" and cond(s, "Ready").status == "False"


def test_all_agents_reporting_still_names_the_linux_nodes_the_trace_misses():
    missed = UncoveredNodes(reason="TaintNotTolerated", count=1, nodes=["cp"],
                            detail="taints node-role.kubernetes.io/control-plane:NoSchedule are not tolerated: ...")
    s = compute_status(obs(summary=Summary(nodes_desired=2, nodes_reporting=2, nodes="2/2", nodes_linux=3,
                                           nodes_not_covered=[missed])), [])
    agents = cond(s, "AgentsReady")
    assert agents.status == "True" and agents.message.startswith("2/2 nodes reporting; 1 of 3 Linux nodes not covered")
    assert "TaintNotTolerated: cp: taints node-role.kubernetes.io/control-plane:NoSchedule" in agents.message
    full = compute_status(obs(summary=Summary(nodes_desired=2, nodes_reporting=2, nodes="2/2", nodes_linux=2)), [])
    assert cond(full, "AgentsReady").message == "2/2 nodes reporting"
