"""A flow's segment counters (dataSegsOut, totalRetrans) are its connection's own, as the
sender's TCP_INFO gives them: within the bound of when the program reads them during a lossy
bulk transfer, and equal once the connection retransmits slowly enough for every retransmit
to read them.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from typing import Optional

import pytest

from retransmit_agent.flows import FlowCounters, wall_clock_offset_ns
from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from retransmit_agent.segments import TcpSegments, read_tcp_segments
from retransmit_core.kernelvocab import SOCKET_READ_INTERVAL_MS
from retransmit_core.ratio import retransmit_ratio
from tests.harness import loads
from tests.harness.netns import LossNamespace
from tests.harness.refcount import per_flow, succeeded
from tests.kernel.test_counting import MAX_SEGMENTS_PER_SKB

pytestmark = pytest.mark.kernel

LOSS_PERCENT = 5
# ~17,000 segments of 1,448 bytes, ~900 retransmits at 5%: long enough (about a second
# here) for the program to read the counters again during the transfer.
BULK_BYTES = 24 << 20
PORT = 5411
# Event times are estimated from jiffies (struct clock): within about two jiffies of the
# clock, 20 ms at HZ=100; 50 ms leaves room for a calibration step.
EVENT_TIME_SLACK_NS = 50_000_000


class SegSender:
    """tests.harness.segsender in `ns`: one connection and its sender's TCP_INFO."""

    def __init__(self, ns: LossNamespace, port: int) -> None:
        self.proc = ns.python("tests.harness.segsender", "--server-ip", ns.v4[1], "--client-ip", ns.v4[0],
                              "--port", str(port), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        self.client = tuple(self._answer()["client"])

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"segsender exited: {self.proc.stderr.read()}"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def sender_flow(program: RetransmitProgram, client: tuple) -> Optional[FlowCounters]:
    found = [f for f in program.snapshot().flow_counters if (f.local_ip, f.local_port) == client]
    return found[0] if found else None


def monotonic_ns(when: datetime) -> int:
    """The CLOCK_MONOTONIC time of a flow's firstSeen/lastSeen (flows.ktime_to_datetime inverted)."""
    return round(when.timestamp() * 1e9) - wall_clock_offset_ns()


def test_flow_counters_are_the_connections_own(ns):
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        assert program.features.sock is not None and program.features.sock.segs, program.features.describe()
        sender = SegSender(ns, PORT)
        try:
            # 1. A bulk transfer under random loss. The flow's counters were read at most one
            # read interval before its latest retransmit L: at least what the sender's own
            # counters were by L - interval, at most what they are at the end.
            ns.random_loss(LOSS_PERCENT)
            end = sender.ask(f"bulk {BULK_BYTES}")
            ns.clear_loss()
            flow = sender_flow(program, sender.client)
            assert flow is not None and flow.retransmits > 0 and flow.socket is not None
            sent, retransmitted = flow.socket.data_segs_out, flow.socket.total_retrans
            at_end = {k: v for k, v in end.items() if k != "samples"}
            assert 0 < retransmitted <= end["total_retrans"] and 0 < sent <= end["data_segs_out"], (flow, at_end)
            read_by = monotonic_ns(flow.last_seen) - SOCKET_READ_INTERVAL_MS * 1_000_000 - EVENT_TIME_SLACK_NS
            before = [s for s in end["samples"] if s["t"] <= read_by]
            floor = before[-1] if before else {"total_retrans": 0, "data_segs_out": 0}
            assert floor["total_retrans"] <= retransmitted and floor["data_segs_out"] <= sent, (floor, flow.socket)
            ratio = retransmit_ratio(retransmitted, sent)
            print(f"bulk at {LOSS_PERCENT}% loss: flow {retransmitted}/{sent} = {ratio}, sender at the end "
                  f"{end['total_retrans']}/{end['data_segs_out']} = "
                  f"{retransmit_ratio(end['total_retrans'], end['data_segs_out'])}, {flow.retransmits} events, "
                  f"floor {floor['total_retrans']}/{floor['data_segs_out']} ({len(end['samples'])} samples)")
            assert flow.to_flow().retrans_ratio == ratio

            # 2. A dead path: one segment retransmitted on timeouts (200 ms and more apart, past
            # the read interval), so each retransmit reads the counters, which then equal the
            # sender's exactly between two retransmits.
            ns.drop_everything()
            queued = sender.ask("send 1")
            deadline = time.monotonic() + 120
            while True:
                first = sender.ask("info")
                flow = sender_flow(program, sender.client)
                second = sender.ask("info")
                if (first == second and first["total_retrans"] > queued["total_retrans"] and flow.socket
                        and (flow.socket.total_retrans, flow.socket.data_segs_out)
                        == (first["total_retrans"], first["data_segs_out"])):
                    break
                assert time.monotonic() < deadline, (
                    f"the flow's counters {flow.socket} never equalled the sender's {first}, {second}")
                time.sleep(0.05)
        finally:
            ns.clear_loss()
            sender.close()


def test_a_namespaces_segment_counters_read_through_proc_are_its_own(ns, reference):
    # A process in the namespace: its /proc/PID/net/snmp is the namespace's, as the agent's
    # /proc/net/snmp is the node's. It equals what the namespace's own /proc/net/snmp says
    # (read with nothing sending in between), and the lossy bulk's retransmitted segments
    # show in it within the GSO bound of the reference's retransmit events.
    holder = ns.popen("sleep", "infinity")
    path = f"/proc/{holder.pid}/net/snmp"
    deadline = time.monotonic() + 30
    while read_tcp_segments(path) == read_tcp_segments("/proc/net/snmp"):   # `ip netns exec` not yet in
        assert time.monotonic() < deadline, "the process never entered the namespace"
        time.sleep(0.01)
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as own:
        start = read_tcp_segments(path)
        loads.bulk(ns, loss=LOSS_PERCENT, connections=2, nbytes=2 << 20)
        during = read_tcp_segments(path).since(start)
        missed = own.snapshot().missed_events or 0
    inside = ns.snmp_tcp()
    assert read_tcp_segments(path) == TcpSegments(inside["OutSegs"], inside["RetransSegs"])
    mine = loads.own_addresses(ns)
    events = sum(r for r, _ in per_flow(reference.read(), lambda e: (e.local_ip in mine or e.remote_ip in mine)
                                        and succeeded(e)).values())
    assert during.out_segs > 2 * (2 << 20) // 1448 and events > 0
    assert events <= during.retrans_segs <= (events + missed) * MAX_SEGMENTS_PER_SKB
    print(f"namespace at {LOSS_PERCENT}% loss (both ways, duplex): {during.retrans_segs}/{during.out_segs} = "
          f"{retransmit_ratio(during.retrans_segs, during.out_segs)}; {events} retransmit events")
