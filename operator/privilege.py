"""The auto security mode: least privilege by default, privileged agents only where a node's
own agent found capabilities not enough. Pure functions; the reconciler does the I/O.

Every node first gets an agent with the capabilities security context (render.py). An agent
that may not load BPF with it (the kernel has no CAP_BPF/CAP_PERFMON, the runtime did not
grant them, or the kernel answered EPERM) says so in its report (`needsPrivileged`, the
reason in its message: agent/preflight.py). The operator then records the node, with that
reason, on the trace's DaemonSet (PRIVILEGED_NODES_ANNOTATION: it survives an operator
restart), excludes it from that DaemonSet by node-name affinity (NotIn) and runs a second,
privileged DaemonSet for the trace pinned to the recorded nodes (In). A recorded node stays
recorded while the trace runs: a privileged agent's report no longer says needsPrivileged,
and flipping back would only fail again.

Why a second DaemonSet rather than one per mode chosen at install: kernels and runtimes
differ within a cluster (node pools, RHEL 8 beside newer nodes), and a node's own attempt is
the only reliable probe (RHEL backports; runtimes that drop capabilities they do not know).
Why node-name affinity and not a node label: the operator needs no write access to Nodes.
The price: changing the exclusion changes the capabilities DaemonSet's pod template, so its
agents roll once per change (each resumes from its report, counts never go back); nodes that
need privileged usually fail at once, within the first pass or two.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional

from retransmit_core.api import MAX_PRIVILEGED_REASONS, MAX_ROW_MESSAGE, MAX_UNCOVERED_EXAMPLES, NodeStatus, PrivilegedNodes
from retransmit_core.naming import PRIVILEGED_NODES_ANNOTATION
from retransmit_core.schedule import nodes_scheduled

AUTO = "auto"
NO_REASON = "the agent could not load BPF with capabilities alone"
NODE_NAME_FIELD = "metadata.name"


def recorded_privileged_nodes(daemonset: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """node -> reason, as recorded on the trace's (capabilities) DaemonSet; {} when none (or
    the annotation is not ours: it is only ever written by render.py)."""
    text = (((daemonset or {}).get("metadata") or {}).get("annotations") or {}).get(PRIVILEGED_NODES_ANNOTATION)
    if not text:
        return {}
    try:
        by_reason = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(by_reason, dict):
        return {}
    return {node: reason for reason, nodes in by_reason.items() if isinstance(nodes, list)
            for node in nodes if isinstance(node, str)}


def privileged_nodes_annotation(nodes: Mapping[str, str]) -> str:
    """The annotation's value: {reason: [node, ...]}, sorted. Grouped by reason because few
    reasons cover many nodes (annotations are limited to 256 KiB together)."""
    by_reason: dict[str, list[str]] = {}
    for node in sorted(nodes):
        by_reason.setdefault(nodes[node], []).append(node)
    return json.dumps(dict(sorted(by_reason.items())), separators=(",", ":"))


def reason_of(entry: NodeStatus) -> str:
    """The agent's message as the reason, shortened like a status row's."""
    text = (entry.message or NO_REASON).strip()
    return text if len(text) <= MAX_ROW_MESSAGE else text[: MAX_ROW_MESSAGE - 3] + "..."


def needing_privileged(entries: Iterable[NodeStatus]) -> dict[str, str]:
    """node -> reason for each report whose agent said it needs privileged."""
    return {e.node: reason_of(e) for e in entries if e.needs_privileged}


def privileged_nodes(recorded: Mapping[str, str], entries: Iterable[NodeStatus]) -> dict[str, str]:
    """The nodes the trace's privileged agents cover: those recorded, plus any report now
    asking. A recorded node keeps its first reason and is never dropped (stable per trace)."""
    return {**needing_privileged(entries), **recorded}


def node_name_affinity(nodes: Iterable[str], operator: str) -> dict[str, Any]:
    """A pod's required node affinity on node names: `In` pins the privileged agents to
    `nodes`, `NotIn` keeps the capabilities agents off them. The DaemonSet controller places
    its pods by the template's affinity (and then pins each pod to its node itself)."""
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchFields": [{"key": NODE_NAME_FIELD, "operator": operator, "values": sorted(nodes)}]}]}}}


def privileged_summary(nodes: Mapping[str, str]) -> list[PrivilegedNodes]:
    """summary.privilegedNodes: by reason, the most common first, some names of each."""
    by_reason: dict[str, list[str]] = {}
    for node in sorted(nodes):
        by_reason.setdefault(nodes[node], []).append(node)
    ranked = sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))[:MAX_PRIVILEGED_REASONS]
    return [PrivilegedNodes(reason=reason, count=len(names), nodes=names[:MAX_UNCOVERED_EXAMPLES])
            for reason, names in ranked]


def privileged_event(namespace: str, daemonset: str, added: Mapping[str, str]) -> tuple[str, str, str]:
    """The Event when nodes join the trace's privileged agents: which and why."""
    reasons = "; ".join(f"{', '.join(sorted(n for n in added if added[n] == reason))}: {reason}"
                        for reason in sorted(set(added.values())))
    return ("Normal", "AgentsPrivileged",
            f"DaemonSet {namespace}/{daemonset} runs privileged agents on {len(added)} more node(s) whose agents "
            f"could not load BPF with capabilities alone ({reasons})")


def agents_scheduled(*daemonsets: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The trace's agents over its DaemonSets (nodesDesired): None while any present one is
    not yet placed by its controller (nodes_scheduled), or when none is present."""
    present = [ds for ds in daemonsets if ds]
    counts = [nodes_scheduled(ds) for ds in present]
    if not present or any(c is None for c in counts):
        return None
    return sum(c for c in counts if c is not None)
