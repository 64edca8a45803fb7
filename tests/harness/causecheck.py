"""The kernel's own per-cause counters (TcpExt) against the agent's retransmit causes.

tcp_xmit_retransmit_queue() adds each retransmitted segment to TCPSlowStartRetrans in the
Loss state and to TCPFastRetrans outside it; each retransmission timeout adds to
TCPTimeouts and resends the head segment; each tail loss probe adds to TCPLossProbes and
resends the last segment (or sends new data instead). With one segment per skb (the
namespace's loopback at gso_max_segs 1, see one_segment_per_skb) one tracepoint event is
one segment, so:
  timeout == TCPTimeouts + TCPSlowStartRetrans
  TCPFastRetrans <= fast + probe <= TCPFastRetrans + TCPLossProbes
except for retransmitted segments no program saw. The kernel counts every retransmitted
segment in /proc/net/snmp RetransSegs, so those are RetransSegs minus what the program
counted; they have no cause, and the counters may exceed the causes by at most that many,
all bounds taken together. They are the hits the kernel ran no BPF program for
(missedEvents) and, on a loaded machine, more: on Linux 6.18 under stress-ng, RetransSegs
ran 1 to 8 segments ahead beyond missedEvents in 42 of 500 bulk transfers; with a
tracepoint and a raw-tracepoint program side by side, both saw the same hits with
recursion_misses 0 and 12 of 150 runs still had the gap
(the CI failure that taught this: TCPFastRetrans 4 above fast + probe, 0 missed). The
upper bounds have no slack.
"""

from __future__ import annotations

from .netns import LossNamespace

COUNTERS = ("TCPFastRetrans", "TCPSlowStartRetrans", "TCPLossProbes", "TCPTimeouts", "RetransSegs")
CAUSES = ("timeout", "fast", "probe", "unknown")


def one_segment_per_skb(ns: LossNamespace) -> None:
    """GSO/TSO off and at most one segment per skb on the namespace's loopback."""
    ns.exec("ethtool", "-K", "lo", "gso", "off", "tso", "off")
    ns.ip("link", "set", "lo", "gso_max_segs", "1")


def tcp_ext(ns: LossNamespace) -> dict[str, int]:
    """The namespace's /proc/net/netstat TcpExt counters and /proc/net/snmp RetransSegs."""
    lines = [line.split() for line in ns.exec("cat", "/proc/net/netstat").splitlines() if line.startswith("TcpExt:")]
    return {**{k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}, "RetransSegs": ns.snmp_tcp()["RetransSegs"]}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in COUNTERS}


def unseen_segments(counters: dict[str, int], counted: int) -> int:
    """Retransmitted segments the kernel counted (RetransSegs) beyond the `counted` events
    (retransmits plus SYN-ACK retransmits) of a program that saw the whole load. Negative
    means the program counted more than the kernel retransmitted."""
    return counters["RetransSegs"] - counted


def cause_mismatches(by_cause: dict[str, int], counters: dict[str, int], counted: int) -> list[str]:
    """What breaks the bounds above (empty: the causes agree with the kernel's counters, up to
    the segments in RetransSegs beyond the `counted` events that no program saw)."""
    unseen = unseen_segments(counters, counted)
    causes = {name: by_cause.get(name, 0) for name in CAUSES}
    timeouts = counters["TCPTimeouts"] + counters["TCPSlowStartRetrans"]
    fast_probe, fast = causes["fast"] + causes["probe"], counters["TCPFastRetrans"]
    problems = []
    if causes["timeout"] > timeouts:
        problems.append(f"timeout {causes['timeout']} > TCPTimeouts + TCPSlowStartRetrans {counters}")
    if fast_probe > fast + counters["TCPLossProbes"]:
        problems.append(f"fast + probe {fast_probe} > TCPFastRetrans + TCPLossProbes {counters}")
    below = max(0, timeouts - causes["timeout"]) + max(0, fast - fast_probe)
    if unseen < 0:
        problems.append(f"{-unseen} more events counted than RetransSegs {counters}")
    elif below > unseen:
        problems.append(f"timeout {causes['timeout']}, fast + probe {fast_probe}: {below} below TCPTimeouts + "
                        f"TCPSlowStartRetrans, TCPFastRetrans {counters}, and only {unseen} segments in "
                        "RetransSegs no program saw")
    return problems
