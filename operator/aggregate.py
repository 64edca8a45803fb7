"""The trace's status.summary and status.nodes[] rows from the nodes' reports, as pure functions.

Totals and byState are exact sums of the nodes' exact counters. Top flows come from each
node's own top flows (the only flows in the reports), so they are exact for the flows they
list: a flow that is in no node's top list cannot be in the cluster's. Top pods are the sums
of the nodes' topPods, which each agent counts by local pod over every flow it knows, so a
pod's count is the retransmits it sent. Rows are bounded (MAX_NODE_ROWS): problems first,
then the busiest nodes; every node's report keeps everything.
"""

from __future__ import annotations

import heapq
from collections import Counter
from datetime import datetime, timedelta
from typing import Iterable, Optional

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
    add_counts,
    add_known,
)
from retransmit_core.podindex import PodLookup, with_owner
from retransmit_core.ranking import flow_key, pod_key

from .remotenames import ClusterNames

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
    outside). Ranked before they are copied: at 5,000 nodes there are 50,000 candidates and
    the summary keeps a hundred at most."""
    def order(pair: tuple[NodeStatus, Flow]) -> tuple:
        node, flow = pair
        return flow_key(flow, node.node)
    candidates = [(node, flow) for node in nodes for flow in node.top_flows]
    chosen = heapq.nsmallest(top_n, candidates, key=order) if top_n > 0 else sorted(candidates, key=order)
    return [flow.model_copy(update={
        "node": node.node,
        "local": attributed_endpoint(flow.local, pods),
        "remote": names.remote(flow.remote) if names is not None else attributed_endpoint(flow.remote, pods),
    }) for node, flow in chosen]


def summary_services(nodes: Iterable[NodeStatus], names: Optional[ClusterNames], top_n: int) -> list[ServiceCount]:
    """Services as remote ends: the retransmits of every node's top flows towards each one
    (its addresses or NodePorts), busiest first. Only flows that can be a Service's are named."""
    if names is None or not len(names.services):
        return []
    counts: Counter[tuple[str, str]] = Counter()
    for node in nodes:
        for flow in node.top_flows:
            if not (flow.remote.service or names.services.may_name(flow.remote.ip, flow.remote.port)):
                continue   # the common case at 5,000 nodes: no address parsing per flow per pass
            remote = flow.remote if flow.remote.service else names.remote(flow.remote)
            if remote.service:
                counts[(remote.namespace or "", remote.service)] += flow.retransmits + flow.synack_retransmits
    ranked = sorted(counts.items(), key=lambda item: pod_key(item[1], *item[0]))[:top_n]
    return [ServiceCount(namespace=ns, service=name, retransmits=n) for (ns, name), n in ranked]


def summary_pods(nodes: list[NodeStatus], top_n: int) -> list[PodCount]:
    """The busiest pods cluster-wide: the nodes' topPods summed (exact, local side)."""
    counts: Counter[tuple[str, str]] = Counter()
    node_of: dict[tuple[str, str], Optional[str]] = {}
    for node in sorted(nodes, key=lambda n: n.node):
        for pod in node.top_pods:
            key = (pod.namespace, pod.pod)
            counts[key] += pod.retransmits
            node_of.setdefault(key, pod.node or node.node)  # a pod name reused on another node keeps its first node
    ranked = sorted(counts.items(), key=lambda item: pod_key(item[1], *item[0]))[:top_n]
    return [PodCount(namespace=ns, pod=pod, node=node_of.get((ns, pod)), retransmits=n) for (ns, pod), n in ranked]


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
                      names: Optional[ClusterNames] = None) -> Summary:
    """The summary the operator writes: sums, cluster-wide top flows and pods, node counts.

    Totals include every report, stale, failed or departed: counts are cumulative and never
    go back. Departed nodes do not count as reporting."""
    flows = cluster_flows(nodes, pod_index, top_n, names)
    reporting_nodes = sum(1 for node in nodes if node.node not in departed and reporting(node, now, stale_after))
    return Summary(
        retransmits=sum(n.retransmits for n in nodes),
        synack_retransmits=sum(n.synack_retransmits for n in nodes),
        lost_events=sum(n.lost_events for n in nodes),
        missed_events=add_known(*(n.missed_events for n in nodes)),
        failed_attempts=add_known(*(n.failed_attempts for n in nodes)),
        by_cause=add_counts(*(n.by_cause for n in nodes)),
        nodes_desired=nodes_desired,
        nodes_reporting=reporting_nodes,
        nodes=f"{reporting_nodes}/{nodes_desired}",
        top_flows=flows[:top_n],
        top_pods=summary_pods(nodes, top_n),
        top_services=summary_services(nodes, names, top_n),
        by_state=add_counts(*(n.by_state for n in nodes)),
        nodes_not_listed=nodes_not_listed,
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
            lost_events=n.lost_events, last_report_time=n.last_report_time, reporting=counts, departed=gone,
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
