"""bench/report.py, bench/synthetic.py and the metrics parser: how raw figures become latest.json,
and that the simulated nodes write what a real agent writes."""

from __future__ import annotations

import json
import math

import pytest

from bench import report
from bench.controlplane_bench import entry_sizes, parse_write_metrics, too_large
from bench.synthetic import KEEP_EVENTS, TOP_FLOWS, SyntheticNode
from retransmit_operator.api import NodeStatus, to_api

pytestmark = pytest.mark.unit

NODE = {"kernel_ns_per_event": 240.0, "kernel_ns_per_event_floor": 64.0, "events_per_second": 25000.0,
        "count_error": 0, "agent_cpu_percent": 0.12, "baseline_cpu_percent": 17.0, "agent_rss_mb": 151.0,
        "agent_attach_s": 0.5}


def cp(scale, **extra):
    return {"operator_reconcile_s": 0.08, "scale": scale, "empty_object_bytes": 1000, **extra}


def test_status_size_at_1000_nodes_is_measured_when_the_object_holds_them():
    h = report.headline(NODE, cp([{"nodes": 1000, "stored": True, "status_bytes": 900_000, "writes_per_second": 5.2,
                                   "aggregation_lag_p99_s": 3.0, "aggregation_lag_samples": 300}]))
    assert h["status_bytes_1000_nodes"] == 900_000 and h["status_bytes_1000_nodes_measured"] is True
    assert h["writes_per_second_1000_nodes"] == 5.2
    assert h["aggregation_lag_p99_s"] == 3.0 and h["aggregation_lag_nodes"] == 1000


def test_status_size_at_1000_nodes_is_the_projection_when_the_object_cannot_hold_them():
    scale = [{"nodes": 100, "stored": True, "status_bytes": 901_000, "aggregation_lag_p99_s": 2.5,
              "aggregation_lag_samples": 100},
             {"nodes": 1000, "stored": False, "writes_per_second": 5.0}]
    h = report.headline(NODE, cp(scale, projected_object_bytes={"100": 900_000, "1000": 1_600_000},
                                 max_nodes_stored=170))
    assert h["status_bytes_1000_nodes"] == 1_600_000
    assert h["status_bytes_1000_nodes_measured"] is False
    assert h["aggregation_lag_p99_s"] == 2.5 and h["aggregation_lag_nodes"] == 100
    assert h["max_nodes_stored"] == 170


def test_targets_report_met_missed_and_unmeasured():
    h = report.headline(NODE, cp([]))
    t = report.targets(h)
    assert t["count_error == 0"]["met"] is True
    assert t["agent_cpu_percent <= 1"]["met"] is True
    assert t["baseline_cpu_percent / agent_cpu_percent >= 20"]["value"] == pytest.approx(17.0 / 0.12)
    assert t["kernel_ns_per_event / kernel_ns_per_event_floor <= 2"] == {"value": 3.75, "limit": 2, "met": False}
    assert t["aggregation_lag_p99_s <= 5"]["met"] is None


def test_a_nonzero_count_error_misses_its_target():
    assert report.targets({**NODE, "count_error": -3})["count_error == 0"]["met"] is False


def test_clean_makes_nan_null_so_the_file_is_strict_json():
    doc = report.clean({"a": math.nan, "b": [1.0, math.nan], "c": {"d": math.nan}})
    assert json.loads(json.dumps(doc, allow_nan=False)) == {"a": None, "b": [1.0, None], "c": {"d": None}}


METRICS = """# HELP apiserver_request_total [STABLE] Counter of apiserver requests
apiserver_request_total{code="200",component="apiserver",dry_run="",group="retransmit.dev",resource="retransmittraces",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 120
apiserver_request_total{code="500",component="apiserver",dry_run="",group="retransmit.dev",resource="retransmittraces",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="retransmit.dev",resource="retransmittraces",scope="resource",subresource="",verb="GET",version="v1alpha1"} 999
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="daemonsets",scope="resource",subresource="",verb="APPLY",version="v1"} 7
apiserver_request_body_size_bytes_sum{resource="retransmittraces.retransmit.dev",verb="patch"} 1.5e+06
apiserver_request_body_size_bytes_count{resource="retransmittraces.retransmit.dev",verb="patch"} 123
"""


def test_write_metrics_count_every_write_to_traces_and_nothing_else():
    assert parse_write_metrics(METRICS) == {"requests": 123.0, "body_bytes": 1.5e6}


def test_a_simulated_node_writes_a_valid_full_size_entry_that_only_grows():
    node = SyntheticNode("node-0007", seed=7)
    first = node.next_entry()
    assert NodeStatus.model_validate(to_api(first)) == first
    assert len(first.top_flows) == TOP_FLOWS and len(first.recent_events) == KEEP_EVENTS
    assert all(f.local.pod and f.local.namespace for f in first.top_flows)
    assert first.retransmits == sum(first.by_state.values())
    node.grow(50)
    second = node.next_entry()
    assert second.retransmits == first.retransmits + 50
    assert second.retransmits == node.retransmits


def test_simulated_nodes_differ_from_each_other():
    a, b = SyntheticNode("a", seed=1).next_entry(), SyntheticNode("b", seed=2).next_entry()
    assert {f.local.ip for f in a.top_flows}.isdisjoint({f.local.ip for f in b.top_flows})


def test_only_size_refusals_count_as_a_full_object():
    assert too_large('HTTP 500: {"message":"etcdserver: request is too large","code":500}', 500)
    assert too_large("Request entity too large", 413)
    assert not too_large("Timeout: request did not complete within requested timeout", 504)
    assert not too_large("HTTP 409: conflict", 409)


def test_smaller_entries_fit_more_nodes_in_one_object():
    sizes = entry_sizes(managed_per_node=500.0)
    assert [s["topFlows"] for s in sizes] == [10, 10, 3, 1]
    per_node = [s["bytes_per_node"] for s in sizes]
    assert per_node == sorted(per_node, reverse=True)
    assert all(s["nodes_under_1MiB"] == (1 << 20) // s["bytes_per_node"] or
               s["nodes_under_1MiB"] == (1 << 20) // (s["bytes_per_node"] + 1) for s in sizes)


def test_a_node_of_a_big_trace_keeps_to_its_share_of_the_object():
    small, big = SyntheticNode("n", seed=3, nodes_desired=10), SyntheticNode("n", seed=3, nodes_desired=1000)
    a, b = small.next_entry(), big.next_entry()
    assert len(json.dumps(to_api(b), separators=(",", ":"))) <= (1 << 20) // 1000
    assert len(b.top_flows) + len(b.recent_events) < len(a.top_flows) + len(a.recent_events)
    assert (b.retransmits, b.by_state) == (a.retransmits, a.by_state)   # detail goes, counts stay


def test_seeded_managed_fields_name_every_field_of_the_entry():
    from bench.controlplane_bench import managed_fields_entry

    entry = to_api(SyntheticNode("node-0003", seed=3).next_entry())
    record = managed_fields_entry(entry, "rtrace-agent/node-0003", "2026-01-01T00:00:00Z")
    fields = record["fieldsV1"]["f:status"]["f:nodes"]['k:{"node":"node-0003"}']
    assert set(fields) == {"."} | {f"f:{k}" for k in entry}
    assert set(fields["f:byState"]) == {f"f:{state}" for state in entry["byState"]}
    assert (record["manager"], record["operation"], record["subresource"]) == ("rtrace-agent/node-0003", "Apply", "status")
