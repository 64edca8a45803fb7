"""An independent reference counter on the same tcp tracepoints: the tests' ground truth.

Deliberately shares nothing with bpf/retransmit.bpf.c or agent/: its own minimal C, one
plain hash keyed by everything (family, addresses, ports, kind, state), no filters, no
LRU, no sampling. Start it before the load, read it after the namespace is quiet.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from retransmit_core.kernelvocab import TCP_STATES

SOURCE = r"""
#ifdef TP_NO_FAMILY
#include <net/sock.h>
/* Before 5.12 neither tracepoint has `family`: read the socket's own, as the tracepoint's
   field would have said (sock_common's head has kept its layout since 4.15). */
static __always_inline u16 socket_family(const void *skaddr)
{
    u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), &((const struct sock *)skaddr)->__sk_common.skc_family);
    return family;
}
#define FAMILY(args) socket_family(args->skaddr)
#else
#define FAMILY(args) (args->family)
#endif

struct ref_key {
    u16 family;
    u16 lport;
    u16 rport;
    u8 synack;
    u8 state;
    u8 laddr[16];
    u8 raddr[16];
    int err;
};
BPF_HASH(counts, struct ref_key, u64, 262144);

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    struct ref_key k = {};
    k.family = FAMILY(args);
    k.lport = args->sport;
    k.rport = args->dport;
    k.state = args->state;
#ifdef TP_HAS_ERR
    k.err = args->err;
#endif
    if (k.family == 2) {
        __builtin_memcpy(k.laddr, args->saddr, 4);
        __builtin_memcpy(k.raddr, args->daddr, 4);
    } else {
        __builtin_memcpy(k.laddr, args->saddr_v6, 16);
        __builtin_memcpy(k.raddr, args->daddr_v6, 16);
    }
    counts.atomic_increment(k);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct ref_key k = {};
    k.family = FAMILY(args);
    k.lport = args->sport;
    k.rport = args->dport;
    k.synack = 1;
    if (k.family == 2) {
        __builtin_memcpy(k.laddr, args->saddr, 4);
        __builtin_memcpy(k.raddr, args->daddr, 4);
    } else {
        __builtin_memcpy(k.laddr, args->saddr_v6, 16);
        __builtin_memcpy(k.raddr, args->daddr_v6, 16);
    }
    counts.atomic_increment(k);
    return 0;
}
"""

FlowKey = tuple[str, str, int, str, int]   # family, local ip, local port, remote ip, remote port


@dataclass(frozen=True)
class RefEvent:
    """One distinct (flow, kind, state) combination and how often it fired."""

    family: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    synack: bool
    state: Optional[str]   # None for SYN-ACK retransmits (that tracepoint has no state)
    err: int = 0           # Linux 6.17+ also reports failed attempts (err != 0)

    @property
    def flow(self) -> FlowKey:
        return (self.family, self.local_ip, self.local_port, self.remote_ip, self.remote_port)


class ReferenceCounter:
    def __init__(self, socket_family: Optional[bool] = None) -> None:
        """socket_family: read each socket's family from the socket, not the tracepoint
        (None: only where the tracepoints have no `family`, before 5.12)."""
        self._bpf = None
        self._socket_family = socket_family

    def start(self) -> "ReferenceCounter":
        from bcc import BPF

        fmt = "/sys/kernel/debug/tracing/events/tcp/tcp_retransmit_skb/format"
        if not os.path.exists(fmt):
            fmt = "/sys/kernel/tracing/events/tcp/tcp_retransmit_skb/format"
        fields = open(fmt).read()
        socket_family = self._socket_family
        if socket_family is None:
            socket_family = not re.search(r"\bfamily;", fields)
        cflags = (["-DTP_HAS_ERR"] if "int err;" in fields else []) + (["-DTP_NO_FAMILY"] if socket_family else [])
        self._bpf = BPF(text=SOURCE.encode(), cflags=cflags)
        return self

    def stop(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> "ReferenceCounter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def read(self) -> Counter:
        """Counter of RefEvent -> events so far, per flow as on the wire (see on_the_wire)."""
        return on_the_wire(self.read_sockets())

    def read_sockets(self) -> Counter:
        """Counter of RefEvent -> events so far, as the tracepoint reports them: an IPv6
        socket talking IPv4 says IPv6 with v4-mapped addresses."""
        out: Counter = Counter()
        for k, v in self._bpf[b"counts"].items():
            v4 = k.family == 2
            size = 4 if v4 else 16
            ip = lambda raw: str(ipaddress.ip_address(bytes(raw[:size])))  # noqa: E731
            state = None if k.synack else (TCP_STATES[k.state - 1] if 1 <= k.state <= len(TCP_STATES) else f"#{k.state}")
            out[RefEvent("IPv4" if v4 else "IPv6", ip(k.laddr), k.lport, ip(k.raddr), k.rport,
                         bool(k.synack), state, k.err)] += v.value
        return out


def on_the_wire(counts: Counter) -> Counter:
    """Events of IPv6 sockets talking IPv4 (v4-mapped addresses, ::ffff:a.b.c.d: dual-stack
    servers on [::]) as the IPv4 events they are on the wire, with plain IPv4 addresses."""
    out: Counter = Counter()
    for e, n in counts.items():
        local, remote = ipaddress.ip_address(e.local_ip), ipaddress.ip_address(e.remote_ip)
        if e.family == "IPv6" and remote.ipv4_mapped is not None:
            e = RefEvent("IPv4", str(local.ipv4_mapped or local), e.local_port, str(remote.ipv4_mapped),
                         e.remote_port, e.synack, e.state, e.err)
        out[e] += n
    return out


def per_flow(counts: Counter, keep: Callable[[RefEvent], bool] = lambda e: True) -> dict[FlowKey, tuple[int, int]]:
    """flow -> (retransmits, synack retransmits) over the events `keep` accepts."""
    flows: dict[FlowKey, list[int]] = {}
    for event, n in counts.items():
        if keep(event):
            entry = flows.setdefault(event.flow, [0, 0])
            entry[1 if event.synack else 0] += n
    return {k: (a, b) for k, (a, b) in flows.items()}


def succeeded(event: RefEvent) -> bool:
    """Retransmits that went out (older kernels report nothing else)."""
    return event.err == 0


def involving(addresses: set[str]) -> Callable[[RefEvent], bool]:
    """Events whose local or remote address is one of `addresses` (a test's own)."""
    return lambda e: e.local_ip in addresses or e.remote_ip in addresses
