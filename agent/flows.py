"""Decoding what the kernel program stores (addresses, ports, states, ktime) into flows and events.

Pure functions and plain data: kernel.py extracts raw values from bcc's map entries and
events (whose layouts come from bpf/retransmit.h) and hands them here.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

from retransmit_core.api import (
    RETRANSMIT_CAUSES,
    TCP_STATES,
    Endpoint,
    Flow,
    IPFamily,
    RecentEvent,
    SocketSnapshot,
)

AF_INET = 2
AF_INET6 = 10
FAMILY_NAMES: dict[int, str] = {AF_INET: IPFamily.IPV4.value, AF_INET6: IPFamily.IPV6.value}

# struct event.kind
KIND_RETRANSMIT = 0
KIND_SYNACK = 1
KIND_NAMES = {KIND_RETRANSMIT: "retransmit", KIND_SYNACK: "synack"}

# Kernel enum tcp_state value -> name without TCP_ (1 = ESTABLISHED ... 13 = BOUND_INACTIVE).
STATE_NAMES: dict[int, str] = {i + 1: name for i, name in enumerate(TCP_STATES)}


def state_name(number: int) -> Optional[str]:
    """The kernel's name for a TCP state number, None for numbers the kernel does not use."""
    return STATE_NAMES.get(number)


def decode_address(family: int, raw: bytes) -> str:
    """Text form of an address as the tracepoint stores it (network byte order bytes).

    IPv4 uses the first 4 bytes of `raw`, IPv6 the first 16.
    """
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    raise ValueError(f"address family {family} is neither AF_INET (2) nor AF_INET6 (10)")


def encode_address(ip: str) -> bytes:
    """Network byte order bytes of an address: the inverse of decode_address."""
    return ipaddress.ip_address(ip).packed


# How far the measured wall-clock offset may wander before it is taken up: more than two
# reads of the clocks ever lie apart, less than any clock step worth showing.
OFFSET_TOLERANCE_NS = 1_000_000


def stable_offset(previous: Optional[int], measured: int, tolerance_ns: int = OFFSET_TOLERANCE_NS) -> int:
    """The offset to use: `previous` while `measured` stays within `tolerance_ns` of it.
    Two reads of the clocks are never exactly as far apart, and a flow's firstSeen/lastSeen
    that moved by a microsecond from one snapshot to the next would make an unchanged report
    look changed: a report write every period, forever, instead of a heartbeat."""
    if previous is None or abs(measured - previous) > tolerance_ns:
        return measured
    return previous


_offset_ns: Optional[int] = None


def wall_clock_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC: add it to a bpf_ktime_get_ns() value. The same
    from call to call until the wall clock is set or slewed by more than OFFSET_TOLERANCE_NS."""
    global _offset_ns
    _offset_ns = stable_offset(_offset_ns, time.time_ns() - time.monotonic_ns())
    return _offset_ns


def ktime_to_datetime(ktime_ns: int, offset_ns: int) -> datetime:
    """Aware UTC datetime of a bpf_ktime_get_ns() (CLOCK_MONOTONIC) timestamp."""
    return datetime.fromtimestamp((ktime_ns + offset_ns) / 1e9, tz=timezone.utc)


@dataclass(frozen=True)
class SocketState:
    """The retransmitting socket at a flow's latest retransmit (read through BTF)."""

    srtt_us: int        # smoothed round-trip time, microseconds
    snd_cwnd: int       # congestion window, segments
    packets_out: int    # segments in flight
    retrans_out: int    # retransmitted segments in flight
    timeouts: int       # consecutive unrecovered retransmission timeouts (the black-hole signal)
    data_segs_out: Optional[int] = None   # data segments sent over the connection's life; None: not read
    total_retrans: Optional[int] = None   # segments retransmitted over its life; None with data_segs_out

    def to_api(self) -> SocketSnapshot:
        return SocketSnapshot(srtt_microseconds=self.srtt_us, congestion_window=self.snd_cwnd,
                              segments_in_flight=self.packets_out, retransmitted_in_flight=self.retrans_out,
                              consecutive_timeouts=self.timeouts)


def causes_by_name(counts) -> dict[str, int]:
    """{cause name: count} for a CAUSE_*-indexed sequence, leaving out zeros."""
    return {RETRANSMIT_CAUSES[i]: int(n) for i, n in enumerate(counts) if n and i < len(RETRANSMIT_CAUSES)}


@dataclass(frozen=True)
class FlowCounters:
    """One flow's counters as the kernel kept them. `local` is the retransmitting side."""

    family: str                 # "IPv4" or "IPv6"
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    retransmits: int
    synack_retransmits: int
    last_state: Optional[str]   # kernel state name without TCP_
    first_seen: datetime
    last_seen: datetime
    by_cause: dict[str, int] = field(default_factory=dict)   # see causes_by_name
    socket: Optional[SocketState] = None                    # None: no BTF, or only SYN-ACKs
    cgroup: int = 0     # the socket's cgroup v2 id (the inode of its cgroup2 directory); 0: unknown

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        return (self.family, self.local_ip, self.local_port, self.remote_ip, self.remote_port)

    @property
    def total(self) -> int:
        return self.retransmits + self.synack_retransmits

    def to_flow(self) -> Flow:
        return Flow(
            local=Endpoint(ip=self.local_ip, port=self.local_port),
            remote=Endpoint(ip=self.remote_ip, port=self.remote_port),
            family=self.family,
            retransmits=self.retransmits,
            synack_retransmits=self.synack_retransmits,
            last_state=self.last_state,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            by_cause=self.by_cause,
            socket=self.socket.to_api() if self.socket else None,
            data_segs_out=self.socket.data_segs_out if self.socket else None,
            total_retrans=self.socket.total_retrans if self.socket else None,
        )


def flow_counters(family: int, saddr: bytes, daddr: bytes, sport: int, dport: int,
                  retransmits: int, synack_retransmits: int, first_ns: int, last_ns: int,
                  last_state: int, offset_ns: int, by_cause=(), socket: Optional[SocketState] = None,
                  cgroup: int = 0) -> FlowCounters:
    """A FlowCounters from a flow map key (addresses, ports) and its struct flow_stats."""
    return FlowCounters(
        family=FAMILY_NAMES[family],
        local_ip=decode_address(family, saddr),
        local_port=sport,
        remote_ip=decode_address(family, daddr),
        remote_port=dport,
        retransmits=retransmits,
        synack_retransmits=synack_retransmits,
        last_state=state_name(last_state),
        first_seen=ktime_to_datetime(first_ns, offset_ns),
        last_seen=ktime_to_datetime(last_ns, offset_ns),
        by_cause=causes_by_name(by_cause),
        socket=socket,
        cgroup=cgroup,
    )


def recent_event(ts_ns: int, family: int, kind: int, state: int, sport: int, dport: int,
                 saddr: bytes, daddr: bytes, offset_ns: int) -> RecentEvent:
    """A RecentEvent (the API's sample) from the fields of a struct event."""
    return RecentEvent(
        time=ktime_to_datetime(ts_ns, offset_ns),
        kind=KIND_NAMES.get(kind, "retransmit"),
        family=FAMILY_NAMES[family],
        local=Endpoint(ip=decode_address(family, saddr), port=sport),
        remote=Endpoint(ip=decode_address(family, daddr), port=dport),
        state=state_name(state),
    )
