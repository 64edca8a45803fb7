"""The operator's one level-triggered pass over a trace, and what it knows between passes.

`Reconciler.reconcile` serves every trigger: a trace created, resumed at operator start, its
spec changed, and the periodic sync that aggregates the nodes' reports (kept current by two
label-selected watches, one of the reports and one of their heartbeat Leases, whatever the
number of traces: `ReportIndex`) into the trace's status and ends the trace at
startTime + duration. The agents' DaemonSets a pass reads come from a third watch
(`DaemonSetCache`, kept in step with the operator's own writes), not from a GET per trace.
The trace's status is written only when it changed, so at most once per sync interval. The
periodic sync is our own loop over the traces kopf's watch delivers, not a kopf timer: kopf
puts a finalizer on every object with a timer, and then deleting a trace would hang while
the operator is down. Here the trace has no finalizer; its DaemonSet goes by garbage
collection. The logic is the pure modules' (render, aggregate, conditions,
validation, objects); handlers.py only registers entry points into this class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from retransmit_core.api import (
    DEFAULT_TOP_FLOWS,
    NodeReportStatus,
    Phase,
    RetransmitTraceSpec,
    RetransmitTraceStatus,
    Summary,
    to_api,
)
from retransmit_core.contract import METRICS_PORT_SPAN
from retransmit_core.naming import (
    AGENTS_LOWERED_ANNOTATION,
    CLUSTER_AGENTS_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    TRACE_LABEL,
    agent_selector_labels,
    daemonset_name,
    privileged_daemonset_name,
)
from retransmit_core.podindex import PodIndex
from retransmit_core.schedule import (
    annotated_agents,
    bound_agents,
    cluster_agents,
    lowered_note,
    shared_agent_count,
    stale_after,
)
from retransmit_core.validation import validate_trace

from .aggregate import aggregate_summary, departed, node_rows, stale_nodes
from .conditions import (
    Observation, compute_status, is_due, refused_message, rolled_event, scheduled_event, transitions,
    utcnow,
)
from .daemonsets import DaemonSetCache
from .kube import ApiFailure, KubeApi
from .metrics import OperatorMetrics
from .objects import newer, operator_status
from .paths import Places
from .placement import NodeFacts, coverage
from .remotenames import ClusterNames, ServiceIndex
from .privilege import (
    AUTO, agents_scheduled, privileged_event, privileged_nodes, privileged_summary, recorded_privileged_nodes,
)
from .render import agent_placement, render_daemonset, render_privileged_daemonset, selector_text
from .reportindex import ReportIndex
from .settings import Settings
from .slots import choose_port, port_of, slots_in_use, waiting_reason
from .vouching import IGNORED_REASON, ignored_message, unvouched

log = logging.getLogger("retransmit_operator")

Event = tuple[str, str, str]  # Kubernetes Event: type, reason, message
REPORTS_SYNC_WAIT = 30.0  # seconds a pass waits for the first list of the nodes' reports
MAX_MARKS_PER_PASS = 50   # departed marks written on reports per pass
# Traces reconciled at once in a sync pass: their API calls overlap (each waits on the API
# server far longer than it computes); the computing itself takes turns on the event loop.
SYNC_CONCURRENCY = 8


@dataclass(frozen=True)
class AgentPod:
    """One agent pod of a trace, as the pod watch last saw it."""

    node: str
    running: bool


class Reconciler:
    """Holds what the operator knows between passes: the traces as last seen, the pod index,
    the Linux nodes, the agent pods."""

    def __init__(self, settings: Settings, kube: KubeApi, metrics: OperatorMetrics) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.pods = PodIndex()
        self.reports = ReportIndex()
        self.daemonsets = DaemonSetCache()   # the agents' DaemonSets (daemonsets.py)
        self.agent_pods: dict[str, dict[str, AgentPod]] = {}  # trace -> agent pod uid -> where, running
        # trace -> every node where the pod watch showed an agent pod of it (vouching.py)
        self.agent_nodes_seen: dict[str, set[str]] = {}
        self._suspects: dict[str, frozenset[str]] = {}       # trace uid -> nodes ignored in the last pass
        self._said_ignored: set[tuple[str, str]] = set()     # (trace uid, node) already in an Event
        self.nodes: dict[str, NodeFacts] = {}  # every Node by name (placement.coverage)
        self.node_addresses: dict[str, str] = {}  # node address -> node (remote-end naming)
        self.services = ServiceIndex()            # Service addresses and NodePorts (remote-end naming)
        self.places = Places(self.pods, self.nodes, self.node_addresses, self.services)   # the path matrix
        # Slots (a port, one of maxRunningTraces) are handed out one trace at a time.
        self._admission = asyncio.Lock()
        self._pass_daemonsets: dict[str, dict[str, Any]] = {}  # this sync pass's reads, by trace
        # The auto mode's privileged DaemonSet of each trace, as this pass applied or read it.
        self._privileged_agents: dict[str, Optional[dict[str, Any]]] = {}
        self.traces: dict[str, dict[str, Any]] = {}
        self._deleted: set[str] = set()  # uids: a late write response must not resurrect a trace
        self._locks: dict[str, asyncio.Lock] = {}
        self.last_sync: Optional[float] = None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def reconcile(self, body: dict[str, Any], *, trigger: str, roll: bool = False) -> Optional[RetransmitTraceStatus]:
        """Bring one trace's DaemonSet and operator-owned status in line with its spec and time.

        roll=True applies the rendered DaemonSet even when it looks current (create, resume,
        spec change); otherwise it is applied only when missing or out of date.
        """
        name = body["metadata"]["name"]
        started = time.monotonic()
        result = "ok"
        try:
            if not self.reports.synced.is_set():
                await asyncio.to_thread(self.reports.synced.wait, REPORTS_SYNC_WAIT)
                if not self.reports.synced.is_set():
                    raise ApiFailure("list node reports", 503, "NotListed",
                                     "the nodes' reports are not listed yet: is the API server reachable?")
            async with self._lock(name):
                return await self._reconcile(body, roll=roll)
        except ApiFailure:
            result = "api_error"
            raise
        except Exception:
            result = "error"
            raise
        finally:
            self.metrics.reconciles.labels(trigger=trigger, result=result).inc()
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    async def _reconcile(self, body: dict[str, Any], *, roll: bool) -> RetransmitTraceStatus:
        body = self._freshest(body)
        meta = body["metadata"]
        name, uid, generation = meta["name"], meta["uid"], meta.get("generation")
        if meta.get("deletionTimestamp"):
            # Being deleted (foreground deletion waits for the DaemonSet): recreate nothing.
            return operator_status(body.get("status") or {}) or RetransmitTraceStatus(phase=Phase.PENDING)
        status = body.get("status") or {}
        current = operator_status(status)
        if current is not None and current.phase == Phase.FAILED and current.observed_generation == generation:
            return current  # failed for this very spec: nothing to retry until the spec changes
        spec, spec_error = validate_trace(name, body.get("spec"))
        now = utcnow()
        start = current.start_time if current else None
        completion = current.completion_time if current else None
        ns, ds_name = self.settings.namespace, daemonset_name(name)
        daemonset: Optional[dict[str, Any]] = None
        privileged: Optional[dict[str, Any]] = None   # the auto mode's privileged agents, if any
        events: list[Event] = []
        waiting: Optional[str] = None

        if spec_error is not None:
            if await self._delete_daemonset(ds_name):
                await self._delete_daemonset(privileged_daemonset_name(name))
                log.info("trace %s: spec invalid, DaemonSet %s/%s deleted", name, ns, ds_name)
        elif completion is None and is_due(start, spec.duration_seconds, now):
            # The end: agents get SIGTERM and flush a final report; the summary keeps following.
            await self._delete_daemonset(ds_name)
            await self._delete_daemonset(privileged_daemonset_name(name))
            completion = now
        elif completion is None:
            daemonset, spec_error, events, waiting = await self._ensure_daemonset(body, spec, roll=roll)
            if start is None and spec_error is None and waiting is None:
                start = now
            if daemonset is not None:
                self._pass_daemonsets[name] = daemonset
            privileged = self._privileged_agents.pop(name, None)
            if privileged is not None:
                self._pass_daemonsets[privileged_daemonset_name(name)] = privileged

        # Heartbeats matter while the trace runs (who is still reporting); once it completed
        # the rows keep each report's own write time, so agents renewing their Lease until
        # SIGTERM reaches them do not keep rewriting a finished trace's status.
        top_n = spec.top_flows if spec else DEFAULT_TOP_FLOWS
        stored, sums = self.reports.view(name, uid, heartbeats=completion is None, top_n=top_n)
        ignored = unvouched(stored, frozenset(self.agent_nodes_seen.get(name, ())), self.nodes,
                            agent_placement(spec, self.settings) if spec else None)
        if ignored:
            stored = [r for r in stored if r.entry.node not in ignored]
            sums = None   # the index's sums include the ignored reports: add up the others here
            events += self._ignored_events(uid, ignored, name)
        nodes = [r.entry for r in stored]
        desired = agents_scheduled(daemonset, privileged)
        previous_desired = current.summary.nodes_desired if current and current.summary else 0
        nodes_desired = desired if desired is not None else previous_desired
        bound = None if completion or spec is None else stale_after(
            spec.report_interval_seconds, bound_agents(daemonset, spec.report_interval_seconds, now))
        gone = frozenset(r.entry.node for r in stored if r.status.departed)
        # Departures are judged only once the DaemonSet controller has placed the agents for
        # this spec (right after a create or a roll, no pod yet means nothing).
        if completion is None and bound is not None and desired is not None and spec_error is None:
            gone = await self._mark_departed(stored, gone, now, bound)
        rows, not_listed = node_rows(nodes, now, bound, gone)
        summary = aggregate_summary(
            nodes,
            nodes_desired=nodes_desired,
            top_n=top_n,
            pod_index=self.pods,
            now=now,
            stale_after=bound,
            departed=gone,
            nodes_not_listed=not_listed,
            names=ClusterNames(self.pods, self.services, self.node_addresses),
            tally=sums,
            places=self.places,
        )
        summary = self._with_coverage(summary, name, spec, daemonset, desired, current)
        summary = _with_privileged(summary, daemonset, current)
        observation = Observation(
            generation=generation, spec_error=spec_error, start_time=start, completion_time=completion,
            nodes=nodes, summary=summary, now=now,
            nodes_desired_known=desired is not None or daemonset is None,
            stale_nodes=stale_nodes(nodes, now, bound, gone), stale_after=bound, rows=rows,
            namespace=ns, waiting=waiting,
        )
        new = compute_status(observation, current.conditions if current else [])
        if current is None or to_api(new) != to_api(current):
            try:
                written = await self.kube.apply_status(name, to_api(new))
            except ApiFailure as e:
                if e.status != 404:
                    raise
                self.observe_trace("DELETED", body)  # gone meanwhile; its DaemonSet goes by GC
                return new
            self.observe_trace("MODIFIED", written)  # the next pass starts from what we wrote
            self.metrics.status_writes.inc()
            events += transitions(current, new)
        for type_, reason, message in events:
            log.info("trace %s: %s %s: %s", name, type_, reason, message)
            await self.kube.post_event(body, type_, reason, message)
            self.metrics.events.labels(reason=reason).inc()
        return new

    async def _ensure_daemonset(self, body: dict[str, Any], spec: RetransmitTraceSpec, *, roll: bool
                                ) -> tuple[Optional[dict[str, Any]], Optional[str], list[Event], Optional[str]]:
        """The trace's agents as its spec says: (DaemonSet, why the spec cannot run, events,
        why the trace waits for a slot)."""
        name, uid = body["metadata"]["name"], body["metadata"]["uid"]
        daemonset = await self._daemonset(daemonset_name(name))
        if daemonset is not None:
            return (*await self._apply_daemonset(name, uid, spec, daemonset, port_of(daemonset), roll=roll), None)
        async with self._admission:
            # A new DaemonSet takes a slot: read the slots in use from the agents' DaemonSets
            # (the watch's, with every DaemonSet this operator wrote since; before the watch
            # listed them, from the API server: right after a restart memory knows none).
            used = slots_in_use(await self._agent_daemonsets())
            waiting = waiting_reason(name, list(used), self._waiting_before(body, used), self.settings.max_running_traces)
            port = None if waiting else choose_port(name, self.settings.agent_metrics_port, METRICS_PORT_SPAN,
                                                     (p for t, p in used.items() if t != name and p is not None))
            if port is None:
                return None, None, [], waiting or (
                    f"all {METRICS_PORT_SPAN} agent ports from {self.settings.agent_metrics_port} are held by running "
                    "traces: this trace starts when one of them completes or is deleted")
            return (*await self._apply_daemonset(name, uid, spec, None, port, roll=roll), None)

    async def _daemonset(self, name: str) -> Optional[dict[str, Any]]:
        """An agents' DaemonSet as the watch last showed it or this operator last wrote it;
        until the watch has listed them, as the API server says."""
        if self.daemonsets.synced.is_set():
            return self.daemonsets.get(name)
        return await self.kube.get_daemonset(self.settings.namespace, name)

    async def _agent_daemonsets(self) -> list[dict[str, Any]]:
        """Every trace's agents' DaemonSets (the slots in use), as _daemonset reads one."""
        if self.daemonsets.synced.is_set():
            return self.daemonsets.all()
        return await self.kube.list_agent_daemonsets(self.settings.namespace)

    async def _write_daemonset(self, rendered: dict[str, Any]) -> dict[str, Any]:
        applied = await self.kube.apply_daemonset(rendered)
        self.daemonsets.record(applied)   # the next pass starts from what we wrote
        return applied

    async def _delete_daemonset(self, name: str) -> bool:
        """Delete an agents' DaemonSet of the operator's namespace; False when it was gone already."""
        deleted = await self.kube.delete_daemonset(self.settings.namespace, name)
        self.daemonsets.forget(name)
        return deleted

    def _waiting_before(self, body: dict[str, Any], used: dict[str, Optional[int]]) -> list[str]:
        """Traces that wait for a slot and were created before this one: they go first."""
        created = body["metadata"].get("creationTimestamp") or ""
        name = body["metadata"]["name"]
        older = []
        for other, known in self.traces.items():
            meta = known.get("metadata") or {}
            status = operator_status(known.get("status") or {})
            if other == name or other in used or meta.get("deletionTimestamp"):
                continue
            if status is not None and status.phase in (Phase.COMPLETED, Phase.FAILED):
                continue
            if status is not None and status.start_time is not None:
                continue  # ran before (its DaemonSet is being replaced), not waiting
            if (meta.get("creationTimestamp") or "", other) < (created, name):
                older.append(other)
        return sorted(older)

    async def _apply_daemonset(self, name: str, uid: str, spec: RetransmitTraceSpec,
                               daemonset: Optional[dict[str, Any]], port: Optional[int], *, roll: bool
                               ) -> tuple[Optional[dict[str, Any]], Optional[str], list[Event]]:
        ns, ds_name = self.settings.namespace, daemonset_name(name)
        recorded = recorded_privileged_nodes(daemonset)
        wanted_privileged = (privileged_nodes(recorded, self.reports.asking_privileged(name, uid))
                             if self.settings.agent_security_mode == AUTO else {})
        rendered = render_daemonset(name, uid, spec, self.settings, port, wanted_privileged)
        wanted = rendered["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        have = ((daemonset or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if not (roll or daemonset is None or have != wanted):
            events = await self._apply_privileged_agents(name, uid, spec, daemonset, recorded, roll=roll)
            return daemonset, None, events
        try:
            applied = await self._write_daemonset(rendered)
        except ApiFailure as e:
            if e.status not in (400, 422):
                raise
            # The API server refused what the spec rendered to: the spec is at fault.
            if daemonset is not None:
                await self._delete_daemonset(ds_name)
                await self._delete_daemonset(privileged_daemonset_name(name))
            return None, refused_message(name, e.message), []
        self.metrics.daemonset_applies.inc()
        events = await self._apply_privileged_agents(name, uid, spec, applied, recorded, roll=roll)
        if have is None:
            selector = selector_text(rendered["spec"]["template"]["spec"]["nodeSelector"])
            return applied, None, [scheduled_event(ns, ds_name, selector), *events]
        if have != wanted:
            return applied, None, [rolled_event(ns, ds_name), *events]
        return applied, None, events

    async def _apply_privileged_agents(self, name: str, uid: str, spec: RetransmitTraceSpec,
                                       daemonset: dict[str, Any], before: dict[str, str], *, roll: bool) -> list[Event]:
        """The auto mode's privileged DaemonSet, on the nodes the trace's DaemonSet records
        (privilege.py); deleted once that records none (the mode changed). Read each pass
        only while it has nodes: its agents count in nodesDesired."""
        ns, ds_name = self.settings.namespace, privileged_daemonset_name(name)
        nodes = recorded_privileged_nodes(daemonset)
        if not nodes:
            if before:
                await self._delete_daemonset(ds_name)
                log.info("trace %s: no node needs a privileged agent now; DaemonSet %s/%s deleted", name, ns, ds_name)
            return []
        current = await self._daemonset(ds_name)
        rendered = render_privileged_daemonset(name, uid, spec, self.settings, port_of(daemonset), nodes)
        wanted = rendered["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        have = ((current or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if current is not None and have == wanted and not roll:
            self._privileged_agents[name] = current
            return []
        self._privileged_agents[name] = await self._write_daemonset(rendered)
        self.metrics.daemonset_applies.inc()
        added = {node: reason for node, reason in nodes.items() if node not in before} if current is not None \
            else nodes
        if not added:
            return []
        log.info("trace %s: privileged agents on %s", name, ", ".join(sorted(added)))
        return [privileged_event(ns, ds_name, added)]

    def _ignored_events(self, uid: str, ignored: frozenset[str], trace: str) -> list[Event]:
        """A Warning for reports left out in two passes in a row (an agent pod the pod watch
        has not shown yet is not a squatter), once per node for this operator's lifetime."""
        before = self._suspects.get(uid, frozenset())
        self._suspects[uid] = ignored
        new = sorted(node for node in ignored & before if (uid, node) not in self._said_ignored)
        self._said_ignored.update((uid, node) for node in new)
        return [("Warning", IGNORED_REASON, ignored_message(new, self.settings.namespace, trace))] if new else []

    def _with_coverage(self, summary: Summary, name: str, spec: Optional[RetransmitTraceSpec],
                       daemonset: Optional[dict[str, Any]], desired: Optional[int],
                       current: Optional[RetransmitTraceStatus]) -> Summary:
        """The summary with the Linux nodes the trace misses, while its agents run; afterwards
        the last known coverage stays (the final result says what it did not see)."""
        if spec is None or daemonset is None or not self.nodes:
            previous = current.summary if current and current.summary else None
            if previous is None:
                return summary
            return summary.model_copy(update={"nodes_linux": previous.nodes_linux,
                                              "nodes_not_covered": previous.nodes_not_covered})
        running = frozenset(p.node for p in self.agent_pods.get(name, {}).values() if p.running)
        linux, missed = coverage(self.nodes.values(), agent_placement(spec, self.settings),
                                 running if desired is not None else None, name, self.settings.namespace)
        return summary.model_copy(update={"nodes_linux": linux, "nodes_not_covered": missed})

    async def _mark_departed(self, stored: list[Any], marked: frozenset[str], now: Any, bound: Any) -> frozenset[str]:
        """Mark (or unmark) the reports of nodes that left the trace, on the reports' status.
        Only while the trace runs: at completion the marks stay as they were, with the counts."""
        if not stored:
            return marked
        trace = stored[0].trace
        wanted = departed([r.entry for r in stored], marked, frozenset(p.node for p in self.agent_pods.get(trace, {}).values()),
                          now, bound)
        changes = [r for r in stored if (r.entry.node in wanted) != r.status.departed]
        # A bounded number of writes per pass, so the trace's own status stays current when
        # many nodes leave at once; the rest are written in the next passes (the rows and
        # the summary use `wanted` at once).
        for r in changes[:MAX_MARKS_PER_PASS]:
            is_gone = r.entry.node in wanted
            status = NodeReportStatus(departed=is_gone, departed_time=now if is_gone else None)
            await self.kube.apply_report_status(r.namespace, r.name, to_api(status))
            log.info("trace %s: node %s %s", trace, r.entry.node, "left the trace; its report keeps its counts"
                     if is_gone else "is back")
        return wanted

    def observe_agent_pod(self, pod: dict[str, Any], deleted: bool) -> None:
        """Which nodes run an agent of which trace (from the cluster-wide pod watch)."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        trace = labels.get(TRACE_LABEL)
        if not trace or any(labels.get(k) != v for k, v in agent_selector_labels(trace).items()):
            return
        if meta.get("namespace") != self.settings.namespace:
            return
        node = (pod.get("spec") or {}).get("nodeName")
        pods = self.agent_pods.setdefault(trace, {})
        if deleted or not node:
            pods.pop(meta.get("uid"), None)
        else:
            pods[meta.get("uid")] = AgentPod(node, (pod.get("status") or {}).get("phase") == "Running")
            self.agent_nodes_seen.setdefault(trace, set()).add(node)

    def observe_node(self, node: dict[str, Any], deleted: bool) -> None:
        """The cluster's Nodes (from a watch), for the coverage in each trace's summary."""
        facts = NodeFacts.from_object(node)
        old = self.nodes.pop(facts.name, None)
        for ip in old.addresses if old else ():
            self.node_addresses.pop(ip, None)
        if not deleted:
            self.nodes[facts.name] = facts
            self.node_addresses.update(dict.fromkeys(facts.addresses, facts.name))

    def _freshest(self, body: dict[str, Any]) -> dict[str, Any]:
        known = self.traces.get(body["metadata"]["name"])
        return known if known is not None and newer(known, body) else body

    async def sync_once(self) -> None:
        """One pass over every known trace, SYNC_CONCURRENCY traces at a time: one trace's
        slow API call (a large status write to a busy API server) does not hold the others'
        summaries back. One trace's failure does not stop the others."""
        started = time.monotonic()
        self._pass_daemonsets = {}
        self.places.begin_pass(started)
        gate = asyncio.Semaphore(SYNC_CONCURRENCY)

        async def one(name: str, body: dict[str, Any]) -> str:
            async with gate:
                try:
                    new = await self.reconcile(body, trigger="sync")
                    return str(new.phase) if new else "Unknown"
                except ApiFailure as e:
                    log.warning("trace %s: sync failed, retried next pass: %s", name, e)
                except Exception:   # counted as result="error" by reconcile()
                    log.exception("trace %s: sync failed, retried next pass", name)
                return ""   # failed: its DaemonSet was not read this pass

        results = await asyncio.gather(*(one(name, body) for name, body in list(self.traces.items())))
        phases: dict[str, int] = {}
        for phase in results:
            phases[phase or "Unknown"] = phases.get(phase or "Unknown", 0) + 1
        if all(results):   # every trace's DaemonSet read: the count may be shared
            try:
                await self.share_agent_count(list(self._pass_daemonsets.values()))
            except ApiFailure as e:
                log.warning("sharing the cluster's agent count failed, retried next pass: %s", e)
        self.metrics.set_traces(phases)
        self.metrics.pod_index_addresses.set(len(self.pods))
        self.metrics.sync_passes.inc()
        self.last_sync = time.monotonic()
        self.metrics.sync_pass_seconds.observe(self.last_sync - started)

    async def share_agent_count(self, read: list[dict[str, Any]]) -> None:
        """Write the cluster's agent count (every running trace's, together) on every agents'
        DaemonSet, where their agents read it for the shared write budget. From the DaemonSets
        this pass read anyway (one per running trace), so a quiet cluster costs no request;
        patches only when the count moved by more than AGENT_COUNT_TOLERANCE."""
        ns = self.settings.namespace
        daemonsets = [ds for ds in read if not (ds.get("metadata") or {}).get("deletionTimestamp")]
        count = shared_agent_count([annotated_agents(ds) for ds in daemonsets], cluster_agents(daemonsets))
        now = utcnow()
        for ds in daemonsets:
            written = annotated_agents(ds)
            if written == count:
                continue
            change: dict[str, Optional[str]] = {CLUSTER_AGENTS_ANNOTATION: str(count)}
            note = lowered_note(ds, count, now)
            if note is not None:
                change[AGENTS_LOWERED_ANNOTATION] = note
            self.daemonsets.record(await self.kube.annotate_daemonset(ns, ds["metadata"]["name"], change))
            log.info("DaemonSet %s/%s: the cluster's agents are %d (was %s)", ns, ds["metadata"]["name"], count, written)

    async def sync_forever(self) -> None:
        """A pass every sync interval (a longer pass is followed by a short pause, never a
        second interval: the lag from a node's write to the summary stays about one interval)."""
        while True:
            started = time.monotonic()
            await self.sync_once()
            await asyncio.sleep(max(0.2, self.settings.sync_interval - (time.monotonic() - started)))

    def observe_trace(self, event_type: Optional[str], body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        uid = body["metadata"].get("uid")
        if event_type == "DELETED":
            self._deleted.add(uid)
            self.traces.pop(name, None)
            self._locks.pop(name, None)
            self.agent_nodes_seen.pop(name, None)   # a new trace of this name starts unvouched
            self._suspects.pop(uid, None)
            return
        if uid in self._deleted:
            return
        known = self.traces.get(name)
        if known is None or not newer(known, body):
            self.traces[name] = dict(body)

    def healthy(self) -> bool:
        """The sync loop ran recently (it is the operator's heartbeat)."""
        if self.last_sync is None:
            return True  # still starting: readiness says so
        return time.monotonic() - self.last_sync < 10 * self.settings.sync_interval + 60


def _with_privileged(summary: Summary, daemonset: Optional[dict[str, Any]],
                     current: Optional[RetransmitTraceStatus]) -> Summary:
    """The summary with the nodes whose agents run privileged (auto mode), from the trace's
    DaemonSet while it exists; afterwards the last known list stays with the results."""
    if daemonset is None:
        previous = current.summary.privileged_nodes if current and current.summary else []
        return summary.model_copy(update={"privileged_nodes": previous})
    return summary.model_copy(update={"privileged_nodes": privileged_summary(recorded_privileged_nodes(daemonset))})
