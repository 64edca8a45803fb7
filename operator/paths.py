"""Where a trace's retransmits went: the node-pair and zone-pair matrix, and the pair that
stands out. Pure, given a `Places` built from the operator's watches.

Each node's report lists its retransmits by remote address (byRemote: the busiest addresses
over every flow its agent knows). The sending node is the report's; the receiving node of an
address is:
- a pod's address (hostNetwork or not) -> the node the pod runs on, from the pod watch;
- a node's own address -> that node; a loopback address -> the sending node itself;
- an address inside a node's spec.podCIDRs -> that node (the pod may be gone by now);
- a Service address -> the node of the backend kube-proxy translated it to, for the
  retransmits of the report's flows (topFlows) whose backend the agent read from its node's
  conntrack (agent/conntrack.py); the rest of the address's retransmits -> "unknown";
- anything else -> "outside" the cluster.
Zones are the nodes' topology.kubernetes.io/zone label. Retransmits beyond the reports'
byRemote lists are in no pair, so the pairs' percentages (of all the trace's retransmits)
may add up to less than 100.

A pair's ratio is that of the connections its source nodes' reports list with socket
counters (topFlows: data_segs_out and total_retrans over each connection's life), summed by
the pair their remote ends fall in. Those are connections that retransmitted, so it says how
lossy the path is for the connections that lost anything, not the share of the path's whole
traffic: no node counts segments per remote node.

A pair stands out when it holds at least HOT_SHARE of all the trace's retransmits (and at
least HOT_MINIMUM of them): `hot_path` names the node pair (with the zones when known), or,
when no node pair stands out but a zone pair does, the zone pair. Otherwise it is None:
the loss is spread out, and saying nothing is the answer.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Protocol

from retransmit_core.api import MAX_PATHS, Flow, NodeStatus, PathCount
from retransmit_core.podindex import canonical_ip

from .placement import NodeFacts
from .remotenames import ServiceIndex

ZONE_LABEL = "topology.kubernetes.io/zone"
OUTSIDE, UNKNOWN = "outside", "unknown"
LOOPBACK = "loopback"   # in Places' memory only: the sending node itself
HOT_SHARE = 0.5
HOT_MINIMUM = 10
PLACES_TTL = 60.0   # seconds after which an address's node is worked out again
REFRESH_PER_PASS = 5000   # addresses worked out again per sync pass at most (about 0.1 s)


class NodeOfPod(Protocol):
    """What Places needs of the pod index (core PodIndex.node_of)."""

    def node_of(self, ip: str) -> Optional[str]: ...


@dataclass
class Places:
    """Address -> receiving node, from the operator's live indexes (which the watches update
    in place). Kept across sync passes: an address's node is worked out once and remembered,
    and so is each report's list of (receiving node, retransmits); 5,000 reports list up to
    320,000 addresses, and working them all out again took seconds.

    Pod addresses come from their node's podCIDR, so a remembered place rarely goes wrong.
    It is worked out again once PLACES_TTL seconds old, but at most REFRESH_PER_PASS
    addresses per sync pass (the oldest reports first as the passes meet them): refreshing
    everything at once, as this did before, stalled the operator's event loop for about 20 s
    every minute at 5 traces x 5,000 nodes and made the lag from a node's write to its
    trace's summary 20 s at p99. A report that changed is always worked out at once (its
    addresses from memory while fresh). At that scale a place is thus at most a few minutes
    old; in small clusters PLACES_TTL."""

    pods: Optional[NodeOfPod]
    nodes: Mapping[str, NodeFacts]
    node_addresses: Mapping[str, str]
    services: ServiceIndex
    # address as reported -> (node, outside, unknown or LOOPBACK; when worked out)
    _known: dict[str, tuple[str, float]] = field(default_factory=dict)
    # id(report) -> (the report, what it sent where, when worked out, when last asked for)
    _by_report: dict[int, tuple[NodeStatus, "Sent", float, float]] = field(default_factory=dict)
    _cidrs: Optional[dict[int, dict[Any, str]]] = None   # prefix length -> network -> node
    _swept: float = 0.0
    _now: float = 0.0
    _refresh_left: int = 0

    def begin_pass(self, now: float) -> None:
        """A new sync pass at `now` (monotonic): a fresh refresh budget; once per PLACES_TTL,
        forget the reports no pass asked for since the last sweep and the addresses not
        worked out for two TTLs (gone nodes and peers), so memory follows the cluster."""
        self._now, self._refresh_left = now, REFRESH_PER_PASS
        if now - self._swept >= PLACES_TTL:
            self._by_report = {k: v for k, v in self._by_report.items() if v[3] >= self._swept}
            self._known = {k: v for k, v in self._known.items() if now - v[1] < 2 * PLACES_TTL}
            self._cidrs, self._swept = None, now   # the nodes' podCIDRs: few, read again

    def node_of(self, ip: str, sender: str) -> str:
        known = self._known.get(ip)
        if known is None or self._now - known[1] >= PLACES_TTL:
            known = self._known[ip] = (self._receiver(ip), self._now)
        return sender if known[0] is LOOPBACK else known[0]

    def sent_to(self, report: NodeStatus) -> "Sent":
        """The report's retransmits (its byRemote) and its flows' socket counters, by
        receiving node."""
        known = self._by_report.get(id(report))
        if known is not None and known[0] is report:
            fresh = self._now - known[2] < PLACES_TTL
            if fresh or self._refresh_left <= 0:
                self._by_report[id(report)] = (*known[:3], self._now)
                return known[1]
            self._refresh_left -= len(report.by_remote) + len(report.top_flows)
        by_place: Counter[str] = Counter()
        unknown: dict[str, int] = {}   # a Service address -> its retransmits not yet placed
        for remote in report.by_remote:
            place = self.node_of(remote.ip, report.node)
            by_place[place] += remote.retransmits
            if place == UNKNOWN:
                unknown[remote.ip] = unknown.get(remote.ip, 0) + remote.retransmits
        segments: dict[str, Segments] = {}
        for flow in report.top_flows:
            place = self._flow_place(flow, report.node)
            if place != UNKNOWN and flow.remote.ip in unknown:
                # byRemote counts every flow to the address, the flow's own counts are part of it.
                moved = min(unknown[flow.remote.ip], flow.retransmits + flow.synack_retransmits)
                unknown[flow.remote.ip] -= moved
                by_place[UNKNOWN] -= moved
                by_place[place] += moved
            if flow.data_segs_out is not None and flow.total_retrans is not None:
                segments[place] = segments.get(place, NO_SEGMENTS) + Segments(flow.total_retrans, flow.data_segs_out)
        sent = Sent(tuple(by_place.items()), tuple(segments.items()))
        # The report is kept with it: its id stays its own while the entry lives.
        self._by_report[id(report)] = (report, sent, self._now, self._now)
        return sent

    def _flow_place(self, flow: Flow, sender: str) -> str:
        """A flow's receiving node: its remote address's, or for a Service address its
        backend's when the agent found it (a backend outside the cluster: outside)."""
        place = self.node_of(flow.remote.ip, sender)
        if place == UNKNOWN and flow.remote.backend is not None:
            return self.node_of(flow.remote.backend.ip, sender)
        return place

    def _receiver(self, ip: str) -> str:
        key = canonical_ip(ip)
        if key is None:
            return UNKNOWN
        if ipaddress.ip_address(key).is_loopback:
            return LOOPBACK
        node = (self.pods.node_of(key) if self.pods is not None else None) or self.node_addresses.get(key)
        if node:
            return node
        if self.services.at(key) is not None:
            return UNKNOWN
        return self._in_pod_cidr(key) or OUTSIDE

    def _in_pod_cidr(self, key: str) -> Optional[str]:
        """The node whose spec.podCIDRs hold the address: one dict lookup per prefix length
        in use (clusters use one or two), not one test per node."""
        if self._cidrs is None:
            self._cidrs = {}
            for facts in self.nodes.values():
                for cidr in facts.pod_cidrs:
                    try:
                        network = ipaddress.ip_network(cidr, strict=False)
                    except ValueError:
                        continue
                    self._cidrs.setdefault(network.prefixlen, {})[network] = facts.name
        address = ipaddress.ip_address(key)
        for prefix, networks in self._cidrs.items():
            if prefix <= address.max_prefixlen:
                node = networks.get(ipaddress.ip_network(f"{key}/{prefix}", strict=False))
                if node:
                    return node
        return None

    def zone_of(self, place: str) -> Optional[str]:
        facts = self.nodes.get(place)
        if facts is None:
            return place if place in (OUTSIDE, UNKNOWN) else None
        return facts.labels.get(ZONE_LABEL)


@dataclass(frozen=True)
class Segments:
    """Segments retransmitted and sent over connections' lives (tcp_sock total_retrans and
    data_segs_out), summed."""

    retransmitted: int
    sent: int

    def __add__(self, other: "Segments") -> "Segments":
        return Segments(self.retransmitted + other.retransmitted, self.sent + other.sent)


NO_SEGMENTS = Segments(0, 0)


@dataclass(frozen=True)
class Sent:
    """One report's view of where it sent: retransmits by receiving node, and the socket
    counters of its listed flows by receiving node."""

    retransmits: tuple[tuple[str, int], ...]
    segments: tuple[tuple[str, Segments], ...]


@dataclass(frozen=True)
class PathMatrix:
    by_node_pair: list[PathCount]
    by_zone_pair: list[PathCount]
    hot_path: Optional[str]


def path_matrix(nodes: Iterable[NodeStatus], places: Places, total: int, limit: int = MAX_PATHS) -> PathMatrix:
    """The busiest node pairs and zone pairs (at most `limit` each) and the one that stands
    out; `total` is all the trace's retransmits (the percentages' whole)."""
    by_node: Counter[tuple[str, str]] = Counter()
    node_segments: dict[tuple[str, str], Segments] = {}
    for node in nodes:
        sent = places.sent_to(node)
        for place, n in sent.retransmits:
            by_node[(node.node, place)] += n
        for place, counted in sent.segments:
            pair = (node.node, place)
            node_segments[pair] = node_segments.get(pair, NO_SEGMENTS) + counted
    zones: dict[str, Optional[str]] = {}
    for pair in by_node:
        for place in pair:
            if place not in zones:
                zones[place] = places.zone_of(place)
    by_zone: Counter[tuple[str, str]] = Counter()
    zone_segments: dict[tuple[str, str], Segments] = {}
    if any(zone not in (None, OUTSIDE, UNKNOWN) for zone in zones.values()):
        def zone_pair(a: str, b: str) -> tuple[str, str]:
            return zones[a] or UNKNOWN, zones[b] or UNKNOWN
        for (a, b), n in by_node.items():
            by_zone[zone_pair(a, b)] += n
        for (a, b), counted in node_segments.items():
            if (a, b) in by_node:   # a pair whose flows are listed but not among the busiest remotes has no row
                pair = zone_pair(a, b)
                zone_segments[pair] = zone_segments.get(pair, NO_SEGMENTS) + counted
    node_pairs = _ranked(by_node, node_segments, total, limit)
    zone_pairs = _ranked(by_zone, zone_segments, total, limit)
    return PathMatrix(node_pairs, zone_pairs, hot_path(node_pairs, zone_pairs, zones, total))


def _ranked(counts: Counter[tuple[str, str]], segments: Mapping[tuple[str, str], Segments], total: int,
            limit: int) -> list[PathCount]:
    ordered = sorted(((pair, n) for pair, n in counts.items() if n > 0), key=lambda item: (-item[1], item[0]))[:limit]
    rows = []
    for (a, b), n in ordered:
        counted = segments.get((a, b))
        rows.append(PathCount(source=a, destination=b, retransmits=n, percent=min(100, n * 100 // total) if total else 0,
                              data_segs_out=counted.sent if counted else None,
                              total_retrans=counted.retransmitted if counted else None))
    return rows


def _stands_out(pair: PathCount, total: int) -> bool:
    return total > 0 and pair.retransmits >= HOT_MINIMUM and pair.retransmits >= HOT_SHARE * total


def hot_path(node_pairs: list[PathCount], zone_pairs: list[PathCount], zones: Mapping[str, Optional[str]],
             total: int) -> Optional[str]:
    """One sentence naming the pair that holds most of the retransmits, or None."""
    if node_pairs and _stands_out(node_pairs[0], total):
        top = node_pairs[0]
        return f"{top.percent}% of retransmits went {_node_path(top.source, top.destination, zones)}"
    if zone_pairs and _stands_out(zone_pairs[0], total):
        top = zone_pairs[0]
        where = f"within zone {top.source}" if top.source == top.destination else \
            f"from zone {top.source} to {_zone_place(top.destination)}"
        return f"{top.percent}% of retransmits went {where}"
    return None


def _node_path(source: str, destination: str, zones: Mapping[str, Optional[str]]) -> str:
    def named(node: str) -> str:
        zone = zones.get(node)
        return f"node {node}" + (f" (zone {zone})" if zone and zone not in (OUTSIDE, UNKNOWN) else "")
    if destination == source:
        return f"between pods and processes of {named(source)}"
    if destination == OUTSIDE:
        return f"from {named(source)} to addresses outside the cluster"
    if destination == UNKNOWN:
        return f"from {named(source)} to Service or unknown addresses"
    return f"from {named(source)} to {named(destination)}"


def _zone_place(zone: str) -> str:
    if zone == OUTSIDE:
        return "addresses outside the cluster"
    if zone == UNKNOWN:
        return "Service or unknown addresses"
    return f"zone {zone}"
