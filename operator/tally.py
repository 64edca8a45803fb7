"""A trace's sums over its nodes' reports, kept current one report at a time.

At 5,000 nodes, re-adding every report's counters and pods and re-keying its flows on each
sync pass cost about half a second of the operator's CPU per trace (profiled); five such
traces queued behind each other and their summaries lagged the nodes' writes by 17 s at p99
(bench/results/five_traces.json at the time). The report index applies each watch event here
instead: the node's previous report is taken out and its new one put in, so a pass reads
totals that are ready and ranks flow keys computed once per report.

`TraceTally.of(nodes)` builds the same from a list of reports: aggregate.py's pure functions
use it too, so each sum has one definition.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterable, Optional

from retransmit_core.api import MAX_DROP_ROWS, Flow, FlowTuple, NodeDropCount, NodeStatus, PodCount, add_counts, flow_tuple
from retransmit_core.ranking import flow_key, pod_key

PodName = tuple[str, str]   # (namespace, pod)
# A flow's remote end as its agent wrote it: ip, port, and the pod, namespace, Service and node
# the agent named (what the operator's naming of remote ends starts from).
RemoteEnd = tuple[str, int, Optional[str], Optional[str], Optional[str], Optional[str]]


def remote_end(flow: Flow) -> RemoteEnd:
    r = flow.remote
    return (r.ip, r.port, r.pod, r.namespace, r.service, r.node)


def reversed_tuple(flow: Flow) -> FlowTuple:
    """The tuple the other end's node sees the flow as (a receiver's droppedFlows entry)."""
    return (str(flow.family), flow.remote.ip, flow.remote.port, flow.local.ip, flow.local.port)


@dataclass
class _PodTotal:
    """One pod's retransmits over the reports that list it, and the node each report names for it."""

    retransmits: int = 0
    listings: int = 0
    nodes: dict[str, str] = field(default_factory=dict)   # reporting node -> the pod's node as it says
    # [sum, listings that know] of the pod's own segment counters, as _known's for the nodes:
    # None for a pod no listing has them for (hostNetwork pods are in no topPods at all).
    out_segs: list[int] = field(default_factory=lambda: [0, 0])
    retrans_segs: list[int] = field(default_factory=lambda: [0, 0])

    def node(self) -> Optional[str]:
        # A pod name reused on another node keeps the node of the first report by node name.
        return self.nodes[min(self.nodes)] if self.nodes else None


@dataclass(frozen=True)
class Tally:
    """A trace's sums at one moment: what the summary needs besides times and node counts."""

    retransmits: int
    synack_retransmits: int
    lost_events: int
    missed_events: Optional[int]     # None when no node's kernel can tell
    failed_attempts: Optional[int]
    out_segs: Optional[int]          # None when no node could read its segment counters
    retrans_segs: Optional[int]
    by_cause: dict[str, int]
    by_state: dict[str, int]
    top_pods: list[PodCount]         # busiest first, top_n
    top_flows: list[tuple[str, Flow]]  # (node, flow) busiest first, top_n; peerDrops set, not attributed yet
    top_drops: list[NodeDropCount]   # (node, reason) busiest first
    counting_drops: frozenset[str]   # nodes whose kernels count drops (their reports have `drops`)
    remote_ends: dict[RemoteEnd, int]  # every node's top flows' retransmits (skb and SYN-ACK) by remote end


class TraceTally:
    """The sums of one trace's reports, one report per node. Not thread-safe: the report
    index holds its lock around every call."""

    def __init__(self) -> None:
        self._entries: dict[str, NodeStatus] = {}
        self._flows: dict[str, tuple[tuple[tuple, str, Flow], ...]] = {}   # node -> (rank key, node, flow)
        self._flow_keys: dict[str, dict[FlowTuple, tuple]] = {}   # node -> its flows' rank keys
        # top_flows' last answer: (top_n, its (rank key, node, flow)s); and the nodes changed since.
        self._flows_ranked: Optional[tuple[int, list[tuple[tuple, str, Flow]]]] = None
        self._flows_changed: set[str] = set()
        self._sums = {"retransmits": 0, "synack_retransmits": 0, "lost_events": 0}
        # field -> [sum, reports that know]
        self._known = {name: [0, 0] for name in ("missed_events", "failed_attempts", "out_segs", "retrans_segs")}
        self._by_cause: dict[str, int] = {}
        self._by_state: dict[str, int] = {}
        self._pods: dict[PodName, _PodTotal] = {}
        # top_pods' last answer: (top_n, {pod: retransmits then}); and the pods changed since.
        self._pods_ranked: Optional[tuple[int, dict[PodName, int]]] = None
        self._pods_changed: set[PodName] = set()
        self._inbound_drops: dict[FlowTuple, dict[str, int]] = {}   # a dropped flow, from the dropping end -> by reason
        self._node_drops: dict[tuple[str, str], int] = {}           # (node, reason) -> drops
        self._counting_drops: set[str] = set()
        # Kept per report, so Services are ranked from the distinct remote ends (each named once
        # per pass), not from 50,000 flows at 5,000 nodes (a third of a second per pass, profiled).
        self._remote_ends: dict[RemoteEnd, int] = {}

    @classmethod
    def of(cls, nodes: Iterable[NodeStatus]) -> "TraceTally":
        tally = cls()
        for node in nodes:
            tally.put(node)
        return tally

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: NodeStatus) -> None:
        """The node's report is now `entry` (replacing its previous one, if any)."""
        self.drop(entry.node)
        self._entries[entry.node] = entry
        self._flows[entry.node] = tuple((flow_key(flow, entry.node), entry.node, flow) for flow in entry.top_flows)
        self._flow_keys[entry.node] = {flow_tuple(flow): key for key, _, flow in self._flows[entry.node]}
        self._flows_changed.add(entry.node)
        self._add(entry, +1)

    def drop(self, node: str) -> None:
        """The node's report is gone."""
        old = self._entries.pop(node, None)
        if old is not None:
            del self._flows[node]
            del self._flow_keys[node]
            self._flows_changed.add(node)
            self._add(old, -1)

    def _add(self, entry: NodeStatus, sign: int) -> None:
        for name in self._sums:
            self._sums[name] += sign * getattr(entry, name)
        for name, known in self._known.items():
            value = getattr(entry, name)
            if value is not None:
                known[0] += sign * value
                known[1] += sign
        _add_counts(self._by_cause, entry.by_cause, sign)
        _add_counts(self._by_state, entry.by_state, sign)
        for pod in entry.top_pods:
            key = (pod.namespace, pod.pod)
            self._pods_changed.add(key)
            total = self._pods.setdefault(key, _PodTotal())
            total.retransmits += sign * pod.retransmits
            total.listings += sign
            if pod.out_segs is not None and pod.retrans_segs is not None:
                for known, value in ((total.out_segs, pod.out_segs), (total.retrans_segs, pod.retrans_segs)):
                    known[0] += sign * value
                    known[1] += sign
            if sign > 0:
                total.nodes.setdefault(entry.node, pod.node or entry.node)
            else:
                total.nodes.pop(entry.node, None)
            if total.listings <= 0:
                del self._pods[key]
        for flow in entry.top_flows:
            _add_count(self._remote_ends, remote_end(flow), sign * (flow.retransmits + flow.synack_retransmits))
        if entry.drops is not None:
            (self._counting_drops.add if sign > 0 else self._counting_drops.discard)(entry.node)
        for reason, n in (entry.drops_by_reason or {}).items():
            _add_count(self._node_drops, (entry.node, reason), sign * n)
        for dropped in entry.dropped_flows or ():
            if dropped.inbound:
                key = (str(dropped.family), dropped.local.ip, dropped.local.port, dropped.remote.ip, dropped.remote.port)
                reasons = self._inbound_drops.setdefault(key, {})
                _add_counts(reasons, dropped.by_reason, sign)
                if not reasons:
                    del self._inbound_drops[key]

    def top_flows(self, top_n: int) -> list[tuple[str, Flow]]:
        """The busiest of every node's top flows as (node, flow); top_n 0 = all. Ranked on the
        keys made once per report: 50,000 candidates at 5,000 nodes, a hundred kept at most.

        As top_pods: ranked among the last answer's flows and the flows of the nodes changed
        since, while each listed flow of a changed node is still in its report and ranks no
        lower (counts and lastSeen only grow); otherwise among all."""
        changed, self._flows_changed = self._flows_changed, set()
        if top_n <= 0:
            self._flows_ranked = None
            return self._chosen(sorted(chain.from_iterable(self._flows.values()), key=_rank))
        last = self._flows_ranked
        if last is not None and last[0] == top_n and all(
                _no_lower(self._flow_keys.get(node), flow, key) for key, node, flow in last[1] if node in changed):
            candidates: Iterable[tuple[tuple, str, Flow]] = chain(
                (item for item in last[1] if item[1] not in changed),
                chain.from_iterable(self._flows[node] for node in changed if node in self._flows))
        else:
            candidates = chain.from_iterable(self._flows.values())
        chosen = heapq.nsmallest(top_n, candidates, key=_rank)
        self._flows_ranked = (top_n, chosen)
        return self._chosen(chosen)

    def _chosen(self, chosen: list[tuple[tuple, str, Flow]]) -> list[tuple[str, Flow]]:
        return [(node, self._with_peer_drops(flow)) for _, node, flow in chosen]

    def _with_peer_drops(self, flow: Flow) -> Flow:
        """The flow with the drops of its packets on their way in at the other end's node."""
        peer = self._inbound_drops.get(reversed_tuple(flow))
        return flow.model_copy(update={"peer_drops": dict(sorted(peer.items()))}) if peer else flow

    def top_drops(self, limit: int = MAX_DROP_ROWS) -> list[NodeDropCount]:
        ranked = heapq.nsmallest(limit, self._node_drops.items(), key=lambda item: (-item[1], item[0]))
        return [NodeDropCount(node=node, reason=reason, drops=n) for (node, reason), n in ranked if n > 0]

    def top_pods(self, top_n: int) -> list[PodCount]:
        """The busiest local pods, the nodes' topPods summed (exact: each report lists every pod
        of its node, counted per local address by the kernel).

        Ranked among the last answer's pods and the pods changed since, not among all of them
        (120,000 pods at 5,000 nodes: a quarter of a second per trace and pass, profiled). That
        is the same answer while no pod of the last answer lost retransmits or left: every other
        unchanged pod ranked below all of them then and still does. Otherwise all are ranked."""
        last = self._pods_ranked
        if last is not None and last[0] == top_n and all(
                key in self._pods and self._pods[key].retransmits >= n for key, n in last[1].items()):
            candidates = [(key, self._pods[key]) for key in set(last[1]) | self._pods_changed if key in self._pods]
        else:
            candidates = list(self._pods.items())
        ranked = heapq.nsmallest(top_n, candidates, key=lambda item: pod_key(item[1].retransmits, *item[0]))
        self._pods_ranked = (top_n, {key: total.retransmits for key, total in ranked})
        self._pods_changed = set()
        return [PodCount(namespace=ns, pod=pod, node=total.node(), retransmits=total.retransmits,
                         out_segs=_known_sum(total.out_segs), retrans_segs=_known_sum(total.retrans_segs))
                for (ns, pod), total in ranked]

    def snapshot(self, top_n: int) -> Tally:
        return Tally(
            retransmits=self._sums["retransmits"],
            synack_retransmits=self._sums["synack_retransmits"],
            lost_events=self._sums["lost_events"],
            missed_events=_known_sum(self._known["missed_events"]),
            failed_attempts=_known_sum(self._known["failed_attempts"]),
            out_segs=_known_sum(self._known["out_segs"]),
            retrans_segs=_known_sum(self._known["retrans_segs"]),
            by_cause=add_counts(self._by_cause),
            by_state=add_counts(self._by_state),
            top_pods=self.top_pods(top_n),
            top_flows=self.top_flows(top_n),
            top_drops=self.top_drops(),
            counting_drops=frozenset(self._counting_drops),
            remote_ends=dict(self._remote_ends),
        )


def _add_counts(into: dict, counts: dict, sign: int) -> None:
    for key, n in counts.items():
        _add_count(into, key, sign * n)


def _add_count(into: dict, key: Any, n: int) -> None:
    """into[key] += n; a key whose count reaches 0 is removed (nothing left behind)."""
    left = into.get(key, 0) + n
    if left:
        into[key] = left
    else:
        into.pop(key, None)


def _no_lower(keys: Optional[dict[FlowTuple, tuple]], flow: Flow, key: tuple) -> bool:
    """The flow is still in its node's report (`keys`, None: the report is gone) and ranks no
    lower than at `key`."""
    now = keys.get(flow_tuple(flow)) if keys is not None else None
    return now is not None and now <= key


def _rank(candidate: tuple[tuple, str, Flow]) -> tuple:
    return candidate[0]


def _known_sum(known: list[int]) -> Optional[int]:
    """As retransmit_core.api.add_known: the sum of the known values, None when none is known."""
    return known[0] if known[1] else None
