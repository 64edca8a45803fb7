"""The heartbeat: when an agent must write its node's report, and when the operator takes a
node's silence for absence. ONE definition, imported by both sides.

An agent skips writes that would change nothing but the timestamp, yet writes at least every
HEARTBEAT_INTERVALS report intervals (`must_write`). The operator counts a node as reporting
while its last report is younger than `stale_after(interval)`: the longest gap a healthy
agent can leave between two stored writes (a heartbeat period stretched by the interval's
jitter, plus one more interval for a write that failed and was retried, plus the write's
request timeout). A quiet node therefore stays reporting, and a node whose agent stopped
drops out within that bound.
"""

from __future__ import annotations

from datetime import timedelta

# An agent writes at least every this many report intervals, changed or not.
HEARTBEAT_INTERVALS = 3
# Each wait between two reports is the interval +- this fraction (agents do not write in lock-step).
INTERVAL_JITTER = 0.1
# Seconds one report write may take before the agent gives up on it and retries.
WRITE_TIMEOUT_SECONDS = 10.0


def heartbeat_seconds(interval: float) -> float:
    """The longest an agent goes without writing, when nothing changed."""
    return HEARTBEAT_INTERVALS * interval


def must_write(changed: bool, seconds_since_write: float | None, interval: float) -> bool:
    """The agent's write schedule: write when the report changed, when it never wrote, or when
    the heartbeat is due. Reports are checked once per (jittered) interval, so a heartbeat
    is due from half an interval before the period ends (never later than the period)."""
    if changed or seconds_since_write is None:
        return True
    return seconds_since_write >= heartbeat_seconds(interval) - interval / 2


def stale_after(interval: float) -> timedelta:
    """How old a node's last report may be before the operator counts the node as not
    reporting: the heartbeat period at the longest jitter, one retried interval, one timeout."""
    longest_wait = interval * (1 + INTERVAL_JITTER)
    return timedelta(seconds=HEARTBEAT_INTERVALS * longest_wait + longest_wait + WRITE_TIMEOUT_SECONDS)
