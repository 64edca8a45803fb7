"""The node report: a kernel snapshot turned into the API's status.nodes[] entry (NodeStatus).

Pure: no I/O. Used by `retransmit-agent local --output json` and by the cluster agent,
which then attributes pods and adds its restart baseline.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional, Sequence

from retransmit_core.api import KernelCheck, NodeStatus, Phase, RecentEvent

from .flows import busiest_first
from .kernel import KernelSnapshot


def build_node_report(
    node: str,
    snapshot: KernelSnapshot,
    recent_events: Sequence[RecentEvent],
    top_n: int,
    kernel_release: Optional[str] = None,
    agent_version: Optional[str] = None,
    keep_events: Optional[int] = None,
    report_time: Optional[datetime] = None,
    kernel_checks: Sequence[KernelCheck] = (),
) -> NodeStatus:
    """A Running NodeStatus for `node` from one snapshot.

    top_n: how many flows go into topFlows, busiest first (0 = all flows).
    recent_events: samples in the order they should appear (callers pass newest first);
    keep_events: keep only the first that many (None = all given).
    `flows` counts the distinct flows still in the kernel's maps.
    """
    flows = busiest_first(snapshot.flow_counters)
    if top_n > 0:
        flows = flows[:top_n]
    events = list(recent_events) if keep_events is None else list(recent_events)[:keep_events]
    return NodeStatus(
        node=node,
        phase=Phase.RUNNING,
        retransmits=snapshot.retransmits,
        synack_retransmits=snapshot.synack_retransmits,
        lost_events=snapshot.lost_events,
        missed_events=snapshot.missed_events,
        failed_attempts=snapshot.failed_attempts,
        by_cause=snapshot.by_cause,
        kernel_checks=list(kernel_checks),
        flows=len(snapshot.flow_counters),
        by_state=dict(sorted(snapshot.by_state.items())),
        top_flows=[f.to_flow() for f in flows],
        recent_events=events,
        last_report_time=report_time or datetime.now(timezone.utc),
        kernel=kernel_release,
        agent_version=agent_version,
    )
