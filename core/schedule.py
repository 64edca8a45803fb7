"""The write schedule: when an agent writes its node's report, when it only renews its
heartbeat Lease, when the operator takes a node's silence for absence, and how long an
agent may take to stop. One definition, imported by both sides.

Two objects per (trace, node), as Kubernetes does for nodes (Node status + a Lease, KEP-589):
- the RetransmitNodeReport holds the counts (~10 KB on a busy node). An agent writes it when
  its content changed, at most every `report_period(interval, agents)`: the report interval,
  stretched on big clusters so that the agents of all running traces together send about
  REPORT_WRITES_PER_SECOND report writes (bench/: one report write costs the API server about
  11 ms of CPU, one Lease renewal about 1 ms);
- the heartbeat Lease (coordination.k8s.io) of the same name says "this report is current".
  An agent renews it when `heartbeat_seconds(interval, agents)` passed without any write:
  HEARTBEAT_INTERVALS intervals, stretched likewise so that all agents together renew about
  LEASE_RENEWALS_PER_SECOND Leases.

`agents` is the cluster's: the sum of every running trace's agents (desiredNumberScheduled of
each agents' DaemonSet). The operator writes it on every agents' DaemonSet
(CLUSTER_AGENTS_ANNOTATION, `shared_agent_count`); agents read it with `desired_nodes`.

The operator counts a node as reporting while the later of the report's lastReportTime and
the Lease's renewTime is younger than `stale_after(interval, agents)`: the longest gap a
healthy agent leaves between two writes of either kind, for the same count (`bound_agents`).
A quiet node therefore stays reporting at the cost of a Lease renewal, and a node whose agent
stopped drops out within that bound.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Optional

from .naming import AGENTS_LOWERED_ANNOTATION, CLUSTER_AGENTS_ANNOTATION

# An agent writes (report or heartbeat) at least every this many report intervals.
HEARTBEAT_INTERVALS = 3
# Each wait between two reports is the interval +- this fraction (agents do not write in lock-step).
INTERVAL_JITTER = 0.1
# Seconds one write may take before the agent gives up on it and retries.
WRITE_TIMEOUT_SECONDS = 10.0
# Report writes per second the agents of all running traces send together, at most, once they
# are so many that the report interval alone would exceed it (1,000 agents at the default 10 s
# interval: one trace on 1,000 nodes, or five on 200 each).
REPORT_WRITES_PER_SECOND = 100.0
# Lease renewals per second all agents send together, at most, once the heartbeat period alone
# would exceed it (3,000 agents at the default interval). Why as many as report writes, though a
# renewal costs a tenth of a report's CPU: each is still one etcd write and one watch event to
# the operator, and with equal budgets an agent whose report period and heartbeat both
# stretched (agents >= HEARTBEAT_INTERVALS * interval * budget) sends one or the other, never
# both, so the API server sees about this many writes/s of either kind whatever the number of
# traces or nodes, instead of ~1,700 renewals/s from a 1 s trace on 5,000 nodes.
LEASE_RENEWALS_PER_SECOND = 100.0
# Seconds between two reads of the agent count by an agent (its DaemonSet, one GET).
AGENT_COUNT_REFRESH_SECONDS = 300.0
# The operator rewrites CLUSTER_AGENTS_ANNOTATION only when the count moved by more than this
# fraction of the written one. Why: each rewrite patches every running trace's DaemonSet, so
# nodes joining or leaving one by one cost one round of patches per 10% the cluster grows or
# shrinks (about 7 from 1,000 to 2,000 agents), not one per node; and the schedule the agents
# follow is then at most 10% off the true count (writes/s at most 10% over the budget).
AGENT_COUNT_TOLERANCE = 0.1

# The agent's lifecycle, shared by the DaemonSet (operator) and the agent:
# SIGTERM -> final report -> exit. The pod's grace period leaves the final write its budget
# plus room for the program's detach; a write takes well under a second.
TERMINATION_GRACE_SECONDS = 30
FINAL_REPORT_BUDGET_SECONDS = TERMINATION_GRACE_SECONDS - 10
# /livez fails when the report loop has not beaten for this long (or 3 intervals when longer):
# the longest backoff (30 s) several times over, so a slow API server never restarts an agent.
LIVENESS_FLOOR_SECONDS = 120.0


def liveness_bound(interval: float) -> float:
    """Seconds without a loop beat after which the agent's /livez fails."""
    return max(LIVENESS_FLOOR_SECONDS, 3 * interval)


class Write(enum.Enum):
    """What an agent sends at one wake-up."""

    NOTHING = "nothing"
    REPORT = "report"        # the RetransmitNodeReport, whole (server-side apply)
    HEARTBEAT = "heartbeat"  # the Lease's renewTime only


def report_period(interval: float, agents: int) -> float:
    """Seconds between two report writes of one agent whose counts keep changing: the report
    interval, or longer where the cluster's `agents` at that interval would exceed the budget."""
    return max(interval, agents / REPORT_WRITES_PER_SECOND)


def heartbeat_seconds(interval: float, agents: int) -> float:
    """The longest an agent goes without any write when its report did not change:
    HEARTBEAT_INTERVALS intervals, or longer where the cluster's `agents` renewing that often
    would exceed the Lease budget."""
    return max(HEARTBEAT_INTERVALS * interval, agents / LEASE_RENEWALS_PER_SECOND)


def next_write(changed: bool, since_report: Optional[float], since_write: Optional[float],
               interval: float, agents: int) -> Write:
    """The agent's schedule, checked once per (jittered) interval.

    since_report: seconds since the last stored report write (None: none yet by this agent);
    since_write: seconds since the last stored write of either kind. A deadline is due from
    half an interval before it ends, so a jittered wake-up never overshoots it by a whole one.
    """
    if since_report is None:
        return Write.REPORT
    if changed and since_report >= report_period(interval, agents) - interval / 2:
        return Write.REPORT
    if since_write is None or since_write >= heartbeat_seconds(interval, agents) - interval / 2:
        return Write.HEARTBEAT
    return Write.NOTHING


def stale_after(interval: float, agents: int) -> timedelta:
    """How long since a node's last write (report or heartbeat) before the operator counts it
    as not reporting: the heartbeat period at the longest jitter, one retried interval, one
    timeout, for the same cluster-wide `agents` the agents' schedule uses."""
    longest_wait = interval * (1 + INTERVAL_JITTER)
    heartbeat = heartbeat_seconds(interval, agents) * (1 + INTERVAL_JITTER)
    return timedelta(seconds=heartbeat + longest_wait + WRITE_TIMEOUT_SECONDS)


def nodes_scheduled(daemonset: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The trace's own nodes, as the operator shows them (nodesDesired): the DaemonSet's
    desiredNumberScheduled once its controller has seen the current generation."""
    if not daemonset:
        return None
    status = daemonset.get("status") or {}
    if (status.get("observedGeneration") or 0) < (daemonset.get("metadata") or {}).get("generation", 0):
        return None
    return int(status.get("desiredNumberScheduled") or 0)


def _annotations(daemonset: Mapping[str, Any]) -> Mapping[str, str]:
    return (daemonset.get("metadata") or {}).get("annotations") or {}


def annotated_agents(daemonset: Mapping[str, Any]) -> Optional[int]:
    """The cluster-wide count the operator wrote on this DaemonSet (None: none yet)."""
    value = str(_annotations(daemonset).get(CLUSTER_AGENTS_ANNOTATION) or "")
    return int(value) if value.isdigit() else None


def desired_nodes(daemonset: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The `agents` of the write schedule as the agents read it from their DaemonSet
    (agent/reportwriter.py ReportWriter.desired_nodes) and the operator's bound takes it: the
    cluster-wide count the operator annotated, or the trace's own nodes where more (a count
    not written yet, or a trace that grew since). None when neither is known."""
    if not daemonset:
        return None
    known = [n for n in (nodes_scheduled(daemonset), annotated_agents(daemonset)) if n is not None]
    return max(known) if known else None


def cluster_agents(daemonsets: Iterable[Mapping[str, Any]]) -> int:
    """Every running trace's agents together: desiredNumberScheduled of each agents'
    DaemonSet not being deleted."""
    return sum(int((ds.get("status") or {}).get("desiredNumberScheduled") or 0)
               for ds in daemonsets if not (ds.get("metadata") or {}).get("deletionTimestamp"))


def shared_agent_count(written: Iterable[Optional[int]], live: int) -> int:
    """The count every agents' DaemonSet should carry: the one they all carry already while
    it is within AGENT_COUNT_TOLERANCE of the live sum, else the live sum."""
    values = set(written)
    if len(values) == 1:
        (value,) = values
        if value is not None and abs(live - value) <= AGENT_COUNT_TOLERANCE * value:
            return value
    return live


def _lowered(daemonset: Mapping[str, Any]) -> Optional[tuple[int, datetime]]:
    note = str(_annotations(daemonset).get(AGENTS_LOWERED_ANNOTATION) or "").split()
    if len(note) != 2 or not note[0].isdigit():
        return None
    try:
        return int(note[0]), datetime.fromisoformat(note[1])
    except ValueError:
        return None


def lowered_note(daemonset: Mapping[str, Any], count: int, now: datetime) -> Optional[str]:
    """AGENTS_LOWERED_ANNOTATION's new value when the operator writes `count` on this DaemonSet
    ("<count> <time>": the highest count its agents may still follow, and since when), or None
    when `count` is not lower. A count lowered from within the last AGENT_COUNT_REFRESH_SECONDS
    may still be followed too, so two quick decreases keep the older, higher one."""
    written = annotated_agents(daemonset)
    if written is None or written <= count:
        return None
    before = _lowered(daemonset)
    if before is not None and (now - before[1]).total_seconds() < AGENT_COUNT_REFRESH_SECONDS:
        written = max(written, before[0])
    return f"{written} {now.isoformat()}"


def bound_agents(daemonset: Optional[Mapping[str, Any]], interval: float, now: datetime) -> int:
    """The `agents` of the operator's staleness bound for this DaemonSet's trace: what its
    agents read (desired_nodes), or the count the operator lowered it from while an agent may
    still follow that one (it re-reads every AGENT_COUNT_REFRESH_SECONDS, then its next write
    comes within the old bound). Higher counts only lengthen the bound, so a count raised but
    not yet read never makes a healthy node look silent."""
    count = desired_nodes(daemonset) or 0
    lowered = _lowered(daemonset or {})
    if lowered is not None:
        previous, at = lowered
        if (now - at).total_seconds() < AGENT_COUNT_REFRESH_SECONDS + stale_after(interval, previous).total_seconds():
            return max(count, previous)
    return count
