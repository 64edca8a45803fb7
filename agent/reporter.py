"""Writing one node's RetransmitNodeReport for one trace, without ever losing counts.

The pure parts decide what to write and when:
- `Baseline` is what an earlier agent on this node already reported (read back from its own
  report at start-up); `cumulative_entry` adds it to the kernel's fresh counts, so a
  restarted agent continues instead of starting over and counts never go backwards. The
  report is never trimmed, so the baseline is exact.
- `pod_totals` / `cumulative_pods` / `ranked_pods` give each local pod's retransmits over
  every flow in the kernel map (not only the top flows), resumed like the totals.
- `entry_changed` says whether a write would change more than the timestamp; when it would
  not, the schedule (retransmit_core.schedule.next_write) renews the report's heartbeat
  Lease instead, every few intervals.

`ReportWriter` is the thin I/O edge: read this node's report, create it, server-side apply
it with field manager `rtrace-agent/<node>` and force, renew its heartbeat Lease, read the
DaemonSet's node count; nothing else. A report is a few KB, so one write costs the API server
the same at 10 nodes and at 5,000; the schedule bounds how many there are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from retransmit_core.api import (
    GROUP,
    REPORT_PLURAL,
    VERSION,
    Flow,
    NodeStatus,
    PodCount,
    RecentEvent,
    add_counts,
    add_known,
    to_api,
)
from retransmit_core.apierrors import no_answer, server_message
from retransmit_core.schedule import WRITE_TIMEOUT_SECONDS
from retransmit_core.schedule import desired_nodes
from retransmit_core.ranking import flow_key, pod_key
from retransmit_core.naming import daemonset_name
from retransmit_core.naming import (
    LEASE_GROUP,
    LEASE_PLURAL,
    LEASE_VERSION,
    heartbeat_object,
    heartbeat_renewal,
    report_name,
    report_object,
)

log = logging.getLogger(__name__)

FIELD_MANAGER_PREFIX = "rtrace-agent/"


def field_manager(node: str) -> str:
    """Each node's agent is its own server-side-apply writer."""
    return f"{FIELD_MANAGER_PREFIX}{node}"


# ---------------------------------------------------------------- when to write

def _comparable(entry: NodeStatus) -> dict[str, Any]:
    doc = to_api(entry)
    doc.pop("lastReportTime", None)
    return doc


def entry_changed(previous: Optional[NodeStatus], current: NodeStatus) -> bool:
    """True when `current` differs from the last written entry in more than its timestamp."""
    return previous is None or _comparable(previous) != _comparable(current)


# ---------------------------------------------------------------- resume

@dataclass(frozen=True)
class FlowKey:
    """Identity of a flow across agent restarts (the kernel's map key, as text)."""

    family: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int

    @classmethod
    def of_flow(cls, flow: Flow) -> "FlowKey":
        return cls(str(flow.family), flow.local.ip, flow.local.port, flow.remote.ip, flow.remote.port)


# (namespace, pod): a pod's identity in per-pod counts.
PodKey = tuple[str, str]


@dataclass(frozen=True)
class Baseline:
    """Counts an earlier agent on this node already reported; zero when there was none."""

    retransmits: int = 0
    synack_retransmits: int = 0
    lost_events: int = 0
    missed_events: Optional[int] = None
    failed_attempts: Optional[int] = None
    flows: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
    by_cause: Mapping[str, int] = field(default_factory=dict)
    top_flows: Mapping[FlowKey, Flow] = field(default_factory=dict)
    recent_events: Sequence[RecentEvent] = ()
    top_pods: Mapping[PodKey, int] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: Optional[NodeStatus]) -> "Baseline":
        if entry is None:
            return cls()
        return cls(
            retransmits=entry.retransmits,
            synack_retransmits=entry.synack_retransmits,
            lost_events=entry.lost_events,
            missed_events=entry.missed_events,
            failed_attempts=entry.failed_attempts,
            flows=entry.flows,
            by_state=dict(entry.by_state),
            by_cause=dict(entry.by_cause),
            top_flows={FlowKey.of_flow(f): f for f in entry.top_flows},
            recent_events=tuple(entry.recent_events),
            top_pods={(p.namespace, p.pod): p.retransmits for p in entry.top_pods},
        )

    @property
    def empty(self) -> bool:
        return (
            self.retransmits == 0 and self.synack_retransmits == 0 and self.lost_events == 0
            and not self.missed_events and not self.failed_attempts
            and not self.top_flows and not self.recent_events and self.flows == 0
            and not self.top_pods
        )


def read_entry(report: Optional[Mapping[str, Any]], node: str) -> Optional[NodeStatus]:
    """This node's entry in its report object (JSON dict), or None (no report, or unreadable)."""
    raw = (report or {}).get("spec")
    if not raw or raw.get("node") != node:
        return None
    try:
        return NodeStatus.model_validate(raw)
    except ValueError as exc:
        log.warning("ignoring unreadable report of node %s: %s", node, exc)
        return None


def _max_time(a: Optional[datetime], b: Optional[datetime]) -> Optional[datetime]:
    return b if a is None else a if b is None else max(a, b)


def _min_time(a: Optional[datetime], b: Optional[datetime]) -> Optional[datetime]:
    return b if a is None else a if b is None else min(a, b)


def merge_flows(baseline: Baseline, fresh_flows: Sequence[Flow]) -> list[Flow]:
    """Every flow with its cumulative counts: this agent's flows plus earlier agents' top flows.

    A flow reported before a restart and seen again adds up; baseline flows the kernel has
    not seen (yet) keep their old counts, so they stay in the running for the top N.
    """
    merged: dict[FlowKey, Flow] = dict(baseline.top_flows)
    for flow in fresh_flows:
        key = FlowKey.of_flow(flow)
        old = merged.get(key)
        if old is None:
            merged[key] = flow
            continue
        merged[key] = flow.model_copy(update={
            "retransmits": old.retransmits + flow.retransmits,
            "synack_retransmits": old.synack_retransmits + flow.synack_retransmits,
            "first_seen": _min_time(old.first_seen, flow.first_seen),
            "last_seen": _max_time(old.last_seen, flow.last_seen),
            "last_state": flow.last_state or old.last_state,
            "by_cause": add_counts(old.by_cause, flow.by_cause),
            "socket": flow.socket or old.socket,
        })
    return list(merged.values())


def top_flows(flows: Sequence[Flow], top_n: int) -> list[Flow]:
    """Busiest first (retransmit_core.ranking), at most top_n (0 = all)."""
    ordered = sorted(flows, key=flow_key)
    return ordered[:top_n] if top_n > 0 else ordered


def cumulative_entry(baseline: Baseline, fresh: NodeStatus, merged_flows: Sequence[Flow], top_n: int, keep: int) -> NodeStatus:
    """The entry to write: this agent's report `fresh` plus what earlier agents reported.

    Totals, byState, byCause, lostEvents, missedEvents and failedAttempts add (the last two stay
    unknown only when neither knows); `flows` never shrinks; top flows come from `merged_flows`
    (see merge_flows); recent events: this agent's first, then older ones.
    """
    events = (list(fresh.recent_events) + list(baseline.recent_events))[:keep] if keep > 0 else []
    return fresh.model_copy(update={
        "retransmits": baseline.retransmits + fresh.retransmits,
        "synack_retransmits": baseline.synack_retransmits + fresh.synack_retransmits,
        "lost_events": baseline.lost_events + fresh.lost_events,
        "missed_events": add_known(baseline.missed_events, fresh.missed_events),
        "failed_attempts": add_known(baseline.failed_attempts, fresh.failed_attempts),
        "flows": max(baseline.flows, len(merged_flows), fresh.flows),
        "by_state": add_counts(baseline.by_state, fresh.by_state),
        "by_cause": add_counts(baseline.by_cause, fresh.by_cause),
        "top_flows": top_flows(merged_flows, top_n),
        "recent_events": events,
    })


def pod_totals(flows: Iterable[Any], pod_of: Callable[[str], Optional[PodKey]]) -> dict[PodKey, int]:
    """Retransmits (skb + SYN-ACK) by local pod over `flows` (the kernel map's FlowCounters).

    `pod_of(ip)` names the pod owning a local address, None for addresses that are no pod
    (hostNetwork pods, the node's own addresses, unknown ones): those flows are skipped.
    """
    totals: dict[PodKey, int] = {}
    for flow in flows:
        key = pod_of(flow.local_ip)
        count = flow.retransmits + flow.synack_retransmits
        if key is not None and count:
            totals[key] = totals.get(key, 0) + count
    return totals


def cumulative_pods(baseline: Baseline, fresh: Mapping[PodKey, int], previous: Mapping[PodKey, int]) -> dict[PodKey, int]:
    """Per-pod counts to report: max(what this agent reported before, baseline + fresh).

    A restarted agent's kernel map starts empty, so baseline + fresh is the pod's count
    since the trace began. The max with `previous` (this agent's last result) keeps a count
    from going down when the kernel's LRU map evicts a flow or a pod leaves the index.
    """
    counts = dict(previous)
    for key in set(baseline.top_pods) | set(fresh):
        counts[key] = max(counts.get(key, 0), baseline.top_pods.get(key, 0) + fresh.get(key, 0))
    return counts


def ranked_pods(counts: Mapping[PodKey, int], node: str, top_n: int) -> list[PodCount]:
    """The busiest pods (ties by namespace, name), at most top_n (0 = all), on `node`."""
    ordered = sorted(((key, n) for key, n in counts.items() if n > 0), key=lambda item: pod_key(item[1], *item[0]))
    if top_n > 0:
        ordered = ordered[:top_n]
    return [PodCount(namespace=ns, pod=pod, node=node, retransmits=n) for (ns, pod), n in ordered]


# ---------------------------------------------------------------- the write

class ApiError(Exception):
    """A failed API call, with the HTTP status when there was one (0 = no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


@dataclass(frozen=True)
class ReportTarget:
    """Which report this agent writes: its trace (name and uid, for the ownerReference), its
    node and the namespace reports live in (the agent pod's own)."""

    trace: str
    trace_uid: str
    node: str
    namespace: str

    @property
    def name(self) -> str:
        return report_name(self.trace, self.node)

    def body(self, entry: NodeStatus) -> dict[str, Any]:
        return report_object(self.trace, self.trace_uid, self.node, self.namespace, entry)


class ReportWriter:
    """Reads, creates and applies this node's report. The only API calls of the reporter."""

    def __init__(self, api_client: Any, target: ReportTarget, timeout: float = WRITE_TIMEOUT_SECONDS) -> None:
        from kubernetes import client

        self._objects = client.CustomObjectsApi(api_client)
        self.target = target
        self._timeout = timeout

    def _call(self, request: Callable[[], Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            result = request()
        except ApiException as exc:
            raise ApiError(exc.status or 0, server_message(exc.body, exc.reason or str(exc))[:500]) from None
        except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, TLS: no answer
            raise ApiError(0, f"the API server did not answer ({no_answer(exc)})") from None
        return result if isinstance(result, dict) else {}

    def read(self) -> Optional[dict[str, Any]]:
        """The stored report, or None when there is none yet."""
        t = self.target
        try:
            return self._call(lambda: self._objects.get_namespaced_custom_object(
                GROUP, VERSION, t.namespace, REPORT_PLURAL, t.name, _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, entry: NodeStatus) -> dict[str, Any]:
        """Create the report (labels, owner, first content) and return it; when it exists
        already (made since it was read), the stored one: it is the baseline."""
        t = self.target
        try:
            return self._call(lambda: self._objects.create_namespaced_custom_object(
                GROUP, VERSION, t.namespace, REPORT_PLURAL, t.body(entry),
                field_manager=field_manager(t.node), _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.status != 409:
                raise
        stored = self.read()
        if stored is None:
            raise ApiError(409, f"report {t.name} was created and deleted meanwhile: retried")
        return stored

    def apply(self, entry: NodeStatus) -> dict[str, Any]:
        """Server-side apply of the whole report (this agent is its only writer of spec)."""
        t = self.target
        return self._call(lambda: self._objects.patch_namespaced_custom_object(
            GROUP, VERSION, t.namespace, REPORT_PLURAL, t.name, t.body(entry),
            field_manager=field_manager(t.node), force=True,
            _content_type="application/apply-patch+yaml", _request_timeout=self._timeout))

    def heartbeat(self, renewed: datetime, duration_seconds: int) -> None:
        """Renew this report's heartbeat Lease (a merge patch of renewTime); create it the
        first time. The Lease is what keeps a quiet node reporting at ~1/10 of a report's cost."""
        t = self.target
        renew = lambda: self._objects.patch_namespaced_custom_object(  # noqa: E731
            LEASE_GROUP, LEASE_VERSION, t.namespace, LEASE_PLURAL, t.name, heartbeat_renewal(renewed),
            field_manager=field_manager(t.node), _content_type="application/merge-patch+json",
            _request_timeout=self._timeout)
        try:
            self._call(renew)
            return
        except ApiError as exc:
            if exc.status != 404:
                raise
        try:
            self._call(lambda: self._objects.create_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, t.namespace, LEASE_PLURAL,
                heartbeat_object(t.trace, t.trace_uid, t.node, t.namespace, renewed, duration_seconds),
                field_manager=field_manager(t.node), _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.status != 409:
                raise
            self._call(renew)   # created meanwhile (an earlier agent's write that timed out)

    def desired_nodes(self) -> Optional[int]:
        """How many nodes run this trace's agents, as the operator counts them (nodesDesired):
        None until the DaemonSet controller has seen the DaemonSet's current generation."""
        t = self.target
        return desired_nodes(self._call(lambda: self._objects.get_namespaced_custom_object(
            "apps", "v1", t.namespace, "daemonsets", daemonset_name(t.trace), _request_timeout=self._timeout)))
