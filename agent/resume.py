"""Resuming one node's counts across agent restarts: pure, no I/O.

- `Baseline` is what an earlier agent on this node already reported (read back from its own
  report at start-up); `cumulative_entry` adds it to the kernel's fresh counts, so a
  restarted agent continues instead of starting over and counts never go backwards. The
  report is never trimmed, so the baseline is exact. Only the own trace's report (its
  controlling owner's uid, `stored_report`) is a baseline: a trace re-created under the same
  name starts from zero.
- `PodTotals.attribute` / `ranked_pods` give each local pod's retransmits from the kernel's
  per-address counts (exact whatever the flow map evicts), resumed from every pod the report
  held (it keeps them all, not only the top N);
  `cumulative_pod_segments` each pod's own namespace's segment counters (podsegments.py),
  resumed like the node's: the report's earlier counts plus this agent's;
  `remote_totals` / `cumulative_remotes` / `ranked_remotes` the same by remote address.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from retransmit_core.api import MAX_NODE_PODS, MAX_REMOTES, Flow, NodeStatus, PodCount, RecentEvent, RemoteCount, add_counts, add_known
from retransmit_core.podindex import Owner
from retransmit_core.ranking import busiest_first_key, pod_key
from retransmit_core.ratio import retransmit_ratio

from .drops import DropBaseline
from .flows import FlowCounters
from .segments import TcpSegments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowKey:
    """Identity of a flow across agent restarts (the kernel's map key, as text)."""

    family: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int

    @classmethod
    def of_flow(cls, flow: Flow) -> "FlowKey":
        return cls(str(flow.family), flow.local.ip, flow.local.port, flow.remote.ip, flow.remote.port)

    @classmethod
    def of_counters(cls, counters: FlowCounters) -> "FlowKey":
        return cls(counters.family, counters.local_ip, counters.local_port, counters.remote_ip, counters.remote_port)


# (namespace, pod): a pod's identity in per-pod counts.
PodKey = tuple[str, str]


@dataclass(frozen=True)
class Baseline:
    """Counts an earlier agent on this node already reported; zero when there was none."""

    retransmits: int = 0
    synack_retransmits: int = 0
    lost_events: int = 0
    pod_counts_overflow: int = 0
    missed_events: Optional[int] = None
    failed_attempts: Optional[int] = None
    flows: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
    by_cause: Mapping[str, int] = field(default_factory=dict)
    top_flows: Mapping[FlowKey, Flow] = field(default_factory=dict)
    recent_events: Sequence[RecentEvent] = ()
    top_pods: Mapping[PodKey, int] = field(default_factory=dict)
    by_remote: Mapping[str, int] = field(default_factory=dict)
    drops: DropBaseline = field(default_factory=DropBaseline)   # drop fields: drops.drop_fields
    out_segs: Optional[int] = None       # the node's Tcp OutSegs during the trace; None: unknown
    retrans_segs: Optional[int] = None
    pod_segments: Mapping[PodKey, TcpSegments] = field(default_factory=dict)   # the report's pods' that had them

    @classmethod
    def from_entry(cls, entry: Optional[NodeStatus]) -> "Baseline":
        if entry is None:
            return cls()
        return cls(
            retransmits=entry.retransmits,
            synack_retransmits=entry.synack_retransmits,
            lost_events=entry.lost_events,
            pod_counts_overflow=entry.pod_counts_overflow,
            missed_events=entry.missed_events,
            failed_attempts=entry.failed_attempts,
            flows=entry.flows,
            by_state=dict(entry.by_state),
            by_cause=dict(entry.by_cause),
            top_flows={FlowKey.of_flow(f): f for f in entry.top_flows},
            recent_events=tuple(entry.recent_events),
            top_pods={(p.namespace, p.pod): p.retransmits for p in entry.top_pods},
            by_remote={r.ip: r.retransmits for r in entry.by_remote},
            drops=DropBaseline.from_entry(entry),
            out_segs=entry.out_segs,
            retrans_segs=entry.retrans_segs,
            pod_segments={(p.namespace, p.pod): TcpSegments(p.out_segs, p.retrans_segs) for p in entry.top_pods
                          if p.out_segs is not None and p.retrans_segs is not None},
        )

    @property
    def empty(self) -> bool:
        return (
            self.retransmits == 0 and self.synack_retransmits == 0 and self.lost_events == 0
            and self.pod_counts_overflow == 0
            and not self.missed_events and not self.failed_attempts
            and not self.top_flows and not self.recent_events and self.flows == 0
            and not self.top_pods and not self.by_remote and self.drops.empty
        )


class StoredReport(enum.Enum):
    """Whose the stored report of this agent's name is."""

    MISSING = "missing"   # none (never made, deleted by someone, or garbage-collected)
    OURS = "ours"         # owned by this agent's trace: its counts are this node's so far
    FOREIGN = "foreign"   # owned by another trace of the same name (deleted and re-created)


def owner_uid(report: Mapping[str, Any]) -> Optional[str]:
    """The uid of the report's controlling owner (its trace), from the full object or its
    metadata alone; None when it has none."""
    owners = ((report.get("metadata") or {}).get("ownerReferences")) or []
    return next((o.get("uid") for o in owners if o.get("controller")), None)


def stored_report(report: Optional[Mapping[str, Any]], trace_uid: str) -> StoredReport:
    """Whether `report` (full, or metadata only; None: not found) belongs to the trace whose
    uid is `trace_uid`. A trace deleted and re-created under its name has a new uid, and the
    garbage collector may not have removed the old trace's reports yet."""
    if report is None:
        return StoredReport.MISSING
    return StoredReport.OURS if owner_uid(report) == trace_uid else StoredReport.FOREIGN


def read_entry(report: Optional[Mapping[str, Any]], node: str, trace_uid: str) -> Optional[NodeStatus]:
    """This node's entry in its report object (JSON dict), or None (no report, another trace's
    report: a re-created trace starts from zero, or unreadable)."""
    raw = (report or {}).get("spec")
    if not raw or raw.get("node") != node or stored_report(report, trace_uid) is not StoredReport.OURS:
        return None
    try:
        return NodeStatus.model_validate(raw)
    except ValueError as exc:
        log.warning("ignoring unreadable report of node %s: %s", node, exc)
        return None


def _max_time(a: Optional[datetime], b: Optional[datetime]) -> Optional[datetime]:
    return b if a is None else a if b is None else max(a, b)


def _min_time(a: Optional[datetime], b: Optional[datetime]) -> Optional[datetime]:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class CumulativeFlow:
    """One flow since the trace began on this node: what earlier agents reported of it (`old`)
    plus this agent's kernel counters (`fresh`), at least one of the two. Cheap to rank; it
    becomes an API Flow only when it makes the top N (the kernel map may hold 32k flows)."""

    key: FlowKey
    old: Optional[Flow] = None
    fresh: Optional[FlowCounters] = None

    @property
    def retransmits(self) -> int:
        return (self.old.retransmits if self.old else 0) + (self.fresh.retransmits if self.fresh else 0)

    @property
    def synack_retransmits(self) -> int:
        return (self.old.synack_retransmits if self.old else 0) + (self.fresh.synack_retransmits if self.fresh else 0)

    def rank(self) -> tuple:
        """retransmit_core.ranking's key of the flow `to_flow()` gives (flow_key of it)."""
        last_seen = _max_time(self.old.last_seen if self.old else None, self.fresh.last_seen if self.fresh else None)
        k = self.key
        return busiest_first_key(self.retransmits + self.synack_retransmits, last_seen,
                                 k.family, k.local_ip, k.local_port, k.remote_ip, k.remote_port)

    def to_flow(self) -> Flow:
        """The API flow with the cumulative counts: first seen by the earliest agent, last by the
        latest; the kernel's latest state, causes and socket where it has them."""
        old, fresh = self.old, self.fresh.to_flow() if self.fresh else None
        if fresh is None or old is None:
            return fresh or old
        # The connection's counters (and the ratio of the two) come whole from the latest read.
        counters = fresh if fresh.data_segs_out is not None else old
        return fresh.model_copy(update={
            "data_segs_out": counters.data_segs_out,
            "total_retrans": counters.total_retrans,
            "retrans_ratio": counters.retrans_ratio,
            "retransmits": self.retransmits,
            "synack_retransmits": self.synack_retransmits,
            "first_seen": _min_time(old.first_seen, fresh.first_seen),
            "last_seen": _max_time(old.last_seen, fresh.last_seen),
            "last_state": fresh.last_state or old.last_state,
            "by_cause": add_counts(old.by_cause, fresh.by_cause),
            "socket": fresh.socket or old.socket,
        })


def merge_flows(baseline: Baseline, fresh: Iterable[FlowCounters]) -> list[CumulativeFlow]:
    """Every flow with its cumulative counts, busiest first (the one sort of the node's flows):
    this agent's kernel flows plus earlier agents' top flows.

    A flow reported before a restart and seen again adds up; baseline flows the kernel has
    not seen (yet) keep their old counts, so they stay in the running for the top N.
    """
    merged = {key: CumulativeFlow(key, old=flow) for key, flow in baseline.top_flows.items()}
    for counters in fresh:
        key = FlowKey.of_counters(counters)
        merged[key] = CumulativeFlow(key, old=baseline.top_flows.get(key), fresh=counters)
    return sorted(merged.values(), key=CumulativeFlow.rank)


def cumulative_entry(baseline: Baseline, fresh: NodeStatus, merged_flows: Sequence[CumulativeFlow], top_n: int,
                     keep: int) -> NodeStatus:
    """The entry to write: this agent's counts `fresh` plus what earlier agents reported.

    Totals, byState, byCause, lostEvents, podCountsOverflow, missedEvents, failedAttempts, outSegs and retransSegs
    add (the last four stay unknown only when neither knows); `flows` never shrinks; top flows: the first top_n (0 = all)
    of `merged_flows` (merge_flows: ranked already); recent events: this agent's first, then older ones.
    """
    events = (list(fresh.recent_events) + list(baseline.recent_events))[:keep] if keep > 0 else []
    top = merged_flows[:top_n] if top_n > 0 else merged_flows
    out_segs = add_known(baseline.out_segs, fresh.out_segs)
    retrans_segs = add_known(baseline.retrans_segs, fresh.retrans_segs)
    return fresh.model_copy(update={
        "out_segs": out_segs,
        "retrans_segs": retrans_segs,
        "retrans_ratio": retransmit_ratio(retrans_segs, out_segs),   # model_copy runs no validator
        "retransmits": baseline.retransmits + fresh.retransmits,
        "synack_retransmits": baseline.synack_retransmits + fresh.synack_retransmits,
        "lost_events": baseline.lost_events + fresh.lost_events,
        "pod_counts_overflow": baseline.pod_counts_overflow + fresh.pod_counts_overflow,
        "missed_events": add_known(baseline.missed_events, fresh.missed_events),
        "failed_attempts": add_known(baseline.failed_attempts, fresh.failed_attempts),
        "flows": max(baseline.flows, len(merged_flows), fresh.flows),
        "by_state": add_counts(baseline.by_state, fresh.by_state),
        "by_cause": add_counts(baseline.by_cause, fresh.by_cause),
        "top_flows": [flow.to_flow() for flow in top],
        "recent_events": events,
    })


def totals_by(flows: Iterable[FlowCounters], key_of: Callable[[FlowCounters], Optional[Any]]) -> dict[Any, int]:
    """Retransmits (skb + SYN-ACK) by key over `flows` (the kernel map's FlowCounters);
    flows whose key is None are skipped."""
    totals: dict[Any, int] = {}
    for flow in flows:
        count = flow.retransmits + flow.synack_retransmits
        if count and (key := key_of(flow)) is not None:
            totals[key] = totals.get(key, 0) + count
    return totals


def remote_totals(flows: Iterable[FlowCounters]) -> dict[str, int]:
    """Retransmits by remote address (canonical text, as the kernel's flows carry it)."""
    return totals_by(flows, lambda flow: flow.remote_ip)


def cumulative_counts(base: Mapping[Any, int], fresh: Mapping[Any, int], previous: Mapping[Any, int]) -> dict[Any, int]:
    """Per-key counts to report: max(what this agent reported before, base + fresh).

    A restarted agent's kernel map starts empty, so base (the report read back) + fresh is the
    key's count since the trace began. The max with `previous` (this agent's last result)
    keeps a count from going down when the kernel's LRU map evicts a flow (so a remote's count
    from the flows may stall: per-pod counts come from PodTotals instead, which is exact).
    """
    counts = dict(previous)
    for key in set(base) | set(fresh):
        counts[key] = max(counts.get(key, 0), base.get(key, 0) + fresh.get(key, 0))
    return counts


@dataclass(frozen=True)
class PodTotals:
    """Each local pod's retransmits since the trace began on this node, carried from one
    report step to the next: what earlier agents reported (the baseline) plus what this
    agent's kernel counted per local address since it started."""

    pods: Mapping[PodKey, int] = field(default_factory=dict)
    # Each local address's kernel count (KernelSnapshot.by_local_address) already given to a
    # pod or set aside as no pod's: the next step attributes only what came since.
    attributed: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def resumed(cls, baseline: "Baseline") -> "PodTotals":
        """Where a new agent starts: every pod the node's report held, nothing read yet (its
        kernel program, and so its per-address counts, start at zero)."""
        return cls(pods=dict(baseline.top_pods))

    def attribute(self, by_address: Mapping[str, int],
                  owner_of: Callable[[str], Optional[Owner]]) -> "PodTotals":
        """Add each address's retransmits since the last step to the pod owning it NOW.

        Deltas, not totals, so a reused address (a pod deleted, its IP given to a new pod)
        moves no history: what the old pod sent from it stays the old pod's, only what
        came since goes to the new one. The node's own addresses (hostNetwork pods) are no
        pod's: their counts are set aside. An address the pod index does not know yet (a
        pod just started, its watch event not in) is left unread until it does, so a new
        pod's first retransmits are not lost. A count below the last step's (a pending run
        moved into the map while the kernel was read: it shows at the next read) attributes
        nothing until it passes it, so nothing counts twice.
        """
        pods = dict(self.pods)
        attributed = dict(self.attributed)
        for address, count in by_address.items():
            delta = count - attributed.get(address, 0)
            if delta <= 0:
                continue
            owner = owner_of(address)
            if owner is None:
                continue
            attributed[address] = count
            if owner.pod and owner.namespace:
                key = (owner.namespace, owner.pod)
                pods[key] = pods.get(key, 0) + delta
        return PodTotals(pods, attributed)


def cumulative_remotes(baseline: Baseline, fresh: Mapping[str, int], previous: Mapping[str, int]) -> dict[str, int]:
    return cumulative_counts(baseline.by_remote, fresh, previous)


def ranked_remotes(counts: Mapping[str, int], limit: int = MAX_REMOTES) -> list[RemoteCount]:
    """The busiest remote addresses (ties by address), at most `limit`."""
    ordered = sorted(((ip, n) for ip, n in counts.items() if n > 0), key=lambda item: (-item[1], item[0]))
    return [RemoteCount(ip=ip, retransmits=n) for ip, n in ordered[:limit]]


def cumulative_pod_segments(baseline: Baseline, fresh: Mapping[PodKey, TcpSegments]) -> dict[PodKey, TcpSegments]:
    """Each pod's segments since the trace began: what earlier agents reported of it plus what
    this one counted (PodSegmentReader.read, since its start), as the node's outSegs resume.
    Segments sent while no agent ran are in neither; a pod only in the baseline keeps its."""
    return {key: baseline.pod_segments.get(key, TcpSegments(0, 0)).plus(fresh[key]) if key in fresh
            else baseline.pod_segments[key] for key in set(baseline.pod_segments) | set(fresh)}


def ranked_pods(counts: Mapping[PodKey, int], node: str,
                segments: Mapping[PodKey, TcpSegments] = {}) -> list[PodCount]:
    """Every pod with a count, busiest first (ties by namespace, name), on `node`, each with its
    segment counters where `segments` has them; at most MAX_NODE_PODS (api.py: why)."""
    ordered = sorted(((key, n) for key, n in counts.items() if n > 0), key=lambda item: pod_key(item[1], *item[0]))
    ordered = ordered[:MAX_NODE_PODS]
    return [PodCount(namespace=ns, pod=pod, node=node, retransmits=n,
                     out_segs=segments[(ns, pod)].out_segs if (ns, pod) in segments else None,
                     retrans_segs=segments[(ns, pod)].retrans_segs if (ns, pod) in segments else None)
            for (ns, pod), n in ordered]


