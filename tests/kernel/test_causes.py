"""Each retransmit's cause (timeout, fast, probe) agrees with the kernel's own per-cause
counters within the bounds tests/harness/causecheck.py explains, and the socket offsets read
from this kernel's BTF are the kernel's. The program's total still equals the reference
counter exactly.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from retransmit_agent.btf import Btf
from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from tests.harness import loads
from tests.harness.causecheck import cause_mismatches, delta, one_segment_per_skb, tcp_ext, unseen_segments
from tests.harness.netns import LossNamespace
from tests.harness.refcount import per_flow, succeeded

pytestmark = pytest.mark.kernel

@pytest.fixture
def one_segment_ns():
    with LossNamespace(prefix="rtcause") as ns:
        one_segment_per_skb(ns)
        yield ns


def rr(ns: LossNamespace, port: int, **options: str) -> subprocess.Popen:
    args = [arg for key, value in options.items() for arg in (f"--{key}", value)]
    return ns.python("tests.harness.traffic", "rr", "--server-ip", ns.v4[1], "--client-ip", ns.v4[0],
                     "--port", str(port), "--connections", "2", "--bytes", "8000", *args,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(ns: LossNamespace, proc: subprocess.Popen) -> None:
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    ns.clear_loss()
    ns.wait_quiet()


def random_loss_on_bulk(ns: LossNamespace) -> None:
    loads.bulk(ns, loss=3, connections=2, nbytes=2 << 20)


def path_dead_for_seconds(ns: LossNamespace) -> None:
    proc = rr(ns, 5302, rounds="0", seconds="8")
    start = ns.snmp_tcp()["OutSegs"]
    deadline = time.monotonic() + 120
    while ns.snmp_tcp()["OutSegs"] < start + 2000:    # traffic flows before the path dies
        assert proc.poll() is None and time.monotonic() < deadline, "request/response traffic did not start"
        time.sleep(0.05)
    ns.drop_everything()
    time.sleep(3.5)   # the outage itself: its length is the scenario, not a wait for a result
    ns.clear_loss()
    finish(ns, proc)


def tail_segments_dropped(ns: LossNamespace) -> None:
    # A response's last segment carries PSH: dropping some leaves a tail only a probe recovers.
    ns.drop_tail_segments(5303, percent=20)
    finish(ns, rr(ns, 5303, rounds="200"))


@pytest.mark.parametrize("scenario, dominant", [
    (random_loss_on_bulk, "fast"),
    (path_dead_for_seconds, "timeout"),
    (tail_segments_dropped, "probe"),
], ids=["random-loss-fast", "dead-path-timeout", "tail-drop-probe"])
def test_causes_agree_with_the_kernels_own_counters(one_segment_ns, reference, scenario, dominant):
    ns = one_segment_ns
    mine = loads.own_addresses(ns)
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        assert program.features.sock is not None, program.features.sock_problem
        before = tcp_ext(ns)
        scenario(ns)
        after = tcp_ext(ns)
        counts = reference.read()
        snapshot = program.snapshot()

    counters = delta(before, after)
    causes = {name: snapshot.by_cause.get(name, 0) for name in ("timeout", "fast", "probe", "unknown")}
    expected = per_flow(counts, lambda e: (e.local_ip in mine or e.remote_ip in mine) and succeeded(e))
    assert snapshot.retransmits == sum(r for r, _ in expected.values()) > 0
    assert sum(causes.values()) == snapshot.retransmits + snapshot.synack_retransmits
    assert causes["unknown"] == 0
    counted = snapshot.retransmits + snapshot.synack_retransmits
    print(f"{scenario.__name__}: causes {causes}, TcpExt {counters}, missed {snapshot.missed_events}, "
          f"unseen {unseen_segments(counters, counted)}")
    assert cause_mismatches(causes, counters, counted) == []
    assert max(causes, key=causes.get) == dominant, (causes, counters)
    # per flow: causes add up, and the socket seen at the latest retransmit is a live TCP socket
    for flow in snapshot.flow_counters:
        assert sum(flow.by_cause.values()) == flow.retransmits + flow.synack_retransmits
        assert flow.socket is not None and flow.socket.snd_cwnd >= 1 and flow.socket.srtt_us > 0
    if dominant == "timeout":
        assert max(f.socket.timeouts for f in snapshot.flow_counters) >= 2, "a dead path shows consecutive timeouts"


def test_syn_retransmits_are_timeouts_and_synacks_unknown(ns, reference):
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        loads.syn_drops(ns, connections=3, seconds=1.5)
        syns = program.snapshot()
        loads.synack_drops(ns, port=5005, connections=3, seconds=1.5)
        both = program.snapshot()
    assert syns.retransmits > 0 and syns.by_cause == {"timeout": syns.retransmits}
    assert both.synack_retransmits > 0
    assert both.by_cause == {"timeout": both.retransmits, "unknown": both.synack_retransmits}


def test_without_btf_causes_are_unknown_and_counts_unchanged(ns, reference):
    mine = loads.own_addresses(ns)
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns)), btf="/nonexistent/vmlinux") as program:
        assert program.features.sock is None and "/nonexistent/vmlinux" in program.features.sock_problem
        loads.bulk(ns, loss=10, connections=2, nbytes=1 << 20)
        counts = reference.read()
        snapshot = program.snapshot()
    expected = per_flow(counts, lambda e: (e.local_ip in mine or e.remote_ip in mine) and succeeded(e))
    assert snapshot.retransmits == sum(r for r, _ in expected.values()) > 0
    assert snapshot.by_cause == {"unknown": snapshot.retransmits}
    assert all(f.socket is None for f in snapshot.flow_counters)


PORT_CHECK = r"""
BPF_ARRAY(results, u64, 2);   /* [0] the socket's port equals the tracepoint's, [1] it differs */
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u16 num = 0;
    bpf_probe_read_kernel(&num, sizeof(num), (const char *)args->skaddr + SKC_NUM);
    u32 slot = num == args->sport ? 0 : 1;
    u64 *n = results.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


def test_btf_offsets_read_the_kernels_own_fields(ns):
    """The reader's offset of sock_common.skc_num (the local port), read from skaddr at each
    retransmit, equals the tracepoint's sport: the BTF reader finds what the kernel uses."""
    from bcc import BPF

    offset = Btf.load().member("sock_common", "skc_num")
    assert offset.bit_size == 16 and offset.bit_offset % 8 == 0
    bpf = BPF(text=PORT_CHECK.encode(), cflags=[f"-DSKC_NUM={offset.byte_offset}"])
    try:
        loads.bulk(ns, loss=10, connections=2, nbytes=1 << 20)
        same, different = (bpf[b"results"][i].value for i in (0, 1))
    finally:
        bpf.cleanup()
    assert same > 0 and different == 0
