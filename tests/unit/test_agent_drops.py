"""Drops beside the retransmits, the pure parts: whether a kernel can count them (format file
and BTF), reason names, per-flow aggregation of the kernel's map, and the report's drop fields
resumed across agent restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from retransmit_agent.check import drops_line
from retransmit_agent.drops import (
    DROP_INBOUND,
    DROP_OUTBOUND,
    DropBaseline,
    DropSnapshot,
    DropSupport,
    DroppedFlowCounters,
    aggregate_flows,
    drop_defines,
    drop_fields,
    has_reason_field,
    probe_drops,
    reason_names,
    totals_by_reason,
)
from retransmit_agent.flows import AF_INET, AF_INET6, encode_address
from retransmit_agent.kernelconfig import KernelConfig, drop_defines_for
from retransmit_core.api import MAX_DROPPED_FLOWS, Endpoint, Flow, NodeStatus, RetransmitTraceSpec
from retransmit_core.validation import format_error

KFREE_SKB_6_18 = """name: kfree_skb
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;
"""
# Linux 5.4-5.16: no reason
KFREE_SKB_5_4 = "\n".join(line for line in KFREE_SKB_6_18.splitlines() if "reason" not in line and "rx_sk" not in line)


def tracefs_with(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "events" / "skb" / "kfree_skb"
    folder.mkdir(parents=True)
    (folder / "format").write_text(text)
    return tmp_path


def test_the_reason_field_is_read_from_the_format_file(tmp_path):
    assert has_reason_field(tracefs_with(tmp_path / "new", KFREE_SKB_6_18)) is True
    assert has_reason_field(tracefs_with(tmp_path / "old", KFREE_SKB_5_4)) is False
    assert has_reason_field(tmp_path / "none") is None


def test_a_kernel_before_5_17_counts_no_drops_and_says_why(tmp_path):
    support = probe_drops(tracefs_with(tmp_path, KFREE_SKB_5_4), btf_path="/nonexistent")
    assert not support.available
    assert support.problem == "skb:kfree_skb has no `reason` field (added in Linux 5.17)"
    line = drops_line(support.problem)
    assert line.status == "degraded" and "5.17" in line.fix and "retransmits counted as before" in line.detail
    # and the program is compiled without the drop part
    assert drop_defines_for(KernelConfig(), support) == {}


def test_without_btf_drops_are_off_even_with_the_reason_field(tmp_path):
    support = probe_drops(tracefs_with(tmp_path, KFREE_SKB_6_18), btf_path=str(tmp_path / "no-btf"))
    assert not support.available and "sk_buff" in support.problem


def test_reason_names_drop_the_prefix_and_the_markers_that_are_no_drop():
    names = reason_names({0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "SKB_DROP_REASON_NOT_SPECIFIED",
                          12: "SKB_DROP_REASON_NETFILTER_DROP", 128: "SKB_DROP_REASON_MAX",
                          0xFFFF0000: "SKB_DROP_REASON_SUBSYS_MASK"})
    assert names == {2: "NOT_SPECIFIED", 12: "NETFILTER_DROP"}


def test_the_program_gets_its_constants_from_the_kernels_own_numbers():
    support = DropSupport(offsets=(("SKB_IIF", 144), ("SKB_NETWORK_HEADER", 180), ("SKB_HEAD", 192)),
                          reasons={2: "NOT_SPECIFIED", 12: "NETFILTER_DROP", 127: "RECURSION_LIMIT"})
    defines = drop_defines(support)
    assert defines["DROP_REASON_NOT_SPECIFIED"] == 2
    assert defines["DROP_REASON_SLOTS"] == 128 and defines["SKB_HEAD"] == 192
    # a trace that turns drops off gets no drop part, whatever the kernel offers
    assert drop_defines_for(KernelConfig(drops=False), support) == {}
    assert drop_defines_for(KernelConfig(), support) == defines
    assert KernelConfig.from_spec(RetransmitTraceSpec.model_validate({"drops": False})).drops is False
    assert KernelConfig.from_spec(RetransmitTraceSpec()).drops is True


def test_per_reason_totals_name_each_slot_and_slot_zero_collects_subsystem_reasons():
    assert totals_by_reason([4, 0, 0, 7], {3: "NO_SOCKET"}) == {"SUBSYSTEM": 4, "NO_SOCKET": 7}


def test_map_entries_become_one_flow_per_tuple_with_directions_and_reasons():
    a, b = encode_address("10.0.0.1"), encode_address("10.0.0.2")
    six = encode_address("fd00::1")
    reasons = {12: "NETFILTER_DROP", 64: "QDISC_DROP"}
    flows = aggregate_flows([
        ((AF_INET, a, b, 80, 4000, DROP_INBOUND, 12), 5),
        ((AF_INET, a, b, 80, 4000, DROP_OUTBOUND, 64), 2),
        ((AF_INET, a, b, 80, 4000, DROP_INBOUND, 64), 1),
        ((AF_INET6, six, six, 443, 5000, DROP_INBOUND, 99), 3),
    ], reasons)
    by_key = {f.key: f for f in flows}
    v4 = by_key[("IPv4", "10.0.0.1", 80, "10.0.0.2", 4000)]
    assert (v4.inbound, v4.outbound, v4.drops) == (6, 2, 8)
    assert v4.by_reason == {"NETFILTER_DROP": 5, "QDISC_DROP": 3}
    assert by_key[("IPv6", "fd00::1", 443, "fd00::1", 5000)].by_reason == {"99": 3}   # a number it cannot name


def flow(local: tuple[str, int], remote: tuple[str, int], retransmits: int) -> Flow:
    return Flow(local=Endpoint(ip=local[0], port=local[1]), remote=Endpoint(ip=remote[0], port=remote[1]),
                family="IPv4", retransmits=retransmits)


def test_report_fields_resume_from_the_earlier_agents_report_and_mark_the_top_flows():
    earlier = NodeStatus(node="n", drops=10, drops_by_reason={"NETFILTER_DROP": 10}, dropped_flows=[
        DroppedFlowCounters("IPv4", "10.0.0.1", 80, "10.0.0.2", 4000, inbound=10,
                            by_reason={"NETFILTER_DROP": 10}).to_api()])
    baseline = DropBaseline.from_entry(earlier)
    fresh = DropSnapshot(by_reason={"NETFILTER_DROP": 3, "PROTO_MEM": 1}, flows=[
        DroppedFlowCounters("IPv4", "10.0.0.1", 80, "10.0.0.2", 4000, inbound=3, by_reason={"NETFILTER_DROP": 3}),
        DroppedFlowCounters("IPv4", "10.0.0.1", 81, "10.0.0.3", 4001, inbound=1, by_reason={"PROTO_MEM": 1})])
    top = [flow(("10.0.0.1", 80), ("10.0.0.2", 4000), 7), flow(("10.0.0.9", 1), ("10.0.0.8", 2), 1)]
    fields = drop_fields(baseline, fresh, top)
    assert fields["drops"] == 14
    assert fields["drops_by_reason"] == {"NETFILTER_DROP": 13, "PROTO_MEM": 1}
    assert [(f.local.port, f.drops, f.inbound) for f in fields["dropped_flows"]] == [(80, 13, 13), (81, 1, 1)]
    assert fields["top_flows"][0].drops == {"NETFILTER_DROP": 13}
    assert fields["top_flows"][1].drops is None   # this node dropped none of that flow's packets
    # the fields are valid in a report
    NodeStatus(node="n", **fields)


def test_a_node_that_counts_no_drops_leaves_the_fields_absent():
    assert drop_fields(DropBaseline(), None, []) == {}
    report = NodeStatus(node="n")
    assert report.drops is None and report.dropped_flows is None
    # a restarted agent that cannot count (spec turned off) keeps what was reported
    kept = drop_fields(DropBaseline(drops=4, by_reason={"PROTO_MEM": 4}), None, [])
    assert kept["drops"] == 4 and kept["drops_by_reason"] == {"PROTO_MEM": 4}


def test_dropped_flows_are_bounded_busiest_first():
    fresh = DropSnapshot(by_reason={"NETFILTER_DROP": 600}, flows=[
        DroppedFlowCounters("IPv4", "10.0.0.1", 1000 + i, "10.0.0.2", 80, inbound=i + 1,
                            by_reason={"NETFILTER_DROP": i + 1}) for i in range(MAX_DROPPED_FLOWS + 5)])
    listed = drop_fields(DropBaseline(), fresh, [])["dropped_flows"]
    assert len(listed) == MAX_DROPPED_FLOWS
    assert [f.drops for f in listed] == sorted((f.drops for f in listed), reverse=True)
    assert listed[0].drops == MAX_DROPPED_FLOWS + 5


def test_spec_drops_is_a_boolean_refused_otherwise():
    with pytest.raises(ValidationError) as error:
        RetransmitTraceSpec.model_validate({"drops": "sometimes"})
    assert format_error(error.value) == "spec.drops: should be true or false (got 'sometimes')"
