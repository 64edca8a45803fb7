"""A simulated node for the control-plane bench: a synthetic kernel snapshot turned into the
node's report by the agent's own step (nodeentry.node_entry, as the cluster agent runs it).

Entries are as large as a busy node makes them at the default settings: topFlows out of more
flows, events.keep recent events, local sides attributed to pods (and topPods from them), a
mix of IPv4 and IPv6. Each `next_entry()` adds retransmits, as a node would between two reports.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

from retransmit_agent.flows import AF_INET, AF_INET6, KIND_RETRANSMIT, flow_counters, recent_event
from retransmit_agent.kernel import KernelSnapshot
from retransmit_agent.nodeentry import NodeFacts, node_entry
from retransmit_agent.resume import PodTotals
from retransmit_core.api import DEFAULT_EVENTS_KEPT, DEFAULT_TOP_FLOWS, NodeStatus
from retransmit_core.kernelvocab import TCP_STATE_NUMBERS
from retransmit_core.podindex import Owner

FLOWS_PER_NODE = 24
STATES = tuple(TCP_STATE_NUMBERS[name] for name in ("ESTABLISHED", "ESTABLISHED", "SYN_SENT", "FIN_WAIT1"))


def _v4(rng: random.Random) -> bytes:
    return bytes([10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)])


def _v6(rng: random.Random) -> bytes:
    return bytes([0xfd, 0x00] + [rng.randrange(256) for _ in range(14)])


@dataclass
class SyntheticNode:
    """One simulated node's kernel counters, growing a little with every report."""

    name: str
    seed: int = 0
    kernel: str = "6.1.0-28-amd64"
    agent_version: str = "0.1.0"
    top_flows: int = DEFAULT_TOP_FLOWS
    keep_events: int = DEFAULT_EVENTS_KEPT
    flows: list[list] = field(default_factory=list)   # [family, saddr, daddr, sport, dport, count, state]
    owners: dict[str, Owner] = field(default_factory=dict)   # local IP -> its pod, as the pod index's lookup table
    pod_totals: Optional[PodTotals] = None   # the last entry's, as the agent carries them (None: none yet)
    remote_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._rng = rng
        for i in range(FLOWS_PER_NODE):
            family = AF_INET6 if i % 4 == 3 else AF_INET
            addr = _v6 if family == AF_INET6 else _v4
            saddr, daddr = addr(rng), addr(rng)
            self.flows.append([family, saddr, daddr, rng.randrange(32768, 61000), rng.choice((443, 5432, 6379, 8080, 9092)),
                               rng.randrange(1, 5000), rng.choice(STATES)])
            self.owners[str(ipaddress.ip_address(saddr))] = Owner(
                pod=f"svc-{rng.randrange(100):02d}-7d9f8c6b5-{rng.randrange(36**5):05x}",
                namespace=f"team-{rng.randrange(20):02d}")
        self._start_ns = time.monotonic_ns() - 600 * 10**9

    @property
    def retransmits(self) -> int:
        return sum(f[5] for f in self.flows)

    def grow(self, events: int) -> None:
        """`events` more retransmits spread over a few of the node's flows."""
        for _ in range(events):
            self._rng.choice(self.flows[:8])[5] += 1

    def snapshot(self) -> KernelSnapshot:
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        counters = [flow_counters(f[0], f[1], f[2], f[3], f[4], f[5], 0, self._start_ns, now - i * 10**6, f[6], offset)
                    for i, f in enumerate(self.flows)]
        by_state: dict[str, int] = {}
        by_local_address: dict[str, int] = {}   # as the kernel's `owners` map counts them
        for c in counters:
            by_state[c.last_state] = by_state.get(c.last_state, 0) + c.retransmits
            by_local_address[c.local_ip] = by_local_address.get(c.local_ip, 0) + c.retransmits
        return KernelSnapshot(retransmits=self.retransmits, synack_retransmits=0, lost_events=self.retransmits // 2,
                              sampled_events=100, failed_attempts=0, missed_events=0, by_state=by_state,
                              flow_counters=counters, by_local_address=by_local_address)

    def next_entry(self) -> NodeStatus:
        """The report the cluster agent would write now (its node_entry step, no baseline)."""
        now = time.monotonic_ns()
        offset = time.time_ns() - now
        events = []
        for i in range(self.keep_events):
            f = self.flows[i % len(self.flows)]
            events.append(recent_event(now - i * 10**7, f[0], KIND_RETRANSMIT, f[6], f[3], f[4], f[1], f[2], offset))
        step = node_entry(self.snapshot(), NodeFacts(self.name, self.kernel, self.agent_version),
                          top_flows=self.top_flows, keep_events=self.keep_events, now=datetime.now(timezone.utc),
                          recent_events=events, previous_pods=self.pod_totals,
                          previous_remotes=self.remote_counts, owners=self.owners)
        self.pod_totals = step.pod_totals
        self.remote_counts = step.remote_counts
        return step.entry
