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
    "status_bytes_1000_nodes": "bytes, the trace object's JSON (status, metadata.managedFields) with 1000 node entries",
    "writes_per_second_1000_nodes": "write requests/s to the trace the API server completed (any code), 1000 nodes at the budget",
    "agent_writes_per_second_1000_nodes": "write requests/s the 1000 simulated agents sent (the budget: 5/s)",
    "write_bytes_per_second_1000_nodes": "request body bytes/s of those writes",
    "aggregation_lag_p50_s": "s, a node's write sent to the first summary including it, median",
    "aggregation_lag_p99_s": "s, same, 99th percentile (largest node count that fits in one object)",
    "max_nodes_stored": "node entries the trace object held when the API server refused to grow it",
    "object_bytes_per_node": "bytes the trace object grows by per node entry (entry + its managedFields)",
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
    at_scale = scale_point(cp, NODES_AT_SCALE) or {}
    if at_scale.get("stored"):
        out["status_bytes_1000_nodes"] = at_scale["status_bytes"]
        out["status_bytes_1000_nodes_measured"] = True
    elif (cp.get("projected_object_bytes") or {}).get(str(NODES_AT_SCALE)) is not None:
        # Not stored: the size it would have (entries at their budget + measured managedFields).
        out["status_bytes_1000_nodes"] = cp["projected_object_bytes"][str(NODES_AT_SCALE)]
        out["status_bytes_1000_nodes_measured"] = False
    else:
        out["status_bytes_1000_nodes"] = None
    out["writes_per_second_1000_nodes"] = at_scale.get("writes_per_second")
    out["agent_writes_per_second_1000_nodes"] = at_scale.get("agent_writes_per_second")
    out["write_bytes_per_second_1000_nodes"] = at_scale.get("write_request_bytes_per_second")
    stored = [p for p in cp.get("scale", []) if p.get("stored") and p.get("aggregation_lag_samples")]
    largest = max(stored, key=lambda p: p["nodes"]) if stored else {}
    out["aggregation_lag_p50_s"] = largest.get("aggregation_lag_p50_s")
    out["aggregation_lag_p99_s"] = largest.get("aggregation_lag_p99_s")
    out["aggregation_lag_nodes"] = largest.get("nodes")
    out["aggregation_lag_p99_s_by_nodes"] = {str(p["nodes"]): p.get("aggregation_lag_p99_s") for p in stored}
    out["max_nodes_stored"] = cp.get("max_nodes_stored")
    out["object_bytes_per_node"] = cp.get("object_bytes_per_node")
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
        "status_bytes_1000_nodes < 1 MiB": check(h.get("status_bytes_1000_nodes"), 1 << 20, lambda v: v < (1 << 20)),
        "aggregation_lag_p99_s <= 5": check(h.get("aggregation_lag_p99_s"), 5, lambda v: v <= 5),
    }
