"""The retransmit ratio: one definition (retransmit_core.ratio) for flows and nodes, the node's
counters from /proc/net/snmp's text, carried through a restart, and never a reason to write."""

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.flows import FlowCounters, SocketState
from retransmit_agent.resume import Baseline, CumulativeFlow, FlowKey, cumulative_entry, merge_flows
from retransmit_agent.segments import TcpSegments, parse_snmp_tcp, read_tcp_segments
from retransmit_agent.writeschedule import entry_changed
from retransmit_core.api import Endpoint, Flow, NodeStatus, to_api
from retransmit_core.ratio import format_ratio, retransmit_ratio

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

# /proc/net/snmp of Linux 6.18 (Tcp: lines; the others left as they are)
SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1000
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 12 10 0 1 3 52000 61234 1017 0 4 0
Udp: InDatagrams NoPorts
Udp: 5 0
"""


def test_the_ratio_is_retransmitted_over_sent_and_unknown_without_both():
    assert retransmit_ratio(50, 1000) == 0.05
    assert retransmit_ratio(1, 3) == 0.333333
    assert retransmit_ratio(0, 10) == 0.0
    assert retransmit_ratio(None, 10) is None and retransmit_ratio(3, None) is None
    assert retransmit_ratio(0, 0) is None


def test_ratios_print_as_percentages_small_ones_visible():
    assert format_ratio(0.0583) == "5.83%"
    assert format_ratio(0.0) == "0.00%"
    assert format_ratio(0.00002) == "0.002%"
    assert format_ratio(None) == "-"


def test_the_tcp_counters_come_from_snmps_two_tcp_lines():
    assert parse_snmp_tcp(SNMP) == TcpSegments(out_segs=61234, retrans_segs=1017)
    with pytest.raises(ValueError):
        parse_snmp_tcp("Ip: Forwarding\nIp: 1\n")
    with pytest.raises(ValueError, match="RetransSegs"):
        parse_snmp_tcp("Tcp: OutSegs\nTcp: 5\n")


def test_an_unreadable_snmp_file_gives_no_counters(tmp_path):
    assert read_tcp_segments(str(tmp_path / "missing")) is None
    (tmp_path / "snmp").write_text(SNMP)
    assert read_tcp_segments(str(tmp_path / "snmp")) == TcpSegments(61234, 1017)


def test_segments_during_the_trace_are_the_difference_never_negative():
    start, now = TcpSegments(1000, 10), TcpSegments(3000, 70)
    assert now.since(start) == TcpSegments(2000, 60)
    assert start.since(now) == TcpSegments(0, 0)


def test_a_flow_and_a_node_ratio_follow_their_counters_whatever_was_sent():
    flow = Flow.model_validate({"local": {"ip": "198.18.0.2", "port": 1}, "remote": {"ip": "198.18.0.3", "port": 2},
                                "family": "IPv4", "dataSegsOut": 2000, "totalRetrans": 100, "retransRatio": 0.9})
    assert flow.retrans_ratio == 0.05 and to_api(flow)["retransRatio"] == 0.05
    node = NodeStatus(node="n1", out_segs=4000, retrans_segs=40)
    assert to_api(node)["retransRatio"] == 0.01
    assert "retransRatio" not in to_api(NodeStatus(node="n1", out_segs=4000))


def counters(socket=None, retransmits=5):
    return FlowCounters("IPv4", "198.18.0.2", 40000, "198.18.0.3", 5201, retransmits, 0, "ESTABLISHED",
                        T0, T0 + timedelta(seconds=1), socket=socket)


def test_the_kernels_socket_counters_become_the_flows_and_are_absent_when_not_read():
    read = SocketState(srtt_us=100, snd_cwnd=10, packets_out=3, retrans_out=0, timeouts=0,
                       data_segs_out=400, total_retrans=20)
    flow = counters(read).to_flow()
    assert (flow.data_segs_out, flow.total_retrans, flow.retrans_ratio) == (400, 20, 0.05)
    no_segs = SocketState(srtt_us=100, snd_cwnd=10, packets_out=3, retrans_out=0, timeouts=0)
    assert "dataSegsOut" not in to_api(counters(no_segs).to_flow())
    assert "retransRatio" not in to_api(counters(None).to_flow())


def test_after_a_restart_the_latest_read_of_a_flows_counters_wins_whole():
    old = counters(SocketState(100, 10, 3, 0, 0, data_segs_out=400, total_retrans=20)).to_flow()
    newer = counters(SocketState(100, 10, 3, 0, 0, data_segs_out=900, total_retrans=30), retransmits=2)
    key = FlowKey.of_flow(old)
    merged = CumulativeFlow(key, old=old, fresh=newer).to_flow()
    assert (merged.retransmits, merged.data_segs_out, merged.total_retrans, merged.retrans_ratio) == (7, 900, 30, 0.033333)
    unread = CumulativeFlow(key, old=old, fresh=counters(None, retransmits=2)).to_flow()
    assert (unread.data_segs_out, unread.total_retrans, unread.retrans_ratio) == (400, 20, 0.05)


def test_a_restarted_agent_adds_the_nodes_segments_to_what_its_report_held():
    baseline = Baseline.from_entry(NodeStatus(node="n1", out_segs=10_000, retrans_segs=100))
    fresh = NodeStatus(node="n1", phase="Running", out_segs=5_000, retrans_segs=400)
    entry = cumulative_entry(baseline, fresh, merge_flows(baseline, []), 10, 0)
    assert (entry.out_segs, entry.retrans_segs, entry.retrans_ratio) == (15_000, 500, 0.033333)
    unknown_now = cumulative_entry(baseline, NodeStatus(node="n1", phase="Running"), [], 10, 0)
    assert (unknown_now.out_segs, unknown_now.retrans_segs) == (10_000, 100)


def test_the_nodes_segment_counters_alone_never_make_a_write():
    written = NodeStatus(node="n1", phase="Running", retransmits=3, out_segs=1000, retrans_segs=3)
    busier = written.model_copy(update={"out_segs": 90_000, "retrans_segs": 7})
    assert not entry_changed(written, NodeStatus.model_validate(to_api(busier)))
    assert entry_changed(written, written.model_copy(update={"retransmits": 4}))


def test_a_flow_without_counters_dumps_no_ratio_fields():
    flow = Flow(local=Endpoint(ip="198.18.0.2", port=1), remote=Endpoint(ip="198.18.0.3", port=2), family="IPv4")
    assert set(to_api(flow)) == {"local", "remote", "family", "retransmits", "synackRetransmits", "byCause"}
