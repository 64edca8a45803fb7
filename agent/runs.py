"""Merging the kernel's per-CPU pending runs into flow-map entries, with counts that never go
backwards between snapshots (see struct run in bpf/retransmit.h). Pure arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from retransmit_core.kernelvocab import RETRANSMIT_CAUSES

from .flows import SocketState


@dataclass(frozen=True)
class FlowEntry:
    """A flow's raw counters as the kernel keeps them (struct flow_stats or a pending run).

    by_cause: counts per CAUSE_* index; socket: the socket at the latest event (None when
    the kernel read none)."""

    retransmits: int
    synack_retransmits: int
    first_ns: int
    last_ns: int
    last_state: int
    by_cause: tuple[int, ...] = (0,) * len(RETRANSMIT_CAUSES)
    socket: Optional[SocketState] = None
    cgroup: int = 0     # the socket's cgroup v2 id, read when the flow entered the map; 0: unknown

    def counts(self) -> tuple[int, ...]:
        """Everything that must never go backwards between snapshots."""
        return (self.retransmits, self.synack_retransmits, *self.by_cause)


def merge_pending_runs(
    entries: dict[tuple, FlowEntry],
    runs: Iterable[tuple[tuple, FlowEntry]],
    floors: dict[tuple, tuple[int, ...]],
) -> tuple[dict[tuple, FlowEntry], dict[tuple, tuple[int, ...]]]:
    """Flow-map entries plus per-CPU pending runs, with counts never below `floors`.

    Returns the merged entries and the floors for the next call (only for flows present
    now, so evicted flows do not accumulate).
    """
    merged = dict(entries)
    for key, run in runs:
        entry = merged.get(key)
        if entry is None:
            merged[key] = run
            continue
        latest = run if run.last_ns >= entry.last_ns else entry
        merged[key] = FlowEntry(
            entry.retransmits + run.retransmits,
            entry.synack_retransmits + run.synack_retransmits,
            min(entry.first_ns, run.first_ns),
            latest.last_ns,
            latest.last_state,
            tuple(a + b for a, b in zip(entry.by_cause, run.by_cause)),
            latest.socket or entry.socket or run.socket,
            entry.cgroup or run.cgroup,
        )
    next_floors = {}
    for key, entry in merged.items():
        floor = floors.get(key)
        if floor is not None and any(now < low for now, low in zip(entry.counts(), floor)):
            r, s, *causes = (max(now, low) for now, low in zip(entry.counts(), floor))
            entry = FlowEntry(r, s, entry.first_ns, entry.last_ns, entry.last_state, tuple(causes), entry.socket,
                              entry.cgroup)
            merged[key] = entry
        next_floors[key] = entry.counts()
    return merged, next_floors
