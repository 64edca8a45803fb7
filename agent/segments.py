"""A network namespace's TCP segment counters (OutSegs, RetransSegs), read from its
/proc/net/snmp: the node's retransmit ratio over a trace.

The agent runs with the host's network (hostNetwork), so its /proc/net/snmp is the node's root
namespace: every connection of the node and of its hostNetwork pods, none of the other pods
(each has a namespace and counters of its own). IPv6 adds to the same Tcp counters: Linux keeps
one set of TCP MIBs per namespace for both families. OutSegs counts every segment sent,
retransmissions included, pure ACKs and resets too; RetransSegs the retransmitted ones.

    start = read_tcp_segments()              # TcpSegments, or None when unreadable
    ...
    during = read_tcp_segments().since(start)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SNMP = "/proc/net/snmp"


@dataclass(frozen=True)
class TcpSegments:
    """Segments sent and retransmitted (both include retransmissions, as in the MIB)."""

    out_segs: int
    retrans_segs: int

    def since(self, start: "TcpSegments") -> "TcpSegments":
        """The segments between `start` and these counters (64-bit counters on 64-bit
        kernels: they do not wrap; never negative even if a namespace were replaced)."""
        return TcpSegments(max(0, self.out_segs - start.out_segs), max(0, self.retrans_segs - start.retrans_segs))

    def plus(self, other: "TcpSegments") -> "TcpSegments":
        return TcpSegments(self.out_segs + other.out_segs, self.retrans_segs + other.retrans_segs)


def parse_snmp_tcp(text: str) -> TcpSegments:
    """OutSegs and RetransSegs from /proc/net/snmp's two `Tcp:` lines (names, then values).
    ValueError when they are missing."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2:
        raise ValueError("no Tcp: lines")
    values = dict(zip(rows[0], rows[1]))
    try:
        return TcpSegments(int(values["OutSegs"]), int(values["RetransSegs"]))
    except KeyError as e:
        raise ValueError(f"Tcp: has no {e.args[0]}") from None


def read_tcp_segments(path: str = SNMP) -> Optional[TcpSegments]:
    """The counters in `path` (the caller's namespace by default; /proc/PID/net/snmp is
    PID's), None when it cannot be read: the ratio is then left out, never made up."""
    try:
        return parse_snmp_tcp(Path(path).read_text())
    except (OSError, ValueError):
        return None
