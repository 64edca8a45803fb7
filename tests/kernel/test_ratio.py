"""A flow's segment counters (dataSegsOut, totalRetrans) are its connection's own, as the
sender's TCP_INFO gives them: within the bound of when the program reads them during a lossy
bulk transfer, and equal once the connection retransmits slowly enough for every retransmit
to read them.
"""

from __future__ import annotations

import pytest

from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from retransmit_agent.segments import read_tcp_segments
from retransmit_core.ratio import retransmit_ratio
from tests.harness import loads
from tests.harness.netns import LossNamespace
from tests.harness.ratiocheck import (
    SegSender,
    bulk_counter_mismatches,
    floor_counters,
    namespace_segment_mismatches,
    namespace_segments,
    namespace_snmp,
    sender_flow,
    wait_for_equal_counters,
)
from tests.harness.refcount import per_flow, succeeded

pytestmark = pytest.mark.kernel

LOSS_PERCENT = 5
# ~17,000 segments of 1,448 bytes, ~900 retransmits at 5%: long enough (about a second
# here) for the program to read the counters again during the transfer.
BULK_BYTES = 24 << 20
PORT = 5411


def test_flow_counters_are_the_connections_own(ns: LossNamespace):
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
            at_end = {k: v for k, v in end.items() if k != "samples"}
            assert bulk_counter_mismatches(flow, end) == [], (flow, at_end)
            retransmitted, sent = flow.socket.total_retrans, flow.socket.data_segs_out
            floor = floor_counters(flow, end["samples"])
            print(f"bulk at {LOSS_PERCENT}% loss: flow {retransmitted}/{sent} = "
                  f"{retransmit_ratio(retransmitted, sent)}, sender at the end "
                  f"{end['total_retrans']}/{end['data_segs_out']} = "
                  f"{retransmit_ratio(end['total_retrans'], end['data_segs_out'])}, {flow.retransmits} events, "
                  f"floor {floor['total_retrans']}/{floor['data_segs_out']} ({len(end['samples'])} samples)")

            # 2. A dead path: one segment retransmitted on timeouts (200 ms and more apart, past
            # the read interval), so each retransmit reads the counters, which then equal the
            # sender's exactly between two retransmits.
            ns.drop_everything()
            queued = sender.ask("send 1")
            equal = wait_for_equal_counters(program, sender, queued)
            assert equal["flow"] == [equal["sender"]["total_retrans"], equal["sender"]["data_segs_out"]]
        finally:
            ns.clear_loss()
            sender.close()


def test_a_namespaces_segment_counters_read_through_proc_are_its_own(ns, reference):
    # A process in the namespace: its /proc/PID/net/snmp is the namespace's, as the agent's
    # /proc/net/snmp is the node's. It equals what the namespace's own /proc/net/snmp says
    # (read with nothing sending in between), and the lossy bulk's retransmitted segments
    # show in it within the GSO bound of the reference's retransmit events.
    with namespace_snmp(ns) as path, RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as own:
        start = read_tcp_segments(path)
        loads.bulk(ns, loss=LOSS_PERCENT, connections=2, nbytes=2 << 20)
        during = read_tcp_segments(path).since(start)
        missed = own.snapshot().missed_events or 0
        through_proc, inside = read_tcp_segments(path), namespace_segments(ns)
    mine = loads.own_addresses(ns)
    events = sum(r for r, _ in per_flow(reference.read(), lambda e: (e.local_ip in mine or e.remote_ip in mine)
                                        and succeeded(e)).values())
    assert namespace_segment_mismatches(through_proc, inside, during, events, missed,
                                        min_out_segs=2 * (2 << 20) // 1448) == []
    print(f"namespace at {LOSS_PERCENT}% loss (both ways, duplex): {during.retrans_segs}/{during.out_segs} = "
          f"{retransmit_ratio(during.retrans_segs, during.out_segs)}; {events} retransmit events")
