"""The kernel's own per-cause counters (TcpExt) against the agent's retransmit causes.

tcp_xmit_retransmit_queue() adds each retransmitted segment to TCPSlowStartRetrans in the
Loss state and to TCPFastRetrans outside it; each retransmission timeout adds to
TCPTimeouts and resends the head segment; each tail loss probe adds to TCPLossProbes and
resends the last segment (or sends new data instead). With one segment per skb (the
namespace's loopback at gso_max_segs 1, see one_segment_per_skb) one tracepoint event is
one segment, so:
  timeout == TCPTimeouts + TCPSlowStartRetrans
  TCPFastRetrans <= fast + probe <= TCPFastRetrans + TCPLossProbes
"""

from __future__ import annotations

from .netns import LossNamespace

COUNTERS = ("TCPFastRetrans", "TCPSlowStartRetrans", "TCPLossProbes", "TCPTimeouts")
CAUSES = ("timeout", "fast", "probe", "unknown")


def one_segment_per_skb(ns: LossNamespace) -> None:
    """GSO/TSO off and at most one segment per skb on the namespace's loopback."""
    ns.exec("ethtool", "-K", "lo", "gso", "off", "tso", "off")
    ns.ip("link", "set", "lo", "gso_max_segs", "1")


def tcp_ext(ns: LossNamespace) -> dict[str, int]:
    """The namespace's /proc/net/netstat TcpExt counters."""
    lines = [line.split() for line in ns.exec("cat", "/proc/net/netstat").splitlines() if line.startswith("TcpExt:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in COUNTERS}


def cause_mismatches(by_cause: dict[str, int], counters: dict[str, int]) -> list[str]:
    """What breaks the bounds above (empty: the causes agree with the kernel's counters)."""
    causes = {name: by_cause.get(name, 0) for name in CAUSES}
    problems = []
    if causes["timeout"] != counters["TCPTimeouts"] + counters["TCPSlowStartRetrans"]:
        problems.append(f"timeout {causes['timeout']} != TCPTimeouts + TCPSlowStartRetrans {counters}")
    if not counters["TCPFastRetrans"] <= causes["fast"] + causes["probe"] <= counters["TCPFastRetrans"] + counters["TCPLossProbes"]:
        problems.append(f"fast + probe {causes['fast'] + causes['probe']} outside TCPFastRetrans .. "
                        f"TCPFastRetrans + TCPLossProbes {counters}")
    return problems
