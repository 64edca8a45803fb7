"""Each in-kernel filter keeps exactly the matching flows, checked against the reference counter.

One mixed load (IPv4 on one port, IPv6 on another, data both ways between two addresses
per family) runs once while one program per filter kind is attached; each program must
hold exactly the reference's events that its filter accepts, per flow and in total.
Programs other than the CIDR and local-IP ones also carry a CIDR filter for the namespace's
own addresses, so their totals exclude other tests' traffic on this host (filters AND).
"""

from __future__ import annotations

from collections import Counter

import pytest

from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from tests.harness import loads
from tests.harness.netns import LossNamespace
from tests.harness.refcount import RefEvent, per_flow, succeeded

pytestmark = pytest.mark.kernel

PORTS = (5001, 5002)   # IPv4 load, IPv6 load


def filter_cases(ns: LossNamespace) -> dict[str, tuple[KernelConfig, callable]]:
    own = loads.own_cidrs(ns)
    (a4, b4), (a6, b6) = ns.v4, ns.v6
    return {
        "family": (KernelConfig(families=frozenset({"IPv6"}), remote_cidrs=own),
                   lambda e: e.family == "IPv6"),
        "port": (KernelConfig(ports=frozenset({PORTS[0]}), remote_cidrs=own),
                 lambda e: PORTS[0] in (e.local_port, e.remote_port)),
        # /31 and /127 around the server addresses: the LPM trie must match a prefix
        "remote_cidr": (KernelConfig(remote_cidrs=(f"{b4}/31", f"{b6}/127")),
                        lambda e: e.remote_ip in (b4, b6)),
        "state": (KernelConfig(states=frozenset({"ESTABLISHED"}), remote_cidrs=own),
                  lambda e: e.state == "ESTABLISHED"),
        "local_ip": (KernelConfig(local_ips=frozenset({a4, a6})),
                     lambda e: e.local_ip in (a4, a6)),
        "local_ip_empty_set": (KernelConfig(local_ips=frozenset()), lambda e: False),
    }


@pytest.fixture(scope="module")
def filtered_run(reference):
    """(namespace addresses, reference counts, {case: (snapshot, keep)}) after one mixed load."""
    with LossNamespace() as ns:
        cases = filter_cases(ns)
        programs = {name: RetransmitProgram.open(config) for name, (config, _) in cases.items()}
        try:
            loads.bulk_mix(ns, loss=10, ports=PORTS, connections=3, nbytes=1 << 20)
            counts = reference.read()
            snapshots = {name: program.snapshot() for name, program in programs.items()}
        finally:
            for program in programs.values():
                program.close()
        yield loads.own_addresses(ns), counts, {name: (snapshots[name], keep) for name, (_, keep) in cases.items()}


def mine(addresses: set[str]):
    return lambda e: (e.local_ip in addresses or e.remote_ip in addresses) and succeeded(e)


@pytest.mark.parametrize("case", ["family", "port", "remote_cidr", "state", "local_ip", "local_ip_empty_set"])
def test_filter_keeps_exactly_the_matching_flows(filtered_run, case):
    addresses, counts, results = filtered_run
    snapshot, keep = results[case]
    all_mine = per_flow(counts, mine(addresses))
    expected = per_flow(counts, lambda e: mine(addresses)(e) and keep(e))
    # the load is rich enough for the filter to matter
    assert sum(r for r, _ in all_mine.values()) > 100
    total = lambda flows: sum(r + s for r, s in flows.values())  # noqa: E731
    assert total(expected) < total(all_mine), "the filter rejected some of the namespace's events"

    got = {f.key: (f.retransmits, f.synack_retransmits) for f in snapshot.flow_counters}
    assert got == expected
    assert snapshot.retransmits == sum(r for r, _ in expected.values())
    assert snapshot.synack_retransmits == sum(s for _, s in expected.values())
    matched_states: Counter = Counter()
    for e, n in counts.items():
        if mine(addresses)(e) and keep(e):
            matched_states["SYN_RECV" if e.synack else e.state] += n
    assert snapshot.by_state == dict(matched_states)


def test_mixed_load_has_both_families_ports_states_and_directions(filtered_run):
    """Guards the filter tests above: each filter had something to reject."""
    addresses, counts, _ = filtered_run
    events: list[RefEvent] = [e for e in counts if mine(addresses)(e)]
    assert {e.family for e in events} == {"IPv4", "IPv6"}
    assert {p for e in events for p in (e.local_port, e.remote_port)} >= set(PORTS)
    assert len({e.state for e in events}) > 1
    assert len({e.local_ip for e in events}) == 4


def test_local_ip_set_changes_take_effect_live(reference):
    with LossNamespace() as ns:
        b4 = ns.v4[1]
        with RetransmitProgram.open(KernelConfig(local_ips=frozenset())) as program:
            loads.bulk(ns, loss=10, family="IPv4", port=5005, connections=2, nbytes=512 << 10)
            assert program.snapshot().retransmits == 0   # empty set: nothing counts
            first = reference.read()
            program.set_local_ips({b4})
            loads.bulk(ns, loss=10, family="IPv4", port=5006, connections=2, nbytes=512 << 10)
            second = reference.read()
            snapshot = program.snapshot()
            program.set_local_ips(None)
            assert program.config.local_ips == frozenset()   # the opening config is unchanged

    delta = second - first
    expected = per_flow(delta, lambda e: e.local_ip == b4 and succeeded(e))
    assert expected, "the server side retransmitted during the second load"
    got = {f.key: (f.retransmits, f.synack_retransmits) for f in snapshot.flow_counters}
    assert got == expected
    assert snapshot.retransmits == sum(r for r, _ in expected.values())


def test_dual_stack_server_flows_are_ipv4_for_every_filter(ns, reference):
    """An IPv6 socket on [::] serving IPv4 clients retransmits IPv4 flows with plain
    addresses: the family, CIDR and local-address filters see them as IPv4 (in a cluster a
    `namespaces` trace keeps a Go or Java pod's server side through its IPv4 address)."""
    client, server = ns.v4          # as loads.bulk uses them
    mine = loads.own_addresses(ns)
    cases = {
        "IPv4 family": (KernelConfig(families=frozenset({"IPv4"}), remote_cidrs=loads.own_cidrs(ns)), True),
        "IPv6 family": (KernelConfig(families=frozenset({"IPv6"}), remote_cidrs=loads.own_cidrs(ns)), False),
        "IPv4 remote CIDR": (KernelConfig(remote_cidrs=(f"{client}/32",)), True),
        "IPv4 local address": (KernelConfig(local_ips=frozenset({server})), True),
    }
    programs = {name: RetransmitProgram.open(config) for name, (config, _) in cases.items()}
    try:
        connections = loads.bulk(ns, loss=10, family="IPv4", port=5201, connections=3, nbytes=1 << 20,
                                 dual_stack=True)
        counts = reference.read()
        snapshots = {name: program.snapshot() for name, program in programs.items()}
    finally:
        for program in programs.values():
            program.close()

    server_side = per_flow(counts, lambda e: e.local_ip == server and e.local_port == 5201 and succeeded(e))
    assert server_side and {k[0] for k in server_side} == {"IPv4"}, "the [::] server made no IPv4 retransmits"
    assert {k[3] for k in server_side} == {client} and len(connections) == 3
    for name, (_config, keeps_server_side) in cases.items():
        got = {f.key: (f.retransmits, f.synack_retransmits) for f in snapshots[name].flow_counters
               if f.local_ip in mine and f.local_port == 5201}
        assert got == (server_side if keeps_server_side else {}), name


def test_local_ips_beyond_the_filter_capacity_are_counted_out_and_the_rest_still_count(reference):
    """More selected addresses than the filter maps hold: set_local_ips says how many did not
    fit (never raises: the pod watch once re-listed forever on that), keeps a stable subset
    (the lowest addresses), and the flows of those it keeps count exactly."""
    with LossNamespace() as ns:
        b4 = ns.v4[1]
        # Two addresses that sort after the server's (198.19 > 198.18): the one slot keeps b4.
        beyond = {"198.19.255.253", "198.19.255.254"}
        with RetransmitProgram.open(KernelConfig(local_ips=frozenset(), filter_capacity=1)) as program:
            assert program.set_local_ips({b4} | beyond) == 2
            first = reference.read()
            loads.bulk(ns, loss=10, family="IPv4", port=5007, connections=2, nbytes=512 << 10)
            second = reference.read()
            snapshot = program.snapshot()
            assert program.set_local_ips({b4}) == 0   # all fit again

    expected = per_flow(second - first, lambda e: e.local_ip == b4 and succeeded(e))
    assert expected, "the server side retransmitted during the load"
    assert {f.key: (f.retransmits, f.synack_retransmits) for f in snapshot.flow_counters} == expected
