"""A trace's result as text tables, for `kubectl retransmit show/watch/run` (pure).

Input is the trace object as the API returns it (camelCase dicts); output is plain text, so
it reads the same in a terminal, a CI log and a ticket.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Optional, Sequence

from retransmit_core.api import format_endpoint, parse_duration


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; `right` columns right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    if len(cells) == 1:
        return []
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return lines


def endpoint(side: dict[str, Any]) -> str:
    """'10.1.2.3:443 (shop/web)': address, port and the pod (or node) it belongs to."""
    ip, port = side.get("ip", "?"), side.get("port", 0)
    text = format_endpoint(ip, port)
    if side.get("pod"):
        return f"{text} ({side.get('namespace')}/{side['pod']})"
    if side.get("node"):
        return f"{text} (node {side['node']})"
    return text


def causes(by_cause: Optional[dict[str, int]]) -> str:
    """'fast 12 probe 3' (most first, unknown last)."""
    items = sorted((by_cause or {}).items(), key=lambda kv: (kv[0] == "unknown", -kv[1], kv[0]))
    return " ".join(f"{k} {v}" for k, v in items if v) or "-"


def time_left(trace: dict[str, Any], now: Optional[datetime] = None) -> Optional[float]:
    """Seconds until the trace completes (None: no duration, or not started)."""
    duration = (trace.get("spec") or {}).get("duration")
    started = (trace.get("status") or {}).get("startTime")
    if not duration or not started:
        return None
    start = datetime.fromisoformat(started.replace("Z", "+00:00"))
    now = now or datetime.now(timezone.utc)
    return max(0.0, parse_duration(duration) - (now - start).total_seconds())


def condition(trace: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (trace.get("status") or {}).get("conditions", []) if c.get("type") == kind), {})


def progress_line(trace: dict[str, Any], now: Optional[datetime] = None) -> str:
    """One line while a trace runs: phase, nodes reporting, running totals, time left."""
    status = trace.get("status") or {}
    summary = status.get("summary") or {}
    left = time_left(trace, now)
    parts = [
        f"{trace['metadata']['name']}: {status.get('phase', 'Pending')}",
        f"nodes {summary.get('nodesReporting', 0)}/{summary.get('nodesDesired', 0)} reporting",
        f"{summary.get('retransmits', 0)} retransmits, {summary.get('synackRetransmits', 0)} SYN-ACK",
    ]
    if left is not None:
        parts.append(f"{left:.0f}s left")
    ready = condition(trace, "Ready")
    if ready.get("status") == "False" and ready.get("message"):
        parts.append(ready["message"])
    return "; ".join(parts)


def render(trace: dict[str, Any], now: Optional[datetime] = None) -> str:
    """The whole result: summary, top flows, top pods, by state, by cause, per node."""
    status = trace.get("status") or {}
    summary = status.get("summary") or {}
    out = [progress_line(trace, now), ""]
    totals = [("retransmits", summary.get("retransmits", 0)),
              ("SYN-ACK retransmits", summary.get("synackRetransmits", 0)),
              ("lost samples", summary.get("lostEvents", 0))]
    for key, label in (("missedEvents", "missed hits"), ("failedAttempts", "failed attempts")):
        if summary.get(key) is not None:
            totals.append((label, summary[key]))
    out.append("   ".join(f"{label} {value}" for label, value in totals))
    flows = summary.get("topFlows") or []
    if flows:
        out += ["", "TOP FLOWS"]
        out += table(("NODE", "LOCAL (RETRANSMITTING)", "REMOTE", "RETRANSMITS", "SYN-ACK", "LAST STATE", "CAUSES"),
                     ((f.get("node"), endpoint(f.get("local", {})), endpoint(f.get("remote", {})), f.get("retransmits", 0),
                       f.get("synackRetransmits", 0), f.get("lastState"), causes(f.get("byCause"))) for f in flows),
                     right=(3, 4))
    pods = summary.get("topPods") or []
    if pods:
        out += ["", "TOP PODS"]
        out += table(("NAMESPACE", "POD", "NODE", "RETRANSMITS"),
                     ((p.get("namespace"), p.get("pod"), p.get("node"), p.get("retransmits", 0)) for p in pods), right=(3,))
    for key, title in (("byState", "BY TCP STATE"), ("byCause", "BY CAUSE")):
        counts = summary.get(key) or {}
        if counts:
            out += ["", title]
            out += table(("NAME", "RETRANSMITS"), sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), right=(1,))
    missed = summary.get("nodesNotCovered") or []
    if missed:
        out += ["", f"NOT COVERED ({sum(m.get('count', 0) for m in missed)} of {summary.get('nodesLinux')} Linux nodes)"]
        out += table(("REASON", "NODES", "EXAMPLES", "FIX"),
                     ((m.get("reason"), m.get("count", 0), ", ".join(m.get("nodes") or []), m.get("detail")) for m in missed),
                     right=(1,))
    nodes = status.get("nodes") or []
    if nodes:
        out += ["", "NODES"]
        out += table(("NODE", "PHASE", "RETRANSMITS", "SYN-ACK", "LOST", "LAST REPORT", "MESSAGE"),
                     ((n.get("node"), n.get("phase"), n.get("retransmits", 0), n.get("synackRetransmits", 0),
                       n.get("lostEvents", 0), n.get("lastReportTime"), n.get("message")) for n in nodes),
                     right=(2, 3, 4))
    return "\n".join(out)
