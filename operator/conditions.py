"""Phase, conditions and completion of a trace, as pure functions of what the operator observed.

Everything is derived from the object itself (status.startTime, spec.duration), the nodes'
reports and the DaemonSet, never from operator memory: an operator restart changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

from retransmit_core.api import Condition, NodeRow, NodeStatus, Phase, RetransmitTraceStatus, Summary

READY, AGENTS_READY, DEGRADED = "Ready", "AgentsReady", "Degraded"
CONDITION_TYPES = (READY, AGENTS_READY, DEGRADED)
INVALID_SPEC = "InvalidSpec"
MAX_MESSAGE = 1024  # condition messages stay short; the node reports hold the details


def utcnow() -> datetime:
    """Now, to the second (metav1.Time's precision), so equal states serialize equally."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def deadline(start_time: Optional[datetime], duration_seconds: Optional[float]) -> Optional[datetime]:
    """When the trace ends: startTime + spec.duration, or None (runs until deleted / not started)."""
    if start_time is None or duration_seconds is None:
        return None
    return start_time + timedelta(seconds=duration_seconds)


def is_due(start_time: Optional[datetime], duration_seconds: Optional[float], now: datetime) -> bool:
    end = deadline(start_time, duration_seconds)
    return end is not None and now >= end


@dataclass(frozen=True)
class Observation:
    """What the operator saw of one trace in one pass."""

    generation: Optional[int]
    spec_error: Optional[str]          # why the spec is invalid (names the field), or None
    start_time: Optional[datetime]     # status.startTime, set when the DaemonSet was first created
    completion_time: Optional[datetime]
    nodes: Sequence[NodeStatus]
    summary: Summary
    now: datetime
    # False while the DaemonSet controller has not yet counted the nodes for the current spec.
    nodes_desired_known: bool = True
    # Nodes whose agent counted but wrote nothing within the heartbeat bound, and that bound.
    stale_nodes: Sequence[str] = ()
    stale_after: Optional[timedelta] = None
    rows: Sequence[NodeRow] = ()  # status.nodes[] (aggregate.node_rows)
    namespace: str = ""  # where the agents run (the operator's namespace), for the fix in messages
    waiting: Optional[str] = None  # why the trace waits for a slot (slots.waiting_reason), or None


def count(n: int, noun: str) -> str:
    """'1 node', '3 nodes': messages are read by people, not parsed."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _trim(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def phase_of(obs: Observation) -> Phase:
    if obs.spec_error is not None:
        return Phase.FAILED
    if obs.completion_time is not None:
        return Phase.COMPLETED
    if obs.start_time is None:
        return Phase.PENDING
    return Phase.RUNNING


def failed_nodes(nodes: Sequence[NodeStatus]) -> list[NodeStatus]:
    return sorted((n for n in nodes if str(getattr(n.phase, "value", n.phase)) == Phase.FAILED.value), key=lambda n: n.node)


def _agents(obs: Observation, phase: Phase) -> tuple[str, str, str]:
    """(status, reason, message) of AgentsReady."""
    s = obs.summary
    counts = f"{s.nodes_reporting}/{s.nodes_desired} nodes reporting"
    if phase is Phase.FAILED:
        return "False", INVALID_SPEC, "no agents run while the spec is invalid"
    if phase is Phase.COMPLETED:
        return "False", "TraceCompleted", f"agents removed at completion; {counts} in the final results"
    if phase is Phase.PENDING and obs.waiting:
        return "False", "TraceLimitReached", obs.waiting
    if phase is Phase.PENDING:
        return "False", "DaemonSetPending", "creating the agents' DaemonSet"
    if not obs.nodes_desired_known:
        return "False", "AgentsScheduling", "waiting for the DaemonSet controller to place the agents"
    if s.nodes_desired == 0:
        return "False", "NoMatchingNodes", ("no node runs an agent: check spec.nodeSelector (kubernetes.io/os=linux "
                                            "is added) and spec.tolerations against the nodes' labels and taints")
    failed = failed_nodes(obs.nodes)
    if failed:
        return "False", "NodesFailed", (f"{counts}; {count(len(failed), 'node')} failed: check the Degraded "
                                        "condition, which names each node's problem and its fix")
    if s.nodes_reporting >= s.nodes_desired:
        return "True", "AllAgentsReporting", counts + _privileged(s) + _not_covered(s)
    if obs.stale_nodes:
        bound = f" within {obs.stale_after.total_seconds():.0f}s" if obs.stale_after else ""
        where = f"kubectl -n {obs.namespace} get pods -o wide" if obs.namespace else "in the operator's namespace"
        return "False", "AgentsNotReporting", (
            f"{counts}; no report{bound} from {count(len(obs.stale_nodes), 'node')}: {', '.join(obs.stale_nodes)}; "
            f"check the agent pods on those nodes and their logs ({where})")
    return "False", "AgentsStarting", f"{counts}; waiting for the other agents to attach and report{_privileged(s)}"


def _privileged(s: Summary) -> str:
    """'; 2 nodes run privileged agents (node-a, node-b: <their agents' reason>)', or '' when
    every agent runs with capabilities only (summary.privilegedNodes, the auto mode)."""
    if not s.privileged_nodes:
        return ""
    total = sum(p.count for p in s.privileged_nodes)
    parts = [f"{', '.join(p.nodes)}{' and more' if p.count > len(p.nodes) else ''}: {p.reason}"
             for p in s.privileged_nodes]
    verb = "runs a privileged agent" if total == 1 else "run privileged agents"
    return f"; {count(total, 'node')} {verb}, capabilities were not enough there ({'; '.join(parts)})"


def _not_covered(s: Summary) -> str:
    """'; 1 of 3 Linux nodes not covered (TaintNotTolerated: node-c: taints ... are not
    tolerated: ...)', or '' when the trace reaches every Linux node."""
    if not s.nodes_not_covered or s.nodes_linux is None:
        return ""
    missed = sum(u.count for u in s.nodes_not_covered)
    parts = [f"{u.reason}: {', '.join(u.nodes)}{' and more' if u.count > len(u.nodes) else ''}: {u.detail}"
             for u in s.nodes_not_covered]
    return f"; {missed} of {count(s.nodes_linux, 'Linux node')} not covered ({'; '.join(parts)})"


def _degraded(obs: Observation) -> tuple[str, str, str]:
    failed = failed_nodes(obs.nodes)
    if not failed:
        return "False", "NoNodeFailed", "no node reported a failure"
    head = f"{count(len(failed), 'node')} cannot trace"
    details: list[str] = []
    budget = MAX_MESSAGE - len(head) - 80  # room for "; and N more nodes ..."
    for n in failed:
        detail = f"{n.node}: {n.message or 'failed without a message: check its agent pod log'}"
        if details and len(detail) + 2 > budget:
            break
        details.append(detail)
        budget -= len(detail) + 2
    rest = len(failed) - len(details)
    more = f"; and {count(rest, 'more node')}, whose reports hold their messages" if rest else ""
    return "True", "NodeFailed", f"{head}: {'; '.join(details)}{more}"


def _ready(obs: Observation, phase: Phase, agents: tuple[str, str, str]) -> tuple[str, str, str]:
    if phase is Phase.FAILED:
        return "False", INVALID_SPEC, obs.spec_error or ""
    if phase is Phase.COMPLETED:
        return "True", "Completed", "trace completed; results stay in status.summary and the node reports"
    if phase is Phase.PENDING:
        return "False", agents[1] if obs.waiting else "Pending", agents[2]
    if agents[0] == "True":
        return "True", "Running", f"counting retransmits; {agents[2]}"
    return "False", agents[1], agents[2]


def merge_condition(previous: Sequence[Condition], type_: str, status: str, reason: str, message: str,
                    generation: Optional[int], now: datetime) -> Condition:
    """A condition whose lastTransitionTime moves only when its status changes."""
    old = next((c for c in previous if c.type == type_), None)
    changed = old is None or old.status != status
    return Condition(
        type=type_, status=status, reason=reason, message=_trim(message),
        last_transition_time=now if changed else old.last_transition_time,  # type: ignore[union-attr]
        observed_generation=generation,
    )


def compute_status(obs: Observation, previous_conditions: Sequence[Condition]) -> RetransmitTraceStatus:
    """The operator-owned status for this observation."""
    phase = phase_of(obs)
    agents = _agents(obs, phase)
    wanted = {
        READY: _ready(obs, phase, agents),
        AGENTS_READY: agents,
        DEGRADED: _degraded(obs),
    }
    conditions = [merge_condition(previous_conditions, t, *wanted[t], obs.generation, obs.now) for t in CONDITION_TYPES]
    return RetransmitTraceStatus(
        phase=phase,
        observed_generation=obs.generation,
        start_time=obs.start_time,
        completion_time=obs.completion_time,
        conditions=conditions,
        summary=obs.summary,
        nodes=list(obs.rows),
    )


def transitions(before: Optional[RetransmitTraceStatus], after: RetransmitTraceStatus) -> list[tuple[str, str, str]]:
    """Kubernetes Events (type, reason, message) for the moments a user cares about."""
    events: list[tuple[str, str, str]] = []
    old_phase = before.phase if before else None
    old = {c.type: c for c in (before.conditions if before else [])}
    new = {c.type: c for c in after.conditions}
    if after.phase != old_phase:
        if after.phase == Phase.FAILED:
            events.append(("Warning", INVALID_SPEC, new[READY].message))
        elif after.phase == Phase.COMPLETED:
            s = after.summary
            totals = (f"{count(s.retransmits, 'retransmit')}, {count(s.synack_retransmits, 'SYN-ACK retransmit')}"
                      if s else "no results")
            events.append(("Normal", "Completed", f"trace completed: {totals}; agents removed"))
    agents_new, agents_old = new[AGENTS_READY], old.get(AGENTS_READY)
    if agents_new.status == "True" and (agents_old is None or agents_old.status != "True"):
        events.append(("Normal", "AgentsReady", agents_new.message))
    degraded_new, degraded_old = new[DEGRADED], old.get(DEGRADED)
    if degraded_new.status == "True" and (degraded_old is None or degraded_old.status != "True"
                                          or degraded_old.message != degraded_new.message):
        events.append(("Warning", "NodeFailed", degraded_new.message))
    return events


def scheduled_event(namespace: str, daemonset: str, node_selector: str) -> tuple[str, str, str]:
    """The Event of a trace's first DaemonSet; `node_selector` as key=value pairs (render.selector_text)."""
    return ("Normal", "AgentsScheduled",
            f"DaemonSet {namespace}/{daemonset} created: one agent per node matching {node_selector}")


def rolled_event(namespace: str, daemonset: str) -> tuple[str, str, str]:
    return ("Normal", "AgentsUpdated", f"DaemonSet {namespace}/{daemonset} rolled to the new spec")


def refused_message(trace: str, api_message: str) -> str:
    """spec_error when the API server refuses the rendered DaemonSet (a toleration key, say,
    which only Pod validation checks). The spec's fields keep their names in the pod template,
    so the message points at the trace's own field."""
    detail = api_message.replace("spec.template.spec.", "spec.")
    return (f"the agents' DaemonSet was refused by the API server: {detail}; "
            f"fix that field of the trace (kubectl edit rtrace {trace})")

