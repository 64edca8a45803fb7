"""bench/figures.py, bench/synthetic.py and the metrics parser: how raw figures become latest.json,
and that the simulated nodes write what a real agent writes."""

from __future__ import annotations

import json
import math

import pytest

from bench import figures
from bench.controlplane_bench import parse_write_metrics
from bench.synthetic import FLOWS_PER_NODE, SyntheticNode
from retransmit_core.api import DEFAULT_EVENTS_KEPT, DEFAULT_TOP_FLOWS, NodeStatus, to_api

pytestmark = pytest.mark.unit

NODE = {"kernel_ns_per_event": 240.0, "kernel_ns_per_event_floor": 64.0, "events_per_second": 25000.0,
        "count_error": 0, "agent_cpu_percent": 0.12, "baseline_cpu_percent": 17.0, "agent_rss_mb": 151.0,
        "agent_attach_s": 0.5}


def cp(scale, **extra):
    return {"operator_reconcile_s": 0.08, "scale": scale, "empty_object_bytes": 1000, **extra}


def test_scale_figures_at_1000_and_5000_nodes_reach_the_headline_and_targets():
    scale = [{"nodes": 1000, "aggregation_lag_p50_s": 1.1, "aggregation_lag_p99_s": 2.9, "busy_write_gap_p99_s": 10.8},
             {"nodes": 5000, "aggregation_lag_p99_s": 6.0, "report_age_max_s": 41.0, "trace_object_bytes": 90_000,
              "apiserver_cpu_percent": 80.0, "report_write_bytes_per_second": 1000.0, "trace_write_bytes_per_second": 500.0,
              "report_writes_per_second": 190.0, "trace_writes_per_second": 0.5, "busy_write_gap_p99_s": 61.0,
              "lease_writes_per_second": 150.0, "lease_write_bytes_per_second": 9000.0}]
    h = figures.headline(NODE, cp(scale))
    assert (h["aggregation_lag_p50_s"], h["aggregation_lag_p99_s"], h["aggregation_lag_p99_s_5000_nodes"]) == (1.1, 2.9, 6.0)
    # Every write counts: reports, heartbeat Leases and the trace.
    assert h["write_bytes_per_second_5000_nodes"] == 10500.0 and h["writes_per_second_5000_nodes"] == 340.5
    t = figures.targets(h)
    assert t["aggregation_lag_p99_s <= 5"]["met"] is True and t["aggregation_lag_p99_s_5000_nodes <= 5"]["met"] is False
    assert t["busy_write_gap_p99_s_1000_nodes <= 12"]["met"] is True
    assert t["busy_write_gap_p99_s_5000_nodes <= 60"]["met"] is False
    assert t["report_age_max_s_5000_nodes <= 60"]["met"] is True
    assert t["trace_object_bytes_5000_nodes < 512 KiB"]["met"] is True


def test_targets_report_met_missed_and_unmeasured():
    h = figures.headline(NODE, cp([]))
    t = figures.targets(h)
    assert t["count_error == 0"]["met"] is True
    assert t["agent_cpu_percent <= 1"]["met"] is True
    assert t["baseline_cpu_percent / agent_cpu_percent >= 20"]["value"] == pytest.approx(17.0 / 0.12)
    assert t["kernel_ns_per_event / kernel_ns_per_event_floor <= 2"] == {"value": 3.75, "limit": 2, "met": False}
    assert t["aggregation_lag_p99_s <= 5"]["met"] is None


def test_a_nonzero_count_error_misses_its_target():
    assert figures.targets({**NODE, "count_error": -3})["count_error == 0"]["met"] is False


def test_clean_makes_nan_null_so_the_file_is_strict_json():
    doc = figures.clean({"a": math.nan, "b": [1.0, math.nan], "c": {"d": math.nan}})
    assert json.loads(json.dumps(doc, allow_nan=False)) == {"a": None, "b": [1.0, None], "c": {"d": None}}


METRICS = """# HELP apiserver_request_total [STABLE] Counter of apiserver requests
apiserver_request_total{code="200",component="apiserver",dry_run="",group="retransmit.dev",resource="retransmittraces",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 120
apiserver_request_total{code="500",component="apiserver",dry_run="",group="retransmit.dev",resource="retransmittraces",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="retransmit.dev",resource="retransmittraces",scope="resource",subresource="",verb="GET",version="v1alpha1"} 999
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="daemonsets",scope="resource",subresource="",verb="APPLY",version="v1"} 7
apiserver_request_body_size_bytes_sum{resource="retransmittraces.retransmit.dev",verb="patch"} 1.5e+06
apiserver_request_body_size_bytes_count{resource="retransmittraces.retransmit.dev",verb="patch"} 123
"""


def test_write_metrics_count_every_write_to_one_resource_and_nothing_else():
    assert parse_write_metrics(METRICS) == {"requests": 123.0, "body_bytes": 1.5e6}
    reports = METRICS.replace("retransmittraces", "retransmitnodereports")
    assert parse_write_metrics(reports, "retransmitnodereports") == {"requests": 123.0, "body_bytes": 1.5e6}
    assert parse_write_metrics(reports) == {"requests": 0.0, "body_bytes": 0.0}


def test_a_simulated_node_writes_a_valid_full_size_entry_that_only_grows():
    node = SyntheticNode("node-0007", seed=7)
    first = node.next_entry()
    assert NodeStatus.model_validate(to_api(first)) == first
    assert len(first.top_flows) == DEFAULT_TOP_FLOWS and len(first.recent_events) == DEFAULT_EVENTS_KEPT
    assert all(f.local.pod and f.local.namespace for f in first.top_flows)
    assert len(first.top_pods) == FLOWS_PER_NODE   # every flow has a pod of its own, and every pod a row
    assert first.retransmits == sum(first.by_state.values())
    node.grow(50)
    second = node.next_entry()
    assert second.retransmits == first.retransmits + 50
    assert second.retransmits == node.retransmits


def test_simulated_nodes_differ_from_each_other():
    a, b = SyntheticNode("a", seed=1).next_entry(), SyntheticNode("b", seed=2).next_entry()
    assert {f.local.ip for f in a.top_flows}.isdisjoint({f.local.ip for f in b.top_flows})


def test_the_operators_window_figures_come_from_its_metrics_deltas():
    from bench.controlplane_bench import operator_window

    before = {"rtrace_operator_reconcile_seconds_sum": 10.0, "rtrace_operator_reconcile_seconds_count": 100,
              "rtrace_operator_sync_pass_seconds_sum": 5.0, "rtrace_operator_sync_pass_seconds_count": 20,
              "rtrace_operator_sync_pass_seconds_bucket{2.0}": 20,
              "rtrace_operator_gc_pause_seconds_sum": 1.0, "rtrace_operator_gc_pause_seconds_count": 50,
              "rtrace_operator_gc_pause_seconds_bucket{0.5}": 50}
    after = {"rtrace_operator_reconcile_seconds_sum": 16.0, "rtrace_operator_reconcile_seconds_count": 110,
             "rtrace_operator_sync_pass_seconds_sum": 9.0, "rtrace_operator_sync_pass_seconds_count": 24,
             "rtrace_operator_sync_pass_seconds_bucket{2.0}": 23,
             "rtrace_operator_gc_pause_seconds_sum": 3.5, "rtrace_operator_gc_pause_seconds_count": 60,
             "rtrace_operator_gc_pause_seconds_bucket{0.5}": 59}
    assert operator_window(before, after) == {
        "operator_pass_mean_s": 0.6, "operator_sync_pass_mean_s": 1.0, "operator_sync_passes_over_2s": 1,
        "operator_gc_pause_s": 2.5, "operator_gc_pauses_over_0.5s": 1}
