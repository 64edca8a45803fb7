"""Writing one node's entry into a RetransmitTrace's status, without ever losing counts.

The pure parts decide what to write and when:
- `Baseline` is what an earlier agent on this node already reported (read back from
  status.nodes[] at start-up); `merge_snapshot` adds it to the kernel's fresh counts, so a
  restarted agent continues instead of starting over and counts never go backwards.
- `report_interval` stretches the interval so one trace sees at most `max_writes_per_second`
  status writes across all its nodes; `backoff_delay` spaces out retries (capped, jittered).
- `pod_totals` / `cumulative_pods` / `ranked_pods` give each local pod's retransmits over
  every flow in the kernel map (not only the top flows), resumed like the totals.
- `fit_entry` keeps the entry inside its share of the object (etcd's 1.5 MiB limit): on
  big clusters nodes keep fewer samples, flows and pods, never fewer counts.
- `entry_changed` skips writes that would change nothing but the timestamp.
- `apply_body` is the server-side-apply document that carries only this node's entry.

`StatusWriter` is the thin I/O edge: read the trace, apply the entry to the /status
subresource with field manager `rtrace-agent/<node>` and force, nothing else.

Write budget and the cluster size it allows: with the default 5 writes/s per trace and the
default reportInterval of 10s, up to 50 nodes report every 10s; beyond that each agent
stretches its interval to nodesDesired / 5 s. Writes to an object larger than
BUDGET_OBJECT_BYTES (160 KiB) cost more, so the rate drops in proportion: a trace on 1,000
nodes (about 0.85 MB) sees about 0.9 writes/s, one write per node every ~18 minutes. The
API server's load per trace is then bounded whatever the cluster size; the price is
staler node entries on big clusters.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from retransmit_operator.api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Flow,
    NodeStatus,
    PodCount,
    RecentEvent,
    to_api,
)
from retransmit_operator.heartbeat import INTERVAL_JITTER, WRITE_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

FIELD_MANAGER_PREFIX = "rtrace-agent/"


def field_manager(node: str) -> str:
    """Each node's agent is its own server-side-apply writer."""
    return f"{FIELD_MANAGER_PREFIX}{node}"


# ---------------------------------------------------------------- when to write

# A status write costs the API server in proportion to the object it rewrites (decode, merge
# managedFields, encode, store): bench/ measured 0.13 CPU-s per write on a 190 KB trace and
# 0.5-1 CPU-s on a 0.9 MB one, where 5 writes/s saturated a 2-core API server. So the
# budget is maxWritesPerSecond writes of an object up to BUDGET_OBJECT_BYTES; a larger
# object gets proportionally fewer writes (the same bytes per second).
BUDGET_OBJECT_BYTES = 160 * 1024


def report_interval(spec_interval: float, nodes_desired: int, max_writes_per_second: float,
                    object_bytes: int = 0) -> float:
    """The per-trace write budget: max(reportInterval, nodesDesired / writes per second),
    where writes per second is maxWritesPerSecond, scaled down for objects larger than
    BUDGET_OBJECT_BYTES (object_bytes: the trace's size as last seen; 0 = unknown)."""
    if max_writes_per_second <= 0:
        return spec_interval
    writes_per_second = max_writes_per_second
    if object_bytes > BUDGET_OBJECT_BYTES:
        writes_per_second *= BUDGET_OBJECT_BYTES / object_bytes
    return max(spec_interval, nodes_desired / writes_per_second)


def object_size(trace: Mapping[str, Any]) -> int:
    """Bytes of the trace object as the API server returned it (compact JSON)."""
    return len(json.dumps(trace, separators=(",", ":"), default=str))


def backoff_delay(
    attempt: int, base: float = 1.0, cap: float = 30.0, rng: Callable[[], float] = random.random
) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, "equal jitter".

    Half the capped step is fixed and half random, so retries from many nodes spread out
    and the delay never collapses to zero (no spinning).
    """
    step = min(cap, base * (2 ** min(attempt, 32)))
    return step / 2 + rng() * step / 2


def jittered(interval: float, rng: Callable[[], float] = random.random, spread: float = INTERVAL_JITTER) -> float:
    """The interval +-INTERVAL_JITTER, so agents started together do not write in lock-step."""
    return interval * (1 - spread + 2 * spread * rng())


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
    missed_events: int = 0
    flows: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
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
            flows=entry.flows,
            by_state=dict(entry.by_state),
            top_flows={FlowKey.of_flow(f): f for f in entry.top_flows},
            recent_events=tuple(entry.recent_events),
            top_pods=_baseline_pods(entry),
        )

    @property
    def empty(self) -> bool:
        return (
            self.retransmits == 0 and self.synack_retransmits == 0 and self.lost_events == 0
            and self.missed_events == 0
            and not self.top_flows and not self.recent_events and self.flows == 0
            and not self.top_pods
        )


def _baseline_pods(entry: NodeStatus) -> dict[PodKey, int]:
    """Per-pod counts an earlier agent reported: its topPods; for an agent that predates
    topPods, the local pods of its top flows (a lower bound, the best the entry holds)."""
    if entry.top_pods is not None:
        return {(p.namespace, p.pod): p.retransmits for p in entry.top_pods}
    counts: dict[PodKey, int] = {}
    for flow in entry.top_flows:
        if flow.local.pod and flow.local.namespace:
            key = (flow.local.namespace, flow.local.pod)
            counts[key] = counts.get(key, 0) + flow.retransmits + flow.synack_retransmits
    return counts


def find_entry(trace: Mapping[str, Any], node: str) -> Optional[NodeStatus]:
    """This node's entry in a RetransmitTrace object (JSON dict), or None."""
    for raw in ((trace.get("status") or {}).get("nodes") or []):
        if raw.get("node") == node:
            try:
                return NodeStatus.model_validate(raw)
            except ValueError as exc:
                log.warning("ignoring unreadable entry for node %s: %s", node, exc)
                return None
    return None


def nodes_desired(trace: Mapping[str, Any]) -> int:
    """status.summary.nodesDesired as the operator wrote it (0 when not yet known)."""
    summary = (trace.get("status") or {}).get("summary") or {}
    try:
        return max(0, int(summary.get("nodesDesired") or 0))
    except (TypeError, ValueError):
        return 0


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
        })
    return list(merged.values())


def top_flows(flows: Sequence[Flow], top_n: int) -> list[Flow]:
    """Busiest first (retransmits + SYN-ACK retransmits, then most recent), at most top_n (0 = all)."""
    ordered = sorted(flows, key=_busiest_first)
    return ordered[:top_n] if top_n > 0 else ordered


def cumulative_entry(baseline: Baseline, fresh: NodeStatus, merged_flows: Sequence[Flow], top_n: int, keep: int) -> NodeStatus:
    """The entry to write: this agent's report `fresh` plus what earlier agents reported.

    Totals, byState, lostEvents and missedEvents add; `flows` never shrinks; top flows come from
    `merged_flows` (see merge_flows); recent events: this agent's first, then older ones.
    """
    by_state = dict(baseline.by_state)
    for state, count in fresh.by_state.items():
        by_state[state] = by_state.get(state, 0) + count
    events = (list(fresh.recent_events) + list(baseline.recent_events))[:keep] if keep > 0 else []
    return fresh.model_copy(update={
        "retransmits": baseline.retransmits + fresh.retransmits,
        "synack_retransmits": baseline.synack_retransmits + fresh.synack_retransmits,
        "lost_events": baseline.lost_events + fresh.lost_events,
        "missed_events": baseline.missed_events + fresh.missed_events,
        "flows": max(baseline.flows, len(merged_flows), fresh.flows),
        "by_state": by_state,
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
    ordered = sorted(((key, n) for key, n in counts.items() if n > 0), key=lambda item: (-item[1], item[0]))
    if top_n > 0:
        ordered = ordered[:top_n]
    return [PodCount(namespace=ns, pod=pod, node=node, retransmits=n) for (ns, pod), n in ordered]


# etcd refuses objects over 1.5 MiB, and every write rewrites the whole object (see
# BUDGET_OBJECT_BYTES): the node entries share 256 KiB of the trace, split evenly. Up to
# about 20 nodes that is every flow and sample the spec asks for; at 100 nodes counts, top
# pods and the busiest flows; from about 400 nodes counts only (the floor: at 1,000 nodes
# the object is about 0.9 MB, still well under etcd's limit).
NODES_STATUS_BUDGET_BYTES = 256 * 1024


# Each agent is its own field manager, so the object also carries one metadata.managedFields
# record per node listing the fields of its entry: measured at about 510 bytes per node
# (bench/, 1,000 nodes), more with long node names. It counts against the same budget.
MANAGED_FIELDS_BYTES_PER_NODE = 640


def entry_budget_bytes(nodes_desired: int, budget: int = NODES_STATUS_BUDGET_BYTES) -> int:
    """This node's share of the status: the whole budget over the nodes the trace runs on,
    less what its field manager's record takes."""
    return budget // max(1, nodes_desired) - MANAGED_FIELDS_BYTES_PER_NODE


def entry_size(entry: NodeStatus) -> int:
    """Bytes the entry takes in the stored object (compact JSON, as etcd holds it)."""
    return len(json.dumps(to_api(entry), separators=(",", ":")))


def fit_entry(entry: NodeStatus, budget_bytes: int) -> NodeStatus:
    """The entry trimmed to `budget_bytes`: recent events go first (oldest first), then the
    least busy flows and pods, one of each in turn. Counts, byState and phase always stay:
    they are what the summary adds up, so a big cluster loses detail, never totals.

    Flows and pods shrink together because the summary needs both: flows answer "which
    connections", pods are the exact per-pod totals the summary's topPods adds up (and what
    a restarted agent resumes pod counts from). Where they are equally many, the flow goes
    first: it is three times a pod's size."""
    events, flows, pods = list(entry.recent_events), list(entry.top_flows), list(entry.top_pods or [])
    trimmed = entry
    while entry_size(trimmed) > budget_bytes and (events or flows or pods):
        if events:
            events.pop()
        elif flows and len(flows) >= len(pods):
            flows.pop()
        else:
            pods.pop()
        trimmed = entry.model_copy(update={"recent_events": events, "top_flows": flows,
                                           "top_pods": pods if entry.top_pods is not None else None})
    return trimmed


def _busiest_first(flow: Flow) -> tuple:
    last = flow.last_seen.timestamp() if flow.last_seen else 0.0
    return (-(flow.retransmits + flow.synack_retransmits), -last, flow.local.ip, flow.local.port,
            flow.remote.ip, flow.remote.port)


# ---------------------------------------------------------------- the write

def apply_body(trace: str, entry: NodeStatus) -> dict[str, Any]:
    """The apply document: only this node's entry, so the field manager owns nothing else."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": trace},
        "status": {"nodes": [to_api(entry)]},
    }


class ApiError(Exception):
    """A failed API call, with the HTTP status when there was one (0 = no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class StatusWriter:
    """Reads the trace and applies this node's entry. The only API calls of the reporter."""

    def __init__(self, api_client: Any, trace: str, node: str, timeout: float = WRITE_TIMEOUT_SECONDS) -> None:
        from kubernetes import client

        self._objects = client.CustomObjectsApi(api_client)
        self.trace = trace
        self.node = node
        self._timeout = timeout

    def _call(self, request: Callable[[], Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            result = request()
        except ApiException as exc:
            raise ApiError(exc.status or 0, str(exc.body or exc.reason or exc).strip()[:500]) from None
        except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, TLS: no answer
            raise ApiError(0, f"{type(exc).__name__}: {exc}"[:500]) from None
        return result if isinstance(result, dict) else {}

    def read_trace(self) -> dict[str, Any]:
        return self._call(lambda: self._objects.get_cluster_custom_object(
            GROUP, VERSION, PLURAL, self.trace, _request_timeout=self._timeout))

    def apply(self, entry: NodeStatus) -> dict[str, Any]:
        """Server-side apply of status.nodes[<node>]; returns the whole trace as stored."""
        return self._call(lambda: self._objects.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, self.trace, apply_body(self.trace, entry),
            field_manager=field_manager(self.node), force=True,
            _content_type="application/apply-patch+yaml", _request_timeout=self._timeout))
