"""The kernel program counts exactly what an independent reference counter sees, per flow and in total.

Tracepoints are global: other tests on this host retransmit too. Each test's namespace
has loopback addresses of its own, so "mine" = flows with one of those addresses, and the
programs whose totals are compared carry a filter that keeps only those flows.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter

import pytest

from retransmit_agent.kernel import KernelConfig, KernelSnapshot, RetransmitProgram
from tests.harness import loads
from tests.harness.loads import MAX_SEGMENTS_PER_SKB
from tests.harness.refcount import per_flow, succeeded

pytestmark = pytest.mark.kernel


def flows_of(snapshot: KernelSnapshot, addresses: set[str]) -> dict:
    return {f.key: (f.retransmits, f.synack_retransmits) for f in snapshot.flow_counters
            if f.local_ip in addresses or f.remote_ip in addresses}


def expected_flows(counts: Counter, addresses: set[str], keep=lambda e: True) -> dict:
    return per_flow(counts, lambda e: (e.local_ip in addresses or e.remote_ip in addresses)
                    and succeeded(e) and keep(e))


def expected_by_state(counts: Counter, addresses: set[str]) -> dict[str, int]:
    # SYN-ACK retransmits carry no state; the product files them under SYN_RECV.
    out: Counter = Counter()
    for e, n in counts.items():
        if (e.local_ip in addresses or e.remote_ip in addresses) and succeeded(e):
            out["SYN_RECV" if e.synack else e.state] += n
    return dict(out)


def assert_totals_exact(snapshot: KernelSnapshot, expected: dict) -> None:
    assert snapshot.retransmits == sum(r for r, _ in expected.values())
    assert snapshot.synack_retransmits == sum(s for _, s in expected.values())
    # every matched event was either handed to user space or counted as lost
    assert snapshot.sampled_events + snapshot.lost_events == snapshot.retransmits + snapshot.synack_retransmits


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_bulk_transfer_under_random_loss_matches_reference_exactly(ns, reference, family):
    mine = loads.own_addresses(ns)
    with RetransmitProgram.open(KernelConfig()) as everything, \
            RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as own:
        before = ns.snmp_tcp()
        loads.bulk(ns, loss=10, family=family, connections=4, nbytes=2 << 20)
        after = ns.snmp_tcp()
        counts = reference.read()
        unfiltered, filtered = everything.snapshot(), own.snapshot()

    expected = expected_flows(counts, mine)
    events = sum(r for r, _ in expected.values())
    assert events > 100, "the load should have made plenty of retransmits"
    assert {f[0] for f in expected} == {family}
    # per flow: with and without a filter
    assert flows_of(unfiltered, mine) == expected
    assert flows_of(filtered, mine) == expected
    assert len(filtered.flow_counters) == len(expected)
    # totals and states: only the filtered program sees nothing but this test's flows
    assert_totals_exact(filtered, expected)
    assert filtered.by_state == expected_by_state(counts, mine)
    assert all(f.last_state for f in filtered.flow_counters)
    assert all(f.first_seen <= f.last_seen for f in filtered.flow_counters)
    # RetransSegs counts segments, the tracepoint skbs: events <= segments <= events * max segs/skb
    segments = after["RetransSegs"] - before["RetransSegs"]
    assert events <= segments <= (events + filtered.missed_events) * MAX_SEGMENTS_PER_SKB


def test_syn_retransmits_counted_per_flow_in_syn_sent(ns, reference):
    mine = loads.own_addresses(ns)
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        before = ns.snmp_tcp()
        connections = loads.syn_drops(ns, connections=6, seconds=3.5)
        after = ns.snmp_tcp()
        counts = reference.read()
        snapshot = program.snapshot()

    expected = expected_flows(counts, mine)
    clients = {("IPv4", c["client"][0], c["client"][1], c["server"][0], c["server"][1]) for c in connections}
    assert set(expected) == clients, "every dropped-SYN connection retransmitted its SYN"
    assert flows_of(snapshot, mine) == expected
    assert_totals_exact(snapshot, expected)
    assert snapshot.by_state == {"SYN_SENT": snapshot.retransmits}
    assert {f.last_state for f in snapshot.flow_counters} == {"SYN_SENT"}
    # A SYN is one segment in one skb: RetransSegs and events agree, except for tracepoint
    # hits no BPF program saw because another BPF program was running on that CPU (the
    # kernel counts those per program; the reference missed the same ones, see above).
    segments = after["RetransSegs"] - before["RetransSegs"]
    assert snapshot.retransmits <= segments <= snapshot.retransmits + snapshot.missed_events


def test_synack_retransmits_counted_on_the_server_side(ns, reference):
    mine = loads.own_addresses(ns)
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        before = ns.snmp_tcp()
        connections = loads.synack_drops(ns, connections=6, seconds=3.5)
        after = ns.snmp_tcp()
        counts = reference.read()
        snapshot = program.snapshot()

    expected = expected_flows(counts, mine)
    servers = {("IPv4", c["server"][0], c["server"][1], c["client"][0], c["client"][1]) for c in connections}
    synack_flows = {k for k, (_, s) in expected.items() if s > 0}
    assert synack_flows == servers, "every server-side half-open connection retransmitted its SYN-ACK"
    assert flows_of(snapshot, mine) == expected
    assert_totals_exact(snapshot, expected)
    assert snapshot.synack_retransmits > 0
    assert snapshot.by_state.get("SYN_RECV") == snapshot.synack_retransmits
    # SYN-ACKs are single segments too, and the kernel counts them in RetransSegs
    events = snapshot.retransmits + snapshot.synack_retransmits
    assert events <= after["RetransSegs"] - before["RetransSegs"] <= events + snapshot.missed_events


@pytest.mark.parametrize("ringbuf", [True, False], ids=["ringbuf", "perfbuf"])
def test_rate_limited_samples_are_counted_as_lost_and_totals_stay_exact(ns, reference, ringbuf):
    mine = loads.own_addresses(ns)
    config = KernelConfig(remote_cidrs=loads.own_cidrs(ns), samples_per_second=5)
    with RetransmitProgram.open(config, ringbuf=ringbuf) as program:
        assert program.uses_ringbuf is ringbuf
        started = time.monotonic()
        loads.bulk(ns, loss=10, connections=3, nbytes=1 << 20)
        drained = program.drain_events()
        counts = reference.read()
        snapshot = program.snapshot()
        windows = math.ceil(time.monotonic() - started) + 1

    expected = expected_flows(counts, mine)
    assert_totals_exact(snapshot, expected)
    assert snapshot.lost_events > 0
    assert len(drained) == snapshot.sampled_events > 0
    # at most 5 per one-second window, plus CPUs racing at a window's start
    assert snapshot.sampled_events <= windows * (5 + os.cpu_count())
    assert all(e.local.ip in mine and e.remote.ip in mine for e in drained)
    assert {(e.family, e.local.ip, e.local.port, e.remote.ip, e.remote.port) for e in drained} <= set(expected)


@pytest.mark.parametrize("ringbuf", [True, False], ids=["ringbuf", "perfbuf"])
def test_full_sample_buffer_counts_lost_events_and_totals_stay_exact(ns, reference, ringbuf):
    mine = loads.own_addresses(ns)
    # One page of buffer, no rate limit to speak of, and nobody draining during the load.
    config = KernelConfig(remote_cidrs=loads.own_cidrs(ns), samples_per_second=1_000_000, ring_pages=1)
    with RetransmitProgram.open(config, ringbuf=ringbuf) as program:
        loads.bulk(ns, loss=10, connections=3, nbytes=1 << 20)
        drained = program.drain_events()
        counts = reference.read()
        snapshot = program.snapshot()

    expected = expected_flows(counts, mine)
    assert_totals_exact(snapshot, expected)
    assert flows_of(snapshot, mine) == expected
    assert snapshot.lost_events > 0
    assert len(drained) == snapshot.sampled_events > 0


def test_flows_evicted_from_a_tiny_map_still_count_in_totals(ns, reference):
    mine = loads.own_addresses(ns)
    config = KernelConfig(remote_cidrs=loads.own_cidrs(ns), flow_capacity=4)
    # More flows than the map plus the pending runs (two per CPU) can hold, on any machine.
    connections = 4 + 2 * os.cpu_count() + 4
    with RetransmitProgram.open(config) as program:
        loads.bulk(ns, loss=10, connections=connections, nbytes=256 << 10)
        counts = reference.read()
        snapshot = program.snapshot()

    expected = expected_flows(counts, mine)
    # the map holds 4 flows; runs still pending add at most two flows per CPU (RUN_SLOTS in retransmit.h)
    assert len(snapshot.flow_counters) <= 4 + 2 * os.cpu_count() < len(expected)
    assert_totals_exact(snapshot, expected)
    assert sum(snapshot.by_state.values()) == snapshot.retransmits
    # a flow still in the map has at most what the reference saw (it may have been evicted and re-added)
    for key, (retransmits, synacks) in flows_of(snapshot, mine).items():
        assert retransmits <= expected[key][0] and synacks <= expected[key][1]
