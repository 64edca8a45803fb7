"""`retransmit-agent` argument handling and the live table, without the kernel."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
from rich.console import Console

from retransmit_agent.cli import build_parser, local_options
from retransmit_agent.filters import UsageError
from retransmit_agent.flows import FlowCounters, SocketState
from retransmit_agent.kernel import KernelConfig, KernelSnapshot
from retransmit_agent.nodeentry import NodeFacts, node_entry
from retransmit_agent.livetable import render_report
from retransmit_agent.segments import TcpSegments

pytestmark = pytest.mark.unit


def options(*argv: str):
    return local_options(build_parser().parse_args(["local", *argv]))


def test_local_defaults():
    o = options()
    assert o.duration is None and o.interval == 2 and o.top == 10 and o.output == "table" and not o.events
    assert o.config == KernelConfig()


def test_local_options_become_one_kernel_config():
    o = options("--duration", "1m30s", "--interval", "5s", "--top", "0", "--output", "json", "--events",
                "--family", "IPv4", "--port", "443", "--port", "8443", "--remote-cidr", "10.0.0.0/8",
                "--state", "established", "--max-events-per-second", "7", "--flow-capacity", "128")
    assert (o.duration, o.interval, o.top, o.output, o.events) == (90, 5, 0, "json", True)
    assert o.config == KernelConfig(families=frozenset({"IPv4"}), ports=frozenset({443, 8443}),
                                    remote_cidrs=("10.0.0.0/8",), states=frozenset({"ESTABLISHED"}),
                                    samples_per_second=7, flow_capacity=128)


@pytest.mark.parametrize("argv,option", [(["--duration", "soon"], "--duration"), (["--top", "x"], "--top"),
                                         (["--flow-capacity", "0"], "--flow-capacity"),
                                         (["--max-events-per-second", "-1"], "--max-events-per-second")])
def test_bad_values_name_their_option(argv, option):
    with pytest.raises(UsageError, match=option):
        options(*argv)


def test_cluster_subcommand_takes_the_contract_arguments():
    ns = build_parser().parse_args(["cluster", "--trace", "t", "--trace-uid", "u", "--spec", "{}"])
    assert ns.command == "cluster" and ns.trace == "t" and ns.trace_uid == "u" and ns.spec == "{}"


def test_table_shows_totals_and_flows():
    t = datetime(2026, 1, 1, 12, 30, 5, tzinfo=timezone.utc)
    flow = FlowCounters("IPv6", "fd00::1", 443, "fd00::2", 50000, 42, 1, "FIN_WAIT1", t, t)
    snapshot = KernelSnapshot(retransmits=42, synack_retransmits=1, lost_events=3, sampled_events=40,
                              failed_attempts=0, missed_events=0, by_state={"FIN_WAIT1": 42, "SYN_RECV": 1},
                              flow_counters=[flow])
    console = Console(width=160, record=True, file=io.StringIO())
    entry = node_entry(snapshot, NodeFacts("node-a"), top_flows=10, keep_events=20, now=t).entry
    console.print(render_report(entry, 12.0, 30.0))
    text = console.export_text()
    for part in ("retransmits 42", "SYN-ACK retransmits 1", "lost samples 3", "FIN_WAIT1 42",
                 "[fd00::1]:443", "[fd00::2]:50000", "12:30:05", "top flows on node-a", "12s of 30s"):
        assert part in text
    assert "node retransmitted/sent unknown" in text    # no segment counters in this snapshot


def test_table_shows_each_flows_ratio_and_the_nodes_segments():
    t = datetime(2026, 1, 1, 12, 30, 5, tzinfo=timezone.utc)
    read = SocketState(srtt_us=900, snd_cwnd=10, packets_out=2, retrans_out=0, timeouts=0,
                       data_segs_out=2000, total_retrans=117)
    flow = FlowCounters("IPv4", "198.18.0.1", 443, "198.18.0.2", 50000, 90, 0, "ESTABLISHED", t, t, socket=read)
    snapshot = KernelSnapshot(retransmits=90, synack_retransmits=0, lost_events=0, sampled_events=0,
                              failed_attempts=0, missed_events=0, by_state={"ESTABLISHED": 90},
                              flow_counters=[flow], tcp_segments=TcpSegments(out_segs=9000, retrans_segs=120))
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_report(node_entry(snapshot, NodeFacts("node-a"), top_flows=10, keep_events=20, now=t).entry,
                                5.0, None))
    text = console.export_text()
    assert "node retransmitted/sent 120/9000 (1.33%)" in text
    row = next(line for line in text.splitlines() if "198.18.0.1:443" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[3:5] == ["90", "5.85%"]
