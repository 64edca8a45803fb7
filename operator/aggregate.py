"""status.summary from status.nodes[]: the cluster-wide answer, as a pure function.

Totals and byState are exact sums of the nodes' exact counters. Top flows come from each
node's own top flows (the only flows in status), so they are exact for the flows they list:
a flow that is in no node's top list cannot be in the cluster's. Top pods are the sums of
the nodes' topPods, which each agent counts by local pod over every flow it knows, so a
pod's count is the retransmits it sent; for entries without topPods (agents that predate
it) the pods on either end of that node's top flows count instead, as before.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Iterable, Optional

from .api import Endpoint, Flow, NodeStatus, Phase, PodCount, Summary
from .podindex import PodLookup

# Entries whose agent counts: Running while the trace runs, Completed after its final report.
REPORTING_PHASES = frozenset({Phase.RUNNING.value, Phase.COMPLETED.value})


def _phase(node: NodeStatus) -> str:
    return node.phase.value if isinstance(node.phase, Phase) else str(node.phase)


def attribute(endpoint: Endpoint, pods: Optional[PodLookup]) -> Endpoint:
    """The endpoint with pod/namespace (or node, for host addresses) filled from the index,
    unless the agent already attributed it."""
    if pods is None or endpoint.pod or endpoint.node:
        return endpoint
    ref = pods.lookup(endpoint.ip)
    if ref is None:
        return endpoint
    if ref.host_network:
        return endpoint.model_copy(update={"node": ref.node})
    return endpoint.model_copy(update={"pod": ref.pod, "namespace": ref.namespace})


def _weight(flow: Flow) -> int:
    return flow.retransmits + flow.synack_retransmits


def _flow_order(flow: Flow) -> tuple:
    # Busiest first; ties broken by identity so the summary does not flap between writes.
    return (-_weight(flow), flow.node or "", str(flow.family), flow.local.ip, flow.local.port,
            flow.remote.ip, flow.remote.port)


def cluster_flows(nodes: Iterable[NodeStatus], pods: Optional[PodLookup]) -> list[Flow]:
    """Every node's top flows, tagged with their node and attributed on both sides."""
    flows = []
    for node in nodes:
        for flow in node.top_flows:
            flows.append(flow.model_copy(update={
                "node": node.node,
                "local": attribute(flow.local, pods),
                "remote": attribute(flow.remote, pods),
            }))
    return sorted(flows, key=_flow_order)


def top_pods(flows: Iterable[Flow], pods: Optional[PodLookup], top_n: int) -> list[PodCount]:
    """Pods on either end of the flows, by the retransmits of those flows (top_n 0 = all)."""
    counts: Counter[tuple[str, str]] = Counter()
    node_of: dict[tuple[str, str], Optional[str]] = {}
    for flow in flows:
        ends = []
        if flow.local.pod and flow.local.namespace:
            ends.append(((flow.local.namespace, flow.local.pod), flow.node))
        if flow.remote.pod and flow.remote.namespace:
            ref = pods.lookup(flow.remote.ip) if pods is not None else None
            ends.append(((flow.remote.namespace, flow.remote.pod), ref.node if ref else None))
        for key, node in dict(ends).items():  # a pod talking to itself counts once
            counts[key] += _weight(flow)
            node_of.setdefault(key, node)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if top_n > 0:
        ranked = ranked[:top_n]
    return [PodCount(namespace=ns, pod=pod, node=node_of.get((ns, pod)), retransmits=n) for (ns, pod), n in ranked]


def summary_pods(nodes: list[NodeStatus], flows: list[Flow], pods: Optional[PodLookup], top_n: int) -> list[PodCount]:
    """The busiest pods cluster-wide: the nodes' topPods summed (exact, local side), plus,
    for entries without topPods, the pods on either end of their top flows (`top_pods`)."""
    counts: Counter[tuple[str, str]] = Counter()
    node_of: dict[tuple[str, str], Optional[str]] = {}
    legacy = {node.node for node in nodes if node.top_pods is None}
    reported = [pod.model_copy(update={"node": pod.node or node.node})
                for node in sorted(nodes, key=lambda n: n.node) for pod in node.top_pods or []]
    if legacy:
        reported += top_pods([f for f in flows if f.node in legacy], pods, 0)
    for pod in reported:
        key = (pod.namespace, pod.pod)
        counts[key] += pod.retransmits
        if node_of.get(key) is None:  # a pod name reused on another node keeps its first node
            node_of[key] = pod.node
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_n]
    return [PodCount(namespace=ns, pod=pod, node=node_of.get((ns, pod)), retransmits=n) for (ns, pod), n in ranked]


def reporting(node: NodeStatus, now: Optional[datetime], stale_after: Optional[timedelta]) -> bool:
    """The node's agent counts: a Running (or Completed) entry, written recently when a bound
    is given (an agent whose node vanished leaves a Running entry behind)."""
    if _phase(node) not in REPORTING_PHASES:
        return False
    if stale_after is None or now is None or node.last_report_time is None:
        return True
    return now - node.last_report_time <= stale_after


def stale_nodes(nodes: Iterable[NodeStatus], now: Optional[datetime], stale_after: Optional[timedelta]) -> list[str]:
    """Nodes whose agent counted but has not written within the bound, by name."""
    return sorted(n.node for n in nodes if _phase(n) in REPORTING_PHASES and not reporting(n, now, stale_after))


def aggregate_summary(nodes: list[NodeStatus], nodes_desired: int, top_n: int, pod_index: Optional[PodLookup],
                      *, now: Optional[datetime] = None, stale_after: Optional[timedelta] = None) -> Summary:
    """The summary the operator writes: sums, cluster-wide top flows and pods, node counts.

    Totals include every entry, stale or failed: counts are cumulative and never go back."""
    by_state: Counter[str] = Counter()
    for node in nodes:
        by_state.update({state: count for state, count in node.by_state.items() if count})
    flows = cluster_flows(nodes, pod_index)
    reporting_nodes = sum(1 for node in nodes if reporting(node, now, stale_after))
    return Summary(
        retransmits=sum(n.retransmits for n in nodes),
        synack_retransmits=sum(n.synack_retransmits for n in nodes),
        lost_events=sum(n.lost_events for n in nodes),
        missed_events=sum(n.missed_events for n in nodes),
        nodes_desired=nodes_desired,
        nodes_reporting=reporting_nodes,
        nodes=f"{reporting_nodes}/{nodes_desired}",
        top_flows=flows[:top_n],
        top_pods=summary_pods(nodes, flows, pod_index, top_n),
        by_state=dict(sorted(by_state.items())),
    )
