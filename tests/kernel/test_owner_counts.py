"""Per-address counts (the kernel's `owners` map, what per-pod totals are summed from) equal the
reference counter's, whatever the flow maps evict; a full owners map is counted, never silent.

As in test_counting.py, each program keeps only the flows towards this test's namespace's
own addresses (other tests on this host retransmit too).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from retransmit_agent.resume import PodTotals
from retransmit_core.podindex import Owner
from tests.harness import loads
from tests.harness.refcount import succeeded

pytestmark = pytest.mark.kernel


def reference_by_local_address(counts: Counter, addresses: set[str]) -> dict[str, int]:
    """Retransmits + SYN-ACK retransmits per local address, from the reference counter."""
    out: Counter = Counter()
    for e, n in counts.items():
        if e.remote_ip in addresses and succeeded(e):
            out[e.local_ip] += n
    return dict(out)


def mine(by_address: dict[str, int], addresses: set[str]) -> dict[str, int]:
    return {ip: n for ip, n in by_address.items() if ip in addresses and n}


def test_per_address_and_per_pod_totals_stay_exact_with_more_flows_than_the_flow_map_holds(ns, reference):
    own = loads.own_addresses(ns)
    config = KernelConfig(remote_cidrs=loads.own_cidrs(ns), flow_capacity=4)
    # More flows than the map plus the pending runs (two per CPU) hold, per family.
    connections = 4 + 2 * os.cpu_count() + 4
    with RetransmitProgram.open(config) as program:
        loads.bulk(ns, loss=10, family="IPv4", connections=connections, nbytes=256 << 10)
        loads.bulk(ns, loss=10, family="IPv6", connections=connections, nbytes=128 << 10)
        loads.synack_drops(ns, connections=3, seconds=3.5)   # the other tracepoint: the server's address
        counts = reference.read()
        snapshot = program.snapshot()

    expected = reference_by_local_address(counts, own)
    flows = {(e.local_ip, e.local_port, e.remote_ip, e.remote_port) for e in counts if e.remote_ip in own}
    assert len(snapshot.flow_counters) < len(flows), "the flow map should have evicted flows"
    assert len(expected) == 4 and sum(expected.values()) > 100
    assert mine(snapshot.by_local_address, own) == expected
    assert snapshot.owners_full == 0
    assert sum(expected.values()) == snapshot.retransmits + snapshot.synack_retransmits

    # The agent's step: each address's count to the pod owning it (one pod per family here).
    owners = {ns.v4[0]: Owner(pod="a", namespace="t"), ns.v4[1]: Owner(pod="b", namespace="t"),
              ns.v6[0]: Owner(pod="a", namespace="t"), ns.v6[1]: Owner(pod="b", namespace="t")}
    pods = PodTotals().attribute(snapshot.by_local_address, owners.get).pods
    assert pods == {("t", "a"): expected[ns.v4[0]] + expected[ns.v6[0]],
                    ("t", "b"): expected[ns.v4[1]] + expected[ns.v6[1]]}


def test_retransmits_from_addresses_a_full_owner_map_cannot_take_are_counted_as_overflow(ns, reference):
    own = loads.own_addresses(ns)
    # Room for one address; both ends of the duplex load retransmit.
    config = KernelConfig(remote_cidrs=loads.own_cidrs(ns), owner_capacity=1)
    with RetransmitProgram.open(config) as program:
        loads.bulk(ns, loss=10, family="IPv4", connections=4, nbytes=512 << 10)
        counts = reference.read()
        snapshot = program.snapshot()

    expected = reference_by_local_address(counts, own)
    assert set(expected) == set(ns.v4), "both ends should have retransmitted"
    total = snapshot.retransmits + snapshot.synack_retransmits
    assert total == sum(expected.values())
    assert snapshot.owners_full > 0
    counted = mine(snapshot.by_local_address, own)
    # Every event is in one address's count or in the overflow: none twice, none lost.
    assert sum(counted.values()) + snapshot.owners_full == total
    # The address that got the map's one entry first is exact (the other may show a pending run).
    assert any(counted.get(ip) == n for ip, n in expected.items())
