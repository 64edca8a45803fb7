"""The kernel's own per-cause counters (TcpExt) against the agent's retransmit causes.

tcp_xmit_retransmit_queue() adds each retransmitted segment to TCPSlowStartRetrans in the
Loss state and to TCPFastRetrans outside it; each retransmission timeout adds to
TCPTimeouts and resends the head segment; each tail loss probe adds to TCPLossProbes and
resends the last segment (or sends new data instead). With one segment per skb (the
namespace's loopback at gso_max_segs 1, see one_segment_per_skb) one tracepoint event is
one segment, so:
  timeout == TCPTimeouts + TCPSlowStartRetrans
  TCPFastRetrans <= fast + probe <= TCPFastRetrans + TCPLossProbes
except for hits the kernel ran no BPF program for (another BPF program was running on that
CPU: the program's missedEvents). Those have no cause, and neither the program nor any
reference counter on the tracepoint sees them, so the counters may exceed the causes by at
most that many, all bounds taken together (seen once on a loaded machine: TCPFastRetrans one
above fast + probe).
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


def cause_mismatches(by_cause: dict[str, int], counters: dict[str, int], missed: int = 0) -> list[str]:
    """What breaks the bounds above (empty: the causes agree with the kernel's counters, up to
    `missed` segments the program was not run for)."""
    causes = {name: by_cause.get(name, 0) for name in CAUSES}
    timeouts = counters["TCPTimeouts"] + counters["TCPSlowStartRetrans"]
    fast_probe, fast = causes["fast"] + causes["probe"], counters["TCPFastRetrans"]
    problems = []
    if causes["timeout"] > timeouts:
        problems.append(f"timeout {causes['timeout']} > TCPTimeouts + TCPSlowStartRetrans {counters}")
    if fast_probe > fast + counters["TCPLossProbes"]:
        problems.append(f"fast + probe {fast_probe} > TCPFastRetrans + TCPLossProbes {counters}")
    unseen = max(0, timeouts - causes["timeout"]) + max(0, fast - fast_probe)
    if unseen > missed:
        problems.append(f"timeout {causes['timeout']}, fast + probe {fast_probe}: {unseen} below TCPTimeouts + "
                        f"TCPSlowStartRetrans, TCPFastRetrans {counters}, and only {missed} missed events")
    return problems
