"""The agent's write decision at one wake-up: pure, over the entry and the agent's clock.

`entry_changed` says whether a write would change more than the timestamp; `decide_write`
turns that and the times of this agent's last writes into what to send now, by the schedule
of retransmit_core.schedule.next_write (on SIGTERM always the report: its final counts and a
final lastReportTime). `check_due` says when a quiet node reads back whether its report is
still stored. `final_attempt_timeout` and `final_retry_wait` fit that last write and
its retries into FINAL_REPORT_BUDGET_SECONDS. The cluster agent and bench/controlplane_bench.py
both run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from retransmit_core.api import NodeStatus, to_api
from retransmit_core.schedule import Write, next_write, report_period


# Fields that change on every busy node at every read without saying anything new about
# retransmits: the node's segment counters (and their ratio), and each top pod's, go out with
# each write but never cause one alone, else every heartbeat of a node that sends anything
# would be a report write.
RIDE_ALONG = ("lastReportTime", "outSegs", "retransSegs", "retransRatio")


def _comparable(entry: NodeStatus) -> dict[str, Any]:
    doc = to_api(entry)
    for row in [doc] + doc.get("topPods", []):
        for name in RIDE_ALONG:
            row.pop(name, None)
    return doc


def entry_changed(previous: Optional[NodeStatus], current: NodeStatus) -> bool:
    """True when `current` differs from the last written entry in more than its timestamp."""
    return previous is None or _comparable(previous) != _comparable(current)


@dataclass(frozen=True)
class WriteTimes:
    """When this agent last stored a write, on its monotonic clock (None: not yet)."""

    report: Optional[float] = None   # the report itself
    any: Optional[float] = None      # the report or a heartbeat renewal
    checked: Optional[float] = None  # the report last written, or read back (found or not)

    def after(self, write: Write, at: float) -> "WriteTimes":
        """The times once `write` was stored at `at`."""
        if write is Write.REPORT:
            return WriteTimes(report=at, any=at, checked=at)
        if write is Write.HEARTBEAT:
            return WriteTimes(report=self.report, any=at, checked=self.checked)
        return self

    def read_back(self, at: float) -> "WriteTimes":
        """The times once the report was read back at `at` (found, or the read failed: it
        is tried again a period later, not at every wake-up)."""
        return WriteTimes(report=self.report, any=self.any, checked=at)


def decide_write(changed: bool, last: WriteTimes, now: float, interval: float, nodes: int,
                 final: bool = False) -> Write:
    """What to send at the wake-up at `now`: retransmit_core.schedule.next_write over the
    seconds since `last`'s writes. `final` (SIGTERM): the report, changed or not. A heartbeat
    would outlive the pod by a staleness bound; the report's final lastReportTime says when
    the node stopped counting, and the write proves the stored report holds the final counts
    (a change since the last write may have failed to land, and the report may be gone).
    """
    if final:
        return Write.REPORT
    since = lambda at: None if at is None else now - at  # noqa: E731
    return next_write(changed, since(last.report), since(last.any), interval, nodes)


# The shortest final write worth starting: a report write takes well under a second.
FINAL_ATTEMPT_MIN_SECONDS = 1.0


def final_attempt_timeout(left: float) -> Optional[float]:
    """The timeout of a final-report write with `left` seconds of FINAL_REPORT_BUDGET_SECONDS
    to go: all of them (a slow API server's late answer still counts), None when fewer than
    FINAL_ATTEMPT_MIN_SECONDS remain (no attempt: the pod is about to be killed)."""
    return left if left >= FINAL_ATTEMPT_MIN_SECONDS else None


def final_retry_wait(backoff: float, left: float) -> Optional[float]:
    """The wait before retrying a failed final write, `left` seconds of the budget to go: the
    backoff, cut so that one more attempt of FINAL_ATTEMPT_MIN_SECONDS still fits; None when
    none does. Retries are thereby bounded by the budget, never by a count."""
    room = left - FINAL_ATTEMPT_MIN_SECONDS
    return None if room < 0 else max(0.0, min(backoff, room))


def check_due(last: WriteTimes, now: float, interval: float, nodes: int) -> bool:
    """Whether to read back whether the report is still stored (a user may delete it; a
    quiet node writes only its Lease, which does not notice): when it was last known stored
    one report period ago (due from half an interval before, like next_write's deadlines).
    A node whose report changes writes it every period anyway, and an apply re-creates a
    missing report: only quiet nodes read, one cheap read per period at most, never before
    this agent's first report write."""
    if last.report is None:
        return False
    checked = max(last.report, last.checked if last.checked is not None else last.report)
    return now - checked >= report_period(interval, nodes) - interval / 2
