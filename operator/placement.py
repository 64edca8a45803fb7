"""Where a trace's agents run and which Linux nodes they miss, as pure functions.

The DaemonSet's nodeSelector and tolerations (render.py) and the coverage the trace's status
reports come from the same `Placement`, so what the status says is what the scheduler does.

- nodeSelector: the trace's own, else the chart's default (agent.nodeSelector), plus
  kubernetes.io/os=linux always (the agent is a Linux program).
- tolerations: the trace's own, else the chart's default (agent.tolerations), which
  tolerates every taint: a tracing agent belongs on every node, control-plane and
  dedicated pools included, as Inspektor Gadget's and Cilium's DaemonSets do.
- The DaemonSet controller adds tolerations of its own to every DaemonSet pod (not-ready,
  unreachable, the pressure taints, unschedulable, network-unavailable for hostNetwork);
  the coverage check adds them too, so a cordoned node does not count as missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from retransmit_core.api import MAX_UNCOVERED_EXAMPLES, RetransmitTraceSpec, UncoveredNodes
from retransmit_core.naming import TRACE_LABEL

from .remotenames import node_addresses

LINUX = ("kubernetes.io/os", "linux")
# Only these effects keep a DaemonSet pod off a node (PreferNoSchedule is a preference).
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
# pkg/controller/daemon/util: tolerations the DaemonSet controller adds to every pod of a
# hostNetwork DaemonSet.
DAEMONSET_TOLERATIONS: tuple[dict[str, Any], ...] = (
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/network-unavailable", "operator": "Exists", "effect": "NoSchedule"},
)
# The chart's default for agent.tolerations: every taint.
TOLERATE_EVERYTHING: tuple[dict[str, Any], ...] = ({"operator": "Exists"},)


@dataclass(frozen=True)
class Placement:
    """The DaemonSet's nodeSelector and tolerations for one trace."""

    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]


def placement(spec: RetransmitTraceSpec, default_node_selector: Mapping[str, str],
              default_tolerations: Sequence[Mapping[str, Any]]) -> Placement:
    """The trace's own nodeSelector and tolerations, each replacing the chart's default."""
    selector = dict(spec.node_selector or default_node_selector)
    selector[LINUX[0]] = LINUX[1]
    tolerations = ([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in spec.tolerations]
                   if spec.tolerations else [dict(t) for t in default_tolerations])
    return Placement(selector, tuple(tolerations))


@dataclass(frozen=True)
class NodeFacts:
    """What coverage needs from a Node object."""

    name: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...]
    addresses: tuple[str, ...] = ()   # InternalIP and ExternalIP, canonical (remote-end naming)
    pod_cidrs: tuple[str, ...] = ()   # spec.podCIDRs: its pods' addresses, even of pods gone (paths.py)

    @classmethod
    def from_object(cls, node: Mapping[str, Any]) -> "NodeFacts":
        meta, spec = node.get("metadata") or {}, node.get("spec") or {}
        return cls(name=meta.get("name", ""), labels=dict(meta.get("labels") or {}),
                   taints=tuple(spec.get("taints") or ()),
                   addresses=tuple(node_addresses([node])),
                   pod_cidrs=tuple(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])))

    @property
    def linux(self) -> bool:
        return self.labels.get(LINUX[0]) == LINUX[1]


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """core/v1 Toleration.ToleratesTaint: effect empty or equal; Exists with no key matches
    every key; Equal needs the same key and value."""
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if toleration.get("operator", "Equal") == "Exists":
        return key == "" or key == taint.get("key")
    return key == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or "")


def blocking_taints(node: NodeFacts, tolerations: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The node's taints that keep a DaemonSet pod with `tolerations` off it."""
    every = [*tolerations, *DAEMONSET_TOLERATIONS]
    return [taint for taint in node.taints
            if taint.get("effect") in BLOCKING_EFFECTS and not any(tolerates(t, taint) for t in every)]


def selects(node: NodeFacts, selector: Mapping[str, str]) -> bool:
    return all(node.labels.get(key) == value for key, value in selector.items())


def places_agent(node: NodeFacts, where: Placement) -> bool:
    """The DaemonSet with `where` puts an agent on `node`: selected, and no blocking taint."""
    return selects(node, where.node_selector) and not blocking_taints(node, where.tolerations)


def taint_text(taint: Mapping[str, Any]) -> str:
    """'dedicated=db:NoSchedule', as kubectl taint writes it."""
    value = taint.get("value")
    return f"{taint.get('key')}{'=' + value if value else ''}:{taint.get('effect')}"


def coverage(nodes: Iterable[NodeFacts], where: Placement, agent_nodes: Optional[frozenset[str]],
             trace: str, namespace: str) -> tuple[int, list[UncoveredNodes]]:
    """(Linux nodes, the ones `trace` misses by reason).

    agent_nodes: the nodes where an agent of the trace runs (pod phase Running); None while
    the DaemonSet controller has not placed the agents for the current spec (then
    AgentNotRunning is not judged).
    """
    linux = sorted((n for n in nodes if n.linux), key=lambda n: n.name)
    missed: dict[str, list[str]] = {"NotSelected": [], "TaintNotTolerated": [], "AgentNotRunning": []}
    taints: dict[str, None] = {}
    for node in linux:
        if not selects(node, where.node_selector):
            missed["NotSelected"].append(node.name)
            continue
        blocking = blocking_taints(node, where.tolerations)
        if blocking:
            missed["TaintNotTolerated"].append(node.name)
            taints.update(dict.fromkeys(taint_text(t) for t in blocking))
        elif agent_nodes is not None and node.name not in agent_nodes:
            missed["AgentNotRunning"].append(node.name)
    details = {
        "NotSelected": "the trace's nodeSelector leaves them out: widen spec.nodeSelector (or the chart's "
                       "agent.nodeSelector) to trace them",
        "TaintNotTolerated": f"taints {', '.join(taints)} are not tolerated: add tolerations to spec.tolerations, "
                             "or leave it empty to use the chart's agent.tolerations (every taint by default)",
        "AgentNotRunning": f"no agent pod runs there: kubectl -n {namespace} get pods -l "
                           f"{TRACE_LABEL}={trace} -o wide shows why (pending, crash-looping)",
    }
    return len(linux), [UncoveredNodes(reason=reason, count=len(names), nodes=names[:MAX_UNCOVERED_EXAMPLES],
                                       detail=details[reason])
                        for reason, names in missed.items() if names]

