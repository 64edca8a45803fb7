"""The kernel program's vocabulary: TCP state names and numbers, retransmit causes, and the
sizes of the program's maps. Each becomes a -D flag of bpf/retransmit.bpf.c (the agent's
kernelconfig), a key in the API (byState, byCause) or a default of the agent's options.
"""

from __future__ import annotations

# TCP states as the kernel prints them in the tracepoint (show_tcp_state_name), minus TCP_.
TCP_STATES: tuple[str, ...] = (
    "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
    "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV", "BOUND_INACTIVE",
)
# Kernel enum value (include/net/tcp_states.h) for each name: the BPF program sees numbers.
TCP_STATE_NUMBERS: dict[str, int] = {name: i + 1 for i, name in enumerate(TCP_STATES)}
# by_state's key for retransmits whose state the kernel does not report: tcp_retransmit_skb
# has no `state` field before Linux 5.0.
UNKNOWN_STATE = "UNKNOWN"
# Why a segment was retransmitted (byCause keys), in the kernel program's CAUSE_* order:
# the agent passes each index to the program as -DCAUSE_<NAME>. See bpf/retransmit.h.
RETRANSMIT_CAUSES: tuple[str, ...] = ("unknown", "timeout", "fast", "probe")

# Entries per IP family in the kernel's LRU flow maps. Totals stay exact beyond it; only
# the per-flow detail of the least recently retransmitting flows is evicted.
DEFAULT_FLOW_CAPACITY = 16384
# Entries in the kernel's map of retransmits per local address (`owners`: per-pod totals).
# Not LRU, so nothing evicts a count: it must hold every local address that retransmits
# during a trace, both families: a node's pods (kubelet's maxPods, 110 by default, rarely
# above 250; two addresses each when dual-stack) plus the node's own addresses. Past it, a
# new address's retransmits are counted in no pod's row but in the node report's
# podCountsOverflow (the node's totals stay exact).
DEFAULT_OWNER_CAPACITY = 4096
# Ring (or perf) buffer size in pages, a power of two: room for bursts of samples.
DEFAULT_RING_PAGES = 64
# Entries per family in each filter map (remote CIDRs, the selected pods' local addresses).
# A node holds far fewer pods; past it the addresses that do not fit are counted and said
# (retransmit_agent.kernel.RetransmitProgram.set_local_ips), never silently dropped.
DEFAULT_FILTER_CAPACITY = 1024
# Samples per second per node that the kernel sends to user space (spec.events.maxPerSecond).
DEFAULT_SAMPLES_PER_SECOND = 100
# Entries in the kernel's LRU map of dropped packets per (flow, direction, reason). The
# per-reason totals stay exact beyond it.
DEFAULT_DROP_FLOW_CAPACITY = 4096
# How old a flow's socket statistics (RTT, window, segment counters) may grow while the flow
# keeps retransmitting: the program reads them again at the first retransmit after this long
# (-DSOCK_READ_INTERVAL_NS). Short beside any report interval (1 s and more), long beside a
# burst's retransmits (microseconds apart): a busy socket costs ten reads a second.
SOCKET_READ_INTERVAL_MS = 100
