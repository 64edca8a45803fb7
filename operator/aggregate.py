"""The trace's status.summary and status.nodes[] rows from the nodes' reports, as pure functions.

Totals and byState are exact sums of the nodes' exact counters. Top flows come from each
node's own top flows (the only flows in the reports), so they are exact for the flows they
list: a flow that is in no node's top list cannot be in the cluster's. Top pods are the sums
of the nodes' topPods, which each agent counts by local pod over every flow it knows, so a
pod's count is the retransmits it sent. Rows are bounded (MAX_NODE_ROWS): problems first,
then the busiest nodes; every node's report keeps everything. The sums are tally.py's,
which the report index keeps current per watch event.
"""

from __future__ import annotations

import heapq
from collections import Counter
from datetime import datetime, timedelta
from typing import Iterable, Mapping, Optional

from retransmit_core.api import (
    MAX_NODE_ROWS,
    MAX_ROW_MESSAGE,
    Endpoint,
    Flow,
    NodeRow,
    NodeStatus,
    Phase,
    PodCount,
    ServiceCount,
    Summary,
)
from retransmit_core.podindex import PodLookup, with_owner
from retransmit_core.ranking import pod_key

from .paths import UNKNOWN, Places, path_matrix
from .remotenames import ClusterNames
from .tally import RemoteEnd, Tally, TraceTally

# Entries whose agent counts: Running while the trace runs, Completed after its final report.
REPORTING_PHASES = frozenset({Phase.RUNNING.value, Phase.COMPLETED.value})


def _phase(node: NodeStatus) -> str:
    return node.phase.value if isinstance(node.phase, Phase) else str(node.phase)


def attributed_endpoint(endpoint: Endpoint, pods: Optional[PodLookup]) -> Endpoint:
    """The endpoint with pod/namespace (or node, for host addresses) filled from the index,
    unless the agent already attributed it."""
    if pods is None or endpoint.pod or endpoint.node:
        return endpoint
    return with_owner(endpoint, pods.owner(endpoint.ip))


def cluster_flows(nodes: Iterable[NodeStatus], pods: Optional[PodLookup], top_n: int = 0,
                  names: Optional[ClusterNames] = None) -> list[Flow]:
    """The busiest of every node's top flows (top_n 0 = all), tagged with their node and
    attributed on both sides (remote ends by `names` when given: pods, Services, nodes,
    outside)."""
    return attributed_flows(TraceTally.of(nodes).top_flows(top_n), pods, names)


def attributed_flows(chosen: Iterable[tuple[str, Flow]], pods: Optional[PodLookup],
                     names: Optional[ClusterNames] = None) -> list[Flow]:
    """Ranked (node, flow) pairs as the summary lists them: copied only once chosen."""
    return [flow.model_copy(update={
        "node": node,
        "local": attributed_endpoint(flow.local, pods),
        "remote": names.remote(flow.remote) if names is not None else attributed_endpoint(flow.remote, pods),
    }) for node, flow in chosen]


def summary_services(remote_ends: Mapping[RemoteEnd, int], names: Optional[ClusterNames], top_n: int) -> list[ServiceCount]:
    """Services as remote ends: the retransmits of every node's top flows towards each one
    (its addresses or NodePorts; `remote_ends` as the tally sums them), busiest first. Only
    ends that can be a Service's are named."""
    if names is None or not len(names.services):
        return []
    counts: Counter[tuple[str, str]] = Counter()
    for end, n in remote_ends.items():
        ip, port, pod, namespace, service, node = end
        if not (service or names.services.may_name(ip, port)):
            continue   # the common case: a set lookup, no address parsing
        if not service:
            named = names.remote(Endpoint(ip=ip, port=port, pod=pod, namespace=namespace, node=node))
            service, namespace = named.service, named.namespace
        if service:
            counts[(namespace or "", service)] += n
    ranked = sorted(counts.items(), key=lambda item: pod_key(item[1], *item[0]))[:top_n]
    return [ServiceCount(namespace=ns, service=name, retransmits=n) for (ns, name), n in ranked]


NOT_DROPPED = "not dropped on a traced node: lost on the wire or on an untraced box"


def loss_at(flow: Flow, counting_drops: frozenset[str], traced: frozenset[str], places: Places) -> Optional[str]:
    """Where a summary top flow's packets were lost, as far as the traced nodes tell (the
    sender's node's own drops of the flow, the receiver's inbound drops: peerDrops); None when
    a node that would know does not count drops, or the receiver is a Service address (the
    receiver's node sees the translated tuple, so its drops cannot be matched)."""
    sender = flow.node or ""
    receiver = places.node_of(flow.remote.ip, sender)
    said = [f"dropped on {where} ({_reasons(drops)})"
            for where, drops in ((sender, flow.drops), (receiver, flow.peer_drops)) if drops]
    if said:
        return "; ".join(said)
    receiver_knows = receiver in counting_drops or (receiver not in traced and receiver != UNKNOWN)
    return NOT_DROPPED if sender in counting_drops and receiver_knows else None


def _reasons(drops: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items(), key=lambda item: (-item[1], item[0])))


def summary_pods(nodes: list[NodeStatus], top_n: int) -> list[PodCount]:
    """The busiest pods cluster-wide: the nodes' topPods summed (exact, local side)."""
    return TraceTally.of(nodes).top_pods(top_n)


def reporting(node: NodeStatus, now: Optional[datetime], stale_after: Optional[timedelta]) -> bool:
    """The node's agent counts: a Running (or Completed) entry, written recently when a bound
    is given (an agent whose node vanished leaves a Running entry behind)."""
    if _phase(node) not in REPORTING_PHASES:
        return False
    if stale_after is None or now is None or node.last_report_time is None:
        return True
    return now - node.last_report_time <= stale_after


def stale_nodes(nodes: Iterable[NodeStatus], now: Optional[datetime], stale_after: Optional[timedelta],
                departed: frozenset[str] = frozenset()) -> list[str]:
    """Nodes whose agent counted but has not written within the bound, by name (nodes that
    left the trace are not expected to write)."""
    return sorted(n.node for n in nodes if _phase(n) in REPORTING_PHASES and n.node not in departed
                  and not reporting(n, now, stale_after))


def aggregate_summary(nodes: list[NodeStatus], nodes_desired: int, top_n: int, pod_index: Optional[PodLookup],
                      *, now: Optional[datetime] = None, stale_after: Optional[timedelta] = None,
                      departed: frozenset[str] = frozenset(), nodes_not_listed: int = 0,
                      names: Optional[ClusterNames] = None, tally: Optional[Tally] = None,
                      places: Optional[Places] = None) -> Summary:
    """The summary the operator writes: sums, cluster-wide top flows and pods, node counts.

    `tally` is the sums of these very reports when the caller keeps them (the report index
    does, per watch event); otherwise they are added up here. Totals include every report,
    stale, failed or departed: counts are cumulative and never go back. Departed nodes do
    not count as reporting. `places` names the nodes of the remote addresses for the path
    matrix (paths.py); without it there is none."""
    sums = tally if tally is not None else TraceTally.of(nodes).snapshot(top_n)
    matrix = path_matrix(nodes, places, sums.retransmits + sums.synack_retransmits) if places is not None else None
    flows = attributed_flows(sums.top_flows[:top_n], pod_index, names)
    if places is not None:
        traced = frozenset(n.node for n in nodes)
        flows = [f.model_copy(update={"loss_at": loss_at(f, sums.counting_drops, traced, places)}) for f in flows]
    reporting_nodes = sum(1 for node in nodes if node.node not in departed and reporting(node, now, stale_after))
    return Summary(
        retransmits=sums.retransmits,
        synack_retransmits=sums.synack_retransmits,
        lost_events=sums.lost_events,
        missed_events=sums.missed_events,
        failed_attempts=sums.failed_attempts,
        out_segs=sums.out_segs,
        retrans_segs=sums.retrans_segs,
        by_cause=sums.by_cause,
        nodes_desired=nodes_desired,
        nodes_reporting=reporting_nodes,
        nodes=f"{reporting_nodes}/{nodes_desired}",
        top_flows=flows,
        top_drops=sums.top_drops,
        top_pods=sums.top_pods[:top_n],
        top_services=summary_services(sums.remote_ends, names, top_n),
        by_state=sums.by_state,
        nodes_not_listed=nodes_not_listed,
        by_node_pair=matrix.by_node_pair if matrix else [],
        by_zone_pair=matrix.by_zone_pair if matrix else [],
        hot_path=matrix.hot_path if matrix else None,
    )


def node_rows(nodes: Iterable[NodeStatus], now: Optional[datetime], stale_after: Optional[timedelta],
              departed: frozenset[str] = frozenset(), limit: int = MAX_NODE_ROWS) -> tuple[list[NodeRow], int]:
    """The trace's status.nodes[]: one compact row per node, at most `limit` (failed, silent and
    departed nodes first, then the busiest; by name), and how many nodes were left out."""
    ranked = []
    for n in nodes:
        gone = n.node in departed
        counts = not gone and reporting(n, now, stale_after)
        failed = _phase(n) == Phase.FAILED.value
        ranked.append(((not failed, counts or gone, not gone, -(n.retransmits + n.synack_retransmits), n.node),
                       n, counts, gone))
    chosen = heapq.nsmallest(limit, ranked, key=lambda item: item[0])
    rows = []
    for _, n, counts, gone in chosen:
        message = n.message
        if message and len(message) > MAX_ROW_MESSAGE:
            message = message[: MAX_ROW_MESSAGE - 3] + "..."
        rows.append(NodeRow(
            node=n.node, phase=n.phase, retransmits=n.retransmits, synack_retransmits=n.synack_retransmits,
            lost_events=n.lost_events, retrans_ratio=n.retrans_ratio, last_report_time=n.last_report_time,
            reporting=counts, departed=gone,
            message=message,
        ))
    return rows, max(0, len(ranked) - limit)


def departed(nodes: Iterable[NodeStatus], marked: frozenset[str], agent_nodes: frozenset[str],
             now: datetime, stale_after: timedelta) -> frozenset[str]:
    """Which nodes have left the trace (the cluster, or its node selector): no agent pod of
    the trace runs there AND the report went silent past the heartbeat bound. Both, so a
    rolled agent pod (gone for a moment, its report fresh) is never marked. A node whose
    agent pod comes back is unmarked."""
    out = set()
    for n in nodes:
        if n.node in agent_nodes:
            continue
        silent = n.last_report_time is None or now - n.last_report_time > stale_after
        if n.node in marked or silent:
            out.add(n.node)
    return frozenset(out)
