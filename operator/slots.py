"""Each running trace holds a slot: a metrics port of its own and one of the cluster's
maxRunningTraces. Pure functions; the reconciler reads the slots in use from the agents'
DaemonSets (one list call, only when a trace has none yet) and decides under one lock.

Why ports: agents use the host network (they must see the node's own addresses and
sockets), so two traces' agents on one node need different ports for /metrics, /readyz and
/livez, or the second trace's pods never schedule. A port is chosen once, when the trace's
DaemonSet is created (preferring base + crc32(name) % span, so a trace re-created under the
same name tends to get its old port and dashboards keep working), and recorded on the
DaemonSet; it never changes while the DaemonSet lives.

Why a cap: every running trace runs a privileged agent on each of its nodes, compiles a
program there and writes reports; the cap bounds what a cluster can be asked to carry. A
trace beyond it waits Pending and says which traces hold the slots.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Mapping, Optional, Sequence

from retransmit_core.naming import METRICS_PORT_ANNOTATION, TRACE_LABEL


def preferred_port(trace: str, base: int, span: int) -> int:
    return base + zlib.crc32(trace.encode()) % span


def choose_port(trace: str, base: int, span: int, taken: Iterable[int]) -> Optional[int]:
    """The first free port of [base, base + span) from the trace's preferred one on (wrapping);
    None when every port is taken."""
    used = set(taken)
    first = preferred_port(trace, base, span) - base
    for step in range(span):
        port = base + (first + step) % span
        if port not in used:
            return port
    return None


def port_of(daemonset: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The metrics port recorded on an agents' DaemonSet; for one made before ports were
    recorded, its container's metrics port."""
    if not daemonset:
        return None
    recorded = ((daemonset.get("metadata") or {}).get("annotations") or {}).get(METRICS_PORT_ANNOTATION)
    if recorded and str(recorded).isdigit():
        return int(recorded)
    containers = ((((daemonset.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or [])
    for container in containers:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics":
                return int(port["containerPort"])
    return None


def slots_in_use(daemonsets: Iterable[Mapping[str, Any]]) -> dict[str, Optional[int]]:
    """trace -> its port, for every agents' DaemonSet that is not being deleted."""
    used: dict[str, Optional[int]] = {}
    for ds in daemonsets:
        meta = ds.get("metadata") or {}
        trace = (meta.get("labels") or {}).get(TRACE_LABEL)
        if trace and not meta.get("deletionTimestamp"):
            used[trace] = port_of(ds)
    return used


def waiting_reason(trace: str, running: Sequence[str], older_waiting: Sequence[str], limit: int) -> Optional[str]:
    """Why `trace` may not start yet, or None when it may: the running traces and the ones
    that waited longer take the slots first."""
    others = [name for name in running if name != trace]
    if len(others) + len(older_waiting) < limit:
        return None
    held = ", ".join(sorted(others)) or "none"
    queue = f"; {len(older_waiting)} waiting trace(s) started earlier go first" if older_waiting else ""
    return (f"{len(others)} trace(s) run already ({held}), the most maxRunningTraces ({limit}) allows{queue}: "
            f"this trace starts when one of them completes or is deleted, or raise the chart's maxRunningTraces")
