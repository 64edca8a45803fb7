"""The write schedule: when an agent writes its node's report, when it only renews its
heartbeat Lease, when the operator takes a node's silence for absence, and how long an
agent may take to stop. One definition, imported by both sides.

Two objects per (trace, node), as Kubernetes does for nodes (Node status + a Lease, KEP-589):
- the RetransmitNodeReport holds the counts (~10 KB on a busy node). An agent writes it when
  its content changed, at most every `report_period(interval, nodes)`: the report interval,
  stretched on big clusters so that a trace's agents together send about
  REPORT_WRITES_PER_SECOND report writes (bench/: one report write costs the API server about
  11 ms of CPU, one Lease renewal about 1 ms);
- the heartbeat Lease (coordination.k8s.io) of the same name says "this report is current".
  An agent renews it when HEARTBEAT_INTERVALS intervals passed without any write.

The operator counts a node as reporting while the later of the report's lastReportTime and
the Lease's renewTime is younger than `stale_after(interval)`: the longest gap a healthy agent
leaves between two writes of either kind. A quiet node therefore stays reporting at the cost
of a Lease renewal, and a node whose agent stopped drops out within that bound.
"""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Any, Optional

# An agent writes (report or heartbeat) at least every this many report intervals.
HEARTBEAT_INTERVALS = 3
# Each wait between two reports is the interval +- this fraction (agents do not write in lock-step).
INTERVAL_JITTER = 0.1
# Seconds one write may take before the agent gives up on it and retries.
WRITE_TIMEOUT_SECONDS = 10.0
# Report writes per second one trace's agents send together, at most, once the cluster is so
# big that the report interval alone would exceed it (1,000 nodes at the default 10 s interval).
REPORT_WRITES_PER_SECOND = 100.0

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


def report_period(interval: float, nodes: int) -> float:
    """Seconds between two report writes of one agent whose counts keep changing: the report
    interval, or longer where `nodes` agents at that interval would exceed the budget."""
    return max(interval, nodes / REPORT_WRITES_PER_SECOND)


def heartbeat_seconds(interval: float) -> float:
    """The longest an agent goes without any write when its report did not change."""
    return HEARTBEAT_INTERVALS * interval


def next_write(changed: bool, since_report: Optional[float], since_write: Optional[float],
               interval: float, nodes: int) -> Write:
    """The agent's schedule, checked once per (jittered) interval.

    since_report: seconds since the last stored report write (None: none yet by this agent);
    since_write: seconds since the last stored write of either kind. A deadline is due from
    half an interval before it ends, so a jittered wake-up never overshoots it by a whole one.
    """
    if since_report is None:
        return Write.REPORT
    if changed and since_report >= report_period(interval, nodes) - interval / 2:
        return Write.REPORT
    if since_write is None or since_write >= heartbeat_seconds(interval) - interval / 2:
        return Write.HEARTBEAT
    return Write.NOTHING


def stale_after(interval: float) -> timedelta:
    """How long since a node's last write (report or heartbeat) before the operator counts it
    as not reporting: the heartbeat period at the longest jitter, one retried interval, one
    timeout. Independent of the cluster's size: heartbeats are not stretched, only reports."""
    longest_wait = interval * (1 + INTERVAL_JITTER)
    return timedelta(seconds=HEARTBEAT_INTERVALS * longest_wait + longest_wait + WRITE_TIMEOUT_SECONDS)


def desired_nodes(daemonset: Optional[dict[str, Any]]) -> Optional[int]:
    """The `nodes` of report_period, as the operator shows it (nodesDesired) and the agents read it:
    the DaemonSet's desiredNumberScheduled once its controller has seen the current generation."""
    if not daemonset:
        return None
    status = daemonset.get("status") or {}
    if (status.get("observedGeneration") or 0) < (daemonset.get("metadata") or {}).get("generation", 0):
        return None
    return int(status.get("desiredNumberScheduled") or 0)
