"""The reference counter's no-`family` path (kernels before 5.12, e.g. Debian 11's 5.10 in the VM
layer) reads each socket's family from the socket and says exactly what the tracepoints'
own `family` field says, dual-stack servers included.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.harness import loads
from tests.harness.refcount import ReferenceCounter

pytestmark = pytest.mark.kernel


def _plain(ip: str) -> str:
    """An address as on the wire: a v4-mapped IPv6 address as its IPv4 address."""
    mapped = ipaddress.ip_address(ip).ipv4_mapped if ":" in ip else None
    return str(mapped) if mapped else ip


def _mapped(ip: str) -> bool:
    return _plain(ip) != ip


def test_family_read_from_the_socket_equals_the_tracepoints_family_field(ns):
    mine = loads.own_addresses(ns)
    with ReferenceCounter(socket_family=False) as field, ReferenceCounter(socket_family=True) as socket:
        loads.bulk(ns, 10, "IPv6", 5011, connections=2, nbytes=256 << 10)
        loads.bulk(ns, 10, "IPv4", 5012, connections=2, nbytes=256 << 10, dual_stack=True)
        loads.synack_drops(ns, 5013, connections=2, seconds=3.5, dual_stack=True)
        by_field, by_socket = ({e: n for e, n in counts.items() if {_plain(e.local_ip), _plain(e.remote_ip)} & mine}
                               for counts in (field.read_sockets(), socket.read_sockets()))
    kinds = {(e.family, e.synack, _mapped(e.local_ip)) for e in by_field}
    # the loads made what this test is about: IPv6 flows, and IPv6 sockets talking IPv4
    # (data and SYN-ACK retransmits), which only a socket's family tells from IPv4 sockets
    assert {("IPv6", False, False), ("IPv6", False, True), ("IPv6", True, True), ("IPv4", False, False)} <= kinds, kinds
    assert by_socket == by_field
