"""Turning raw bench figures into bench/results/latest.json: headline keys, units, targets.

Pure functions over dicts, so unit tests can check them without running anything.
"""

from __future__ import annotations

import math
from typing import Any, Optional

NODES_AT_SCALE = 1000

UNITS: dict[str, str] = {
    "kernel_ns_per_event": "ns of BPF run time per tracepoint hit (bpf_stats), our program",
    "kernel_ns_per_event_floor": "ns per hit, a program that only increments one per-CPU counter",
    "kernel_ns_per_event_baseline": "ns per hit, the per-event (tcpretrans-style) program",
    "kernel_ns_per_event_port_filter": "ns per hit, our program with a --port filter",
    "kernel_ns_per_event_causes_off": "ns per hit, our program without BTF (no socket reads, causes unknown)",
    "events_per_second": "tcp_retransmit_skb events per second on the bench's flows (main phase)",
    "count_error": "events: agent total minus reference counter (whole run, bench's flows)",
    "agent_cpu_percent": "% of one core, agent process, user+system, main phase window",
    "baseline_cpu_percent": "% of one core, per-event baseline process, same window",
    "agent_rss_mb": "MiB, peak resident memory (VmHWM) of the agent over its life",
    "agent_rss_counting_mb": "MiB, peak resident memory while counting (VmHWM reset after start-up)",
    "agent_attach_s": "s, agent process start to program attached and counting",
    "operator_reconcile_s": "s, `kubectl apply` started to the trace's DaemonSet existing (median of 3)",
    "aggregation_lag_p50_s": "s, a busy node's report write sent to the first trace summary including it, median (1000 nodes)",
    "aggregation_lag_p99_s": "s, same, 99th percentile (1000 nodes)",
    "aggregation_lag_p99_s_5000_nodes": "s, same, 99th percentile, 5000 nodes",
    "busy_write_gap_p99_s_1000_nodes": "s, 99th percentile of the time between two stored writes of a busy node's report (how old its counts get), 1000 nodes",
    "busy_write_gap_p99_s_5000_nodes": "s, same, 5000 nodes (the report period stretches to 50 s)",
    "report_age_max_s_5000_nodes": "s, the longest any node went unheard at the end of the window: now - the later of its report's lastReportTime and its heartbeat Lease's renewTime, 5000 nodes",
    "trace_object_bytes_5000_nodes": "bytes, the trace object's JSON (status with bounded rows, metadata incl. managedFields), 5000 nodes",
    "apiserver_cpu_percent_5000_nodes": "% of one core, kube-apiserver over the window, 5000 nodes",
    "write_bytes_per_second_5000_nodes": "request body bytes/s of all writes to reports, heartbeat Leases and the trace, 5000 nodes",
    "writes_per_second_5000_nodes": "write requests/s to reports, Leases and the trace the API server counted, 5000 nodes",
}


def _num(value: Any) -> Optional[float]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null, recursively."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return _num(value)


def scale_point(cp: dict, nodes: int) -> Optional[dict]:
    return next((p for p in cp.get("scale", []) if p["nodes"] == nodes), None)


def headline(node: dict, cp: dict) -> dict[str, Any]:
    """The top-level keys of latest.json from the node-side and control-plane figures."""
    out: dict[str, Any] = {k: node.get(k) for k in (
        "kernel_ns_per_event", "kernel_ns_per_event_floor", "kernel_ns_per_event_baseline",
        "kernel_ns_per_event_port_filter", "kernel_ns_per_event_causes_off", "events_per_second", "count_error", "agent_cpu_percent",
        "baseline_cpu_percent", "agent_rss_mb", "agent_rss_counting_mb", "agent_attach_s")}
    out["operator_reconcile_s"] = cp.get("operator_reconcile_s")
    at_1000, at_5000 = scale_point(cp, NODES_AT_SCALE) or {}, scale_point(cp, 5000) or {}
    out["aggregation_lag_p50_s"] = at_1000.get("aggregation_lag_p50_s")
    out["aggregation_lag_p99_s"] = at_1000.get("aggregation_lag_p99_s")
    out["aggregation_lag_p99_s_5000_nodes"] = at_5000.get("aggregation_lag_p99_s")
    out["aggregation_lag_p99_s_by_nodes"] = {str(p["nodes"]): p.get("aggregation_lag_p99_s") for p in cp.get("scale", [])}
    out["busy_write_gap_p99_s_1000_nodes"] = at_1000.get("busy_write_gap_p99_s")
    out["busy_write_gap_p99_s_5000_nodes"] = at_5000.get("busy_write_gap_p99_s")
    out["report_age_max_s_5000_nodes"] = at_5000.get("report_age_max_s")
    out["trace_object_bytes_5000_nodes"] = at_5000.get("trace_object_bytes")
    out["apiserver_cpu_percent_5000_nodes"] = at_5000.get("apiserver_cpu_percent")
    if at_5000:
        out["write_bytes_per_second_5000_nodes"] = sum(at_5000.get(f"{kind}_write_bytes_per_second", 0)
                                                        for kind in ("report", "lease", "trace"))
        out["writes_per_second_5000_nodes"] = sum(at_5000.get(f"{kind}_writes_per_second", 0)
                                                  for kind in ("report", "lease", "trace"))
    return out


def targets(h: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of issue 7 against the figures: value, limit, met (None = not measured)."""

    def check(value: Any, limit: float, ok) -> dict[str, Any]:
        value = _num(value)
        return {"value": value, "limit": limit, "met": None if value is None else bool(ok(value))}

    ratio = None
    if _num(h.get("agent_cpu_percent")) and _num(h.get("baseline_cpu_percent")) is not None:
        ratio = h["baseline_cpu_percent"] / h["agent_cpu_percent"]
    kernel_ratio = None
    if _num(h.get("kernel_ns_per_event")) is not None and _num(h.get("kernel_ns_per_event_floor")):
        kernel_ratio = h["kernel_ns_per_event"] / h["kernel_ns_per_event_floor"]
    return {
        "count_error == 0": check(h.get("count_error"), 0, lambda v: v == 0),
        "events_per_second >= 20000": check(h.get("events_per_second"), 20000, lambda v: v >= 20000),
        "agent_cpu_percent <= 1": check(h.get("agent_cpu_percent"), 1.0, lambda v: v <= 1.0),
        "baseline_cpu_percent / agent_cpu_percent >= 20": check(ratio, 20, lambda v: v >= 20),
        "kernel_ns_per_event / kernel_ns_per_event_floor <= 2": check(kernel_ratio, 2, lambda v: v <= 2),
        "agent_rss_mb <= 200": check(h.get("agent_rss_mb"), 200, lambda v: v <= 200),
        "aggregation_lag_p99_s <= 5": check(h.get("aggregation_lag_p99_s"), 5, lambda v: v <= 5),
        "aggregation_lag_p99_s_5000_nodes <= 5": check(h.get("aggregation_lag_p99_s_5000_nodes"), 5, lambda v: v <= 5),
        # A busy node's report is as fresh as its interval at 1,000 nodes: 10 s, +10% jitter,
        # +1 s for the spread of the write's own latency (gaps are between stored writes).
        "busy_write_gap_p99_s_1000_nodes <= 12": check(h.get("busy_write_gap_p99_s_1000_nodes"), 12, lambda v: v <= 12),
        "busy_write_gap_p99_s_5000_nodes <= 60": check(h.get("busy_write_gap_p99_s_5000_nodes"), 60, lambda v: v <= 60),
        "report_age_max_s_5000_nodes <= 60": check(h.get("report_age_max_s_5000_nodes"), 60, lambda v: v <= 60),
        "trace_object_bytes_5000_nodes < 512 KiB": check(h.get("trace_object_bytes_5000_nodes"), 512 * 1024,
                                                         lambda v: v < 512 * 1024),
    }
