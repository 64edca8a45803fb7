"""A node's entry (NodeStatus) from one kernel snapshot: the agent's pipeline step between the
kernel and the write decision. Pure: no I/O, nothing kept between calls.

`node_entry` adds the restart baseline (resume.py) to the kernel's counts, ranks the flows
once (merge_flows), attributes local and remote ends from the pod index's lookup table, and
returns with the entry the per-pod counts to carry into the next call and the per-(pod,
remote port) counts for /metrics. `retransmit-agent cluster` runs it every report period,
`retransmit-agent local` without a baseline and without attribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Mapping, Optional, Sequence

from retransmit_core.api import Endpoint, KernelCheck, NodeStatus, Phase, RecentEvent
from retransmit_core.podindex import Owner, owner_in_table, with_owner

from .drops import drop_fields
from .kernel import KernelSnapshot
from .segments import TcpSegments
from .resume import (
    Baseline,
    CumulativeFlow,
    FlowKey,
    PodKey,
    PodTotals,
    cumulative_entry,
    cumulative_pod_segments,
    cumulative_remotes,
    merge_flows,
    ranked_pods,
    ranked_remotes,
    remote_totals,
)

# (namespace, pod or node, remote port): rtrace_retransmits_total's pod_namespace, pod_name
# and remote_port before metrics.py folds ephemeral ports. Addresses that are no pod's count
# under the node, or "" when unknown.
PodPortKey = tuple[str, str, str]


@dataclass(frozen=True)
class NodeFacts:
    """What every entry of one agent says besides its counts."""

    node: str
    kernel_release: Optional[str] = None
    agent_version: Optional[str] = None
    kernel_checks: tuple[KernelCheck, ...] = ()   # `retransmit-agent check`'s lines
    problem: Optional[str] = None                 # why this node cannot trace (phase Failed); None: it can
    # The problem is privileges a privileged agent would have (preflight.PrivilegeProblem).
    needs_privileged: bool = False
    socket_owners: Optional[str] = None           # NodeStatus.socketOwners: "cgroup" or "address"


@dataclass(frozen=True)
class NodeEntry:
    """One step's output."""

    entry: NodeStatus                                  # the cumulative entry to write
    pod_totals: PodTotals                              # every local pod's count: the next step's previous_pods
    remote_counts: dict[str, int]                      # every remote address's count: the next step's previous_remotes
    # For /metrics; None: nothing to publish (no program yet, or no attribution asked for).
    by_pod_port: Optional[dict[PodPortKey, int]]


def node_entry(
    snapshot: Optional[KernelSnapshot],
    facts: NodeFacts,
    *,
    top_flows: int,
    keep_events: int,
    now: datetime,
    recent_events: Sequence[RecentEvent] = (),
    baseline: Baseline = Baseline(),
    previous_pods: Optional[PodTotals] = None,
    previous_remotes: Optional[Mapping[str, int]] = None,
    owners: Optional[Mapping[str, Owner]] = None,
    pod_segments: Mapping[PodKey, TcpSegments] = {},
    cgroup_owners: Optional[Mapping[int, Optional[Owner]]] = None,
) -> NodeEntry:
    """This node's cumulative entry at `now`.

    snapshot: the kernel's counters, None while there is no program (phase Failed with
    `facts.problem`, else Pending; the baseline's counts stay). top_flows: how many flows the
    entry keeps (0 = all). recent_events: this agent's samples, newest first; keep_events of
    them and the baseline's go in. previous_pods: the last step's pod_totals (None: the
    first step, resumed from the baseline's pods); previous_remotes: the last step's
    remote_counts. owners: the pod index's lookup_table();
    None attributes nothing (no pods, ends as the kernel saw them). pod_segments: each local
    pod's own namespace's segments since this agent began counting (PodSegmentReader.read);
    the baseline's are added, and the top pods carry them. cgroup_owners: the owner of each
    socket cgroup id the snapshot's flows and per-owner counts carry (socket_owners.py), None
    as the value for a pod the pod index does not know yet; None: address rules alone.
    """
    pods = previous_pods if previous_pods is not None else PodTotals.resumed(baseline)
    if snapshot is None:
        pending = NodeStatus(node=facts.node, phase=Phase.FAILED if facts.problem else Phase.PENDING,
                             message=facts.problem, needs_privileged=bool(facts.problem and facts.needs_privileged) or None,
                             kernel=facts.kernel_release, kernel_checks=list(facts.kernel_checks),
                             agent_version=facts.agent_version, last_report_time=now)
        entry = cumulative_entry(baseline, pending, merge_flows(baseline, []), top_flows, keep_events)
        entry = entry.model_copy(update=drop_fields(baseline.drops, None, entry.top_flows))
        remotes = cumulative_remotes(baseline, {}, previous_remotes or {})
        segments = cumulative_pod_segments(baseline, {})
        return NodeEntry(entry.model_copy(update={"top_pods": ranked_pods(pods.pods, facts.node, segments),
                                                  "by_remote": ranked_remotes(remotes)}), pods, remotes, None)

    fresh = NodeStatus(
        node=facts.node,
        phase=Phase.RUNNING,
        retransmits=snapshot.retransmits,
        synack_retransmits=snapshot.synack_retransmits,
        lost_events=snapshot.lost_events,
        pod_counts_overflow=snapshot.owners_full,
        missed_events=snapshot.missed_events,
        failed_attempts=snapshot.failed_attempts,
        by_state=snapshot.by_state,
        by_cause=snapshot.by_cause,
        flows=len(snapshot.flow_counters),
        out_segs=snapshot.tcp_segments.out_segs if snapshot.tcp_segments else None,
        retrans_segs=snapshot.tcp_segments.retrans_segs if snapshot.tcp_segments else None,
        recent_events=list(recent_events)[:keep_events],
        kernel_checks=list(facts.kernel_checks),
        kernel=facts.kernel_release,
        agent_version=facts.agent_version,
        last_report_time=now,
        socket_owners=facts.socket_owners,
    )
    merged = merge_flows(baseline, snapshot.flow_counters)
    remotes = cumulative_remotes(baseline, remote_totals(snapshot.flow_counters), previous_remotes or {})
    entry = cumulative_entry(baseline, fresh, merged, top_flows, keep_events).model_copy(
        update={"by_remote": ranked_remotes(remotes)})
    entry = entry.model_copy(update=drop_fields(baseline.drops, snapshot.drops, entry.top_flows))
    if owners is None:
        return NodeEntry(entry, pods, remotes, None)

    owner_of = _memoized_owners(owners, facts.node)
    by_cgroup = cgroup_owners or {}
    if cgroup_owners is not None:
        pods = pods.attribute(snapshot.by_local_owner or {(a, 0): n for a, n in snapshot.by_local_address.items()},
                              lambda key: socket_owner(owner_of, by_cgroup, *key, waiting=True))
    else:
        pods = pods.attribute(snapshot.by_local_address, owner_of)
    cgroups = {FlowKey.of_counters(c): c.cgroup for c in snapshot.flow_counters if c.cgroup}

    def ends(local: Endpoint, remote: Endpoint, family: str) -> dict:
        cgroup = cgroups.get(FlowKey(family, local.ip, local.port, remote.ip, remote.port), 0)
        named = socket_owner(owner_of, by_cgroup, local.ip, cgroup)
        if not cgroup and (local.unit or local.pod) and not (named and named.pod):
            named_local = local   # named from its cgroup before a restart: the kernel's flow is gone
        else:
            named_local = with_owner(local, named)
        return {"local": named_local, "remote": with_owner(remote, owner_of(remote.ip))}
    attributed = entry.model_copy(update={
        "top_flows": [f.model_copy(update=ends(f.local, f.remote, str(f.family))) for f in entry.top_flows],
        "recent_events": [e.model_copy(update=ends(e.local, e.remote, str(e.family))) for e in entry.recent_events],
        "top_pods": ranked_pods(pods.pods, facts.node, cumulative_pod_segments(baseline, pod_segments)),
    })
    return NodeEntry(attributed, pods, remotes, retransmits_by_pod_port(
        merged, lambda flow: socket_owner(owner_of, by_cgroup, flow.key.local_ip, cgroups.get(flow.key, 0))))


def socket_owner(owner_of: Callable[[str], Optional[Owner]], cgroup_owners: Mapping[int, Optional[Owner]],
                 ip: str, cgroup: int, waiting: bool = False) -> Optional[Owner]:
    """Who a local socket belongs to: the pod whose own address `ip` is; else its cgroup's
    owner (a hostNetwork pod, a node unit); else the address's owner (the node). A cgroup
    naming a pod the index does not know yet gives None when `waiting` (per-pod counts then
    wait for the pod), else the address's owner."""
    owner = owner_of(ip)
    if (owner is not None and owner.pod) or not cgroup or cgroup not in cgroup_owners:
        return owner
    named = cgroup_owners[cgroup]
    if named is None:
        return None if waiting else owner
    return named


def retransmits_by_pod_port(flows: Sequence[CumulativeFlow],
                            owner_of: Callable[[CumulativeFlow], Optional[Owner]]) -> dict[PodPortKey, int]:
    """tcp_retransmit_skb counts by local pod (or node) and remote port over every flow, the
    kernel map's and the baseline's, with their cumulative counts."""
    counts: dict[PodPortKey, int] = {}
    for flow in flows:
        owner = owner_of(flow)
        namespace = (owner.namespace or "") if owner else ""
        pod = (owner.pod or owner.node or "") if owner else ""
        key = (namespace, pod, str(flow.key.remote_port))
        counts[key] = counts.get(key, 0) + flow.retransmits
    return counts


def _memoized_owners(owners: Mapping[str, Owner], node: str) -> Callable[[str], Optional[Owner]]:
    """owner_in_table() for one table, remembered: the kernel map holds many flows but few
    local addresses, and each is looked up for the metrics, the pods and the top flows."""
    known: dict[str, Optional[Owner]] = {}

    def owner_of(ip: str) -> Optional[Owner]:
        if ip not in known:
            known[ip] = owner_in_table(owners, ip, node)
        return known[ip]
    return owner_of


