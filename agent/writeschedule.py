"""The agent's write decision at one wake-up: pure, over the entry and the agent's clock.

`entry_changed` says whether a write would change more than the timestamp; `decide_write`
turns that and the times of this agent's last writes into what to send now, by the schedule
of retransmit_core.schedule.next_write (a final report on SIGTERM is sent only when it
changed). The cluster agent and bench/controlplane_bench.py both run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from retransmit_core.api import NodeStatus, to_api
from retransmit_core.schedule import Write, next_write


def _comparable(entry: NodeStatus) -> dict[str, Any]:
    doc = to_api(entry)
    doc.pop("lastReportTime", None)
    return doc


def entry_changed(previous: Optional[NodeStatus], current: NodeStatus) -> bool:
    """True when `current` differs from the last written entry in more than its timestamp."""
    return previous is None or _comparable(previous) != _comparable(current)


@dataclass(frozen=True)
class WriteTimes:
    """When this agent last stored a write, on its monotonic clock (None: not yet)."""

    report: Optional[float] = None   # the report itself
    any: Optional[float] = None      # the report or a heartbeat renewal

    def after(self, write: Write, at: float) -> "WriteTimes":
        """The times once `write` was stored at `at`."""
        if write is Write.REPORT:
            return WriteTimes(report=at, any=at)
        if write is Write.HEARTBEAT:
            return WriteTimes(report=self.report, any=at)
        return self


def decide_write(changed: bool, last: WriteTimes, now: float, interval: float, nodes: int,
                 final: bool = False) -> Write:
    """What to send at the wake-up at `now`: retransmit_core.schedule.next_write over the
    seconds since `last`'s writes. `final` (SIGTERM): the report when it changed, else nothing
    (the pod ends: no heartbeat would outlive it, and the stored report is current).
    """
    if final:
        return Write.REPORT if changed else Write.NOTHING
    since = lambda at: None if at is None else now - at  # noqa: E731
    return next_write(changed, since(last.report), since(last.any), interval, nodes)
