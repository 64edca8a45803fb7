"""The references for a flow's retransmit ratio: its sender's own TCP_INFO, and a namespace's
segment counters read through /proc/PID/net/snmp against its own /proc/net/snmp.

Shared by tests/kernel/test_ratio.py on the host's kernel and tests/harness/vm_scenarios.py's
`ratio` section inside Debian's kernels, so both compare the same way:

    sender = SegSender(ns, port)                       # one connection, driven line by line
    end = sender.ask("bulk N")                         # under loss: counters at the end + samples
    bulk_counter_mismatches(sender_flow(program, sender.client), end)   # [] when within bounds
    ns.drop_everything(); queued = sender.ask("send 1")
    wait_for_equal_counters(program, sender, queued)   # exact once retransmits are slow

    with namespace_snmp(ns) as path: ...               # /proc/PID/net/snmp of a process in ns
    namespace_segment_mismatches(...)                  # [] when the counters are the namespace's
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator, Optional

from retransmit_agent.flows import FlowCounters, wall_clock_offset_ns
from retransmit_agent.kernel import RetransmitProgram
from retransmit_agent.segments import TcpSegments
from retransmit_core.kernelvocab import SOCKET_READ_INTERVAL_MS
from retransmit_core.ratio import retransmit_ratio

from .loads import MAX_SEGMENTS_PER_SKB
from .netns import LossNamespace

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


def floor_counters(flow: FlowCounters, samples: list[dict]) -> dict:
    """The sender's counters as they were one read interval (and the clock's slack) before the
    flow's latest retransmit L: the program read the socket at L or later than L - interval,
    so the flow's counters are at least these."""
    read_by = monotonic_ns(flow.last_seen) - SOCKET_READ_INTERVAL_MS * 1_000_000 - EVENT_TIME_SLACK_NS
    before = [s for s in samples if s["t"] <= read_by]
    return before[-1] if before else {"total_retrans": 0, "data_segs_out": 0}


def bulk_counter_mismatches(flow: Optional[FlowCounters], end: dict) -> list[str]:
    """What breaks the bounds on a flow's segment counters after a lossy bulk transfer (`end`:
    the sender's `bulk` answer): at least its sender's counters one read interval before the
    flow's latest retransmit, at most the sender's at the end, and the flow's ratio theirs.
    Empty: the counters are the connection's own."""
    if flow is None or flow.retransmits == 0 or flow.socket is None or flow.socket.data_segs_out is None:
        return [f"no retransmitting flow with segment counters: {flow}"]
    sent, retransmitted = flow.socket.data_segs_out, flow.socket.total_retrans
    problems = []
    if not 0 < retransmitted <= end["total_retrans"]:
        problems.append(f"flow total_retrans {retransmitted} not in (0, sender's {end['total_retrans']}]")
    if not 0 < sent <= end["data_segs_out"]:
        problems.append(f"flow data_segs_out {sent} not in (0, sender's {end['data_segs_out']}]")
    floor = floor_counters(flow, end["samples"])
    if floor["total_retrans"] > retransmitted or floor["data_segs_out"] > sent:
        problems.append(f"flow {retransmitted}/{sent} below the sender's {floor['total_retrans']}/"
                        f"{floor['data_segs_out']} one read interval before its latest retransmit")
    if flow.to_flow().retrans_ratio != retransmit_ratio(retransmitted, sent):
        problems.append(f"the flow's ratio {flow.to_flow().retrans_ratio} is not {retransmitted}/{sent}")
    return problems


def wait_for_equal_counters(program: RetransmitProgram, sender: SegSender, queued: dict,
                            timeout: float = 120.0) -> dict:
    """On a dead path (the caller drops everything after queueing a segment, `queued` being the
    sender's answer), the segment is retransmitted on timeouts 200 ms and more apart, past the
    read interval, so each retransmit reads the counters, which then equal the sender's
    exactly between two retransmits. Returns {"sender": its counters, "flow": [total_retrans,
    data_segs_out]} once they do; AssertionError when they never did within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        first = sender.ask("info")
        flow = sender_flow(program, sender.client)
        second = sender.ask("info")
        if (first == second and first["total_retrans"] > queued["total_retrans"] and flow.socket
                and (flow.socket.total_retrans, flow.socket.data_segs_out)
                == (first["total_retrans"], first["data_segs_out"])):
            return {"sender": first, "flow": [flow.socket.total_retrans, flow.socket.data_segs_out]}
        assert time.monotonic() < deadline, (
            f"the flow's counters {flow.socket} never equalled the sender's {first}, {second}")
        time.sleep(0.05)


@contextmanager
def namespace_snmp(ns: LossNamespace, timeout: float = 30.0) -> Iterator[str]:
    """/proc/PID/net/snmp of a process in `ns`: the namespace's counters, as the agent's
    /proc/net/snmp is the node's. Yields once the process has entered the namespace."""
    holder = ns.popen("sleep", "infinity")
    deadline = time.monotonic() + timeout
    try:
        # `ip netns exec` enters the namespace, then becomes `sleep` under the same pid. Its
        # counters cannot tell: a fresh VM's root namespace may have sent no TCP either.
        while not _same_file(f"/proc/{holder.pid}/ns/net", f"/run/netns/{ns.name}"):
            assert holder.poll() is None and time.monotonic() < deadline, "the process never entered the namespace"
            time.sleep(0.01)
        yield f"/proc/{holder.pid}/net/snmp"
    finally:
        holder.kill()
        holder.wait()


def _same_file(a: str, b: str) -> bool:
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def namespace_segments(ns: LossNamespace) -> TcpSegments:
    """OutSegs and RetransSegs as the namespace's own /proc/net/snmp gives them."""
    inside = ns.snmp_tcp()
    return TcpSegments(inside["OutSegs"], inside["RetransSegs"])


def namespace_segment_mismatches(through_proc: TcpSegments, inside: TcpSegments, during: TcpSegments,
                                 events: int, missed: int, min_out_segs: int) -> list[str]:
    """What says the counters read through /proc/PID/net/snmp are not the namespace's own:
    `through_proc` and `inside` read with nothing sending in between must be equal; `during`
    a lossy load of at least `min_out_segs` segments with `events` retransmit events of the
    namespace's flows (`missed`: hits no program ran for), RetransSegs lies within the GSO
    bound of the events. Empty: they are its own."""
    problems = []
    if through_proc != inside:
        problems.append(f"/proc/PID/net/snmp says {through_proc}, the namespace's /proc/net/snmp {inside}")
    if during.out_segs <= min_out_segs:
        problems.append(f"{during.out_segs} segments sent during the load, not above {min_out_segs}")
    if events <= 0:
        problems.append("the load made no retransmit events")
    if not events <= during.retrans_segs <= (events + missed) * MAX_SEGMENTS_PER_SKB:
        problems.append(f"RetransSegs {during.retrans_segs} outside [{events}, ({events} + {missed} missed) "
                        f"x {MAX_SEGMENTS_PER_SKB}]")
    return problems
