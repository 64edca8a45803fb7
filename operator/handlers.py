"""kopf handlers: thin entry points into `Reconciler`, whose logic is the pure modules'
(render, aggregate, conditions, validation).

One level-triggered pass, `Reconciler.reconcile`, serves every trigger: a trace created,
resumed at operator start, its spec changed, and the periodic sync that aggregates the
agents' entries and ends the trace at startTime + duration. The periodic sync is our own
loop over the traces kopf's watch delivers, not a kopf timer: kopf puts a finalizer on
every object with a timer, and then deleting a trace would hang while the operator is down.
Here the trace has no finalizer; its DaemonSet goes by garbage collection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Any, Optional

import kopf
from pydantic import ValidationError

from . import kube as kube_module
from .aggregate import aggregate_summary, stale_nodes
from .api import GROUP, PLURAL, VERSION, NodeStatus, Phase, RetransmitTraceSpec, to_api
from .conditions import Observation, OperatorStatus, compute_status, is_due, transitions, utcnow
from .heartbeat import stale_after
from .kube import ApiFailure, KubeApi
from .metrics import OperatorMetrics
from .podindex import PodIndex
from .render import SPEC_HASH_ANNOTATION, daemonset_name, render_daemonset
from .settings import Settings
from .validation import validate_trace

log = logging.getLogger("retransmit_operator")

Event = tuple[str, str, str]  # Kubernetes Event: type, reason, message

OPERATOR_FIELDS = ("phase", "observedGeneration", "startTime", "completionTime", "conditions", "summary")


def operator_status(status: dict[str, Any]) -> Optional[OperatorStatus]:
    """The operator-owned part of a trace's status, or None when there is none (or it is unusable)."""
    owned = {k: status[k] for k in OPERATOR_FIELDS if k in status}
    if "phase" not in owned:
        return None
    try:
        return OperatorStatus.model_validate(owned)
    except ValidationError:
        return None


def node_entries(status: dict[str, Any]) -> list[NodeStatus]:
    """The agents' entries as far as aggregation needs them (recentEvents are the largest part
    and stay per node, so they are not parsed); one that does not parse is skipped (and
    logged), never fatal."""
    nodes = []
    for raw in status.get("nodes") or []:
        try:
            nodes.append(NodeStatus.model_validate({k: v for k, v in raw.items() if k != "recentEvents"}))
        except ValidationError as e:
            log.warning("status.nodes entry %r ignored: %s", raw.get("node"), e.errors()[:1])
    return nodes


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is a later version of the same object than b. resourceVersions are opaque; etcd's
    are increasing integers, and anything else (or another uid) counts as not newer."""
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    if ma.get("uid") != mb.get("uid"):
        return False
    try:
        return int(ma.get("resourceVersion")) > int(mb.get("resourceVersion"))
    except (TypeError, ValueError):
        return False


def desired_nodes(daemonset: Optional[dict[str, Any]]) -> Optional[int]:
    """desiredNumberScheduled once the DaemonSet controller has seen the current generation."""
    if not daemonset:
        return None
    status = daemonset.get("status") or {}
    if (status.get("observedGeneration") or 0) < (daemonset.get("metadata") or {}).get("generation", 0):
        return None
    return int(status.get("desiredNumberScheduled") or 0)


class Reconciler:
    """Holds what the operator knows between passes: the traces as last seen, the pod index."""

    def __init__(self, settings: Settings, kube: KubeApi, metrics: OperatorMetrics) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.pods = PodIndex()
        self.traces: dict[str, dict[str, Any]] = {}
        self._deleted: set[str] = set()  # uids: a late write response must not resurrect a trace
        self._locks: dict[str, asyncio.Lock] = {}
        self.last_sync: Optional[float] = None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def reconcile(self, body: dict[str, Any], *, trigger: str, roll: bool = False) -> Optional[OperatorStatus]:
        """Bring one trace's DaemonSet and operator-owned status in line with its spec and time.

        roll=True applies the rendered DaemonSet even when it looks current (create, resume,
        spec change); otherwise it is applied only when missing or out of date.
        """
        name = body["metadata"]["name"]
        started = time.monotonic()
        result = "ok"
        try:
            async with self._lock(name):
                return await self._reconcile(body, roll=roll)
        except ApiFailure:
            result = "api_error"
            raise
        finally:
            self.metrics.reconciles.labels(trigger=trigger, result=result).inc()
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    async def _reconcile(self, body: dict[str, Any], *, roll: bool) -> OperatorStatus:
        body = self._freshest(body)
        meta = body["metadata"]
        name, uid, generation = meta["name"], meta["uid"], meta.get("generation")
        if meta.get("deletionTimestamp"):
            # Being deleted (foreground deletion waits for the DaemonSet): recreate nothing.
            return operator_status(body.get("status") or {}) or OperatorStatus(phase=Phase.PENDING)
        status = body.get("status") or {}
        current = operator_status(status)
        if current is not None and current.phase == Phase.FAILED and current.observed_generation == generation:
            return current  # failed for this very spec: nothing to retry until the spec changes
        nodes = await asyncio.to_thread(node_entries, status)  # CPU-bound at 1,000 nodes: off the loop
        spec, spec_error = validate_trace(name, body.get("spec"))
        now = utcnow()
        start = current.start_time if current else None
        completion = current.completion_time if current else None
        ns, ds_name = self.settings.namespace, daemonset_name(name)
        daemonset: Optional[dict[str, Any]] = None
        events: list[Event] = []

        if spec_error is not None:
            if await self.kube.delete_daemonset(ns, ds_name):
                log.info("trace %s: spec invalid, DaemonSet %s/%s deleted", name, ns, ds_name)
        elif completion is None and is_due(start, spec.duration_seconds, now):
            # The end: agents get SIGTERM and flush a final report; the summary keeps following.
            await self.kube.delete_daemonset(ns, ds_name)
            completion = now
        elif completion is None:
            daemonset, spec_error, events = await self._ensure_daemonset(name, uid, spec, roll=roll)
            if start is None and spec_error is None:
                start = now

        desired = desired_nodes(daemonset)
        previous_desired = current.summary.nodes_desired if current and current.summary else 0
        nodes_desired = desired if desired is not None else previous_desired
        bound = None if completion or spec is None else self._stale_after(spec, nodes_desired)
        summary = aggregate_summary(
            nodes,
            nodes_desired=nodes_desired,
            top_n=spec.top_flows if spec else 10,
            pod_index=self.pods,
            now=now,
            stale_after=bound,
        )
        observation = Observation(
            generation=generation, spec_error=spec_error, start_time=start, completion_time=completion,
            nodes=nodes, summary=summary, now=now,
            nodes_desired_known=desired is not None or daemonset is None,
            stale_nodes=stale_nodes(nodes, now, bound), stale_after=bound,
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

    async def _ensure_daemonset(self, name: str, uid: str, spec: RetransmitTraceSpec, *, roll: bool
                                ) -> tuple[Optional[dict[str, Any]], Optional[str], list[Event]]:
        """The trace's agents as its spec says: (DaemonSet, why the spec cannot run, events)."""
        ns, ds_name = self.settings.namespace, daemonset_name(name)
        daemonset = await self.kube.get_daemonset(ns, ds_name)
        rendered = render_daemonset(name, uid, spec, self.settings)
        wanted = rendered["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        have = ((daemonset or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if not (roll or daemonset is None or have != wanted):
            return daemonset, None, []
        try:
            applied = await self.kube.apply_daemonset(rendered)
        except ApiFailure as e:
            if e.status not in (400, 422):
                raise
            # The API server refused what the spec rendered to (a toleration key, say, which
            # only Pod validation checks): the spec is at fault. Its fields keep their names in
            # the pod template, so the message points at the trace's own field.
            if daemonset is not None:
                await self.kube.delete_daemonset(ns, ds_name)
            detail = e.message.replace("spec.template.spec.", "spec.")
            return None, f"the agents' DaemonSet was refused by the API server: {detail}", []
        self.metrics.daemonset_applies.inc()
        if have is None:
            selector = sorted(rendered["spec"]["template"]["spec"]["nodeSelector"].items())
            return applied, None, [("Normal", "AgentsScheduled",
                                    f"DaemonSet {ns}/{ds_name} created: one agent per node matching {selector}")]
        if have != wanted:
            return applied, None, [("Normal", "AgentsUpdated", f"DaemonSet {ns}/{ds_name} rolled to the new spec")]
        return applied, None, []

    def _stale_after(self, spec: RetransmitTraceSpec, nodes_desired: int) -> timedelta:
        """How long an entry may go unwritten before its node stops counting as reporting: the
        heartbeat bound of the agents' interval (stretched by the write budget, as they do it)."""
        return stale_after(max(spec.report_interval_seconds, nodes_desired / self.settings.max_writes_per_second))

    def _freshest(self, body: dict[str, Any]) -> dict[str, Any]:
        known = self.traces.get(body["metadata"]["name"])
        return known if known is not None and _newer(known, body) else body

    async def sync_once(self) -> None:
        """One pass over every known trace; one trace's failure does not stop the others."""
        phases: dict[str, int] = {}
        for name, body in list(self.traces.items()):
            try:
                new = await self.reconcile(body, trigger="sync")
                phase = str(new.phase) if new else "Unknown"
            except ApiFailure as e:
                log.warning("trace %s: sync failed, retried next pass: %s", name, e)
                phase = "Unknown"
            except Exception:
                log.exception("trace %s: sync failed, retried next pass", name)
                self.metrics.reconciles.labels(trigger="sync", result="error").inc()
                phase = "Unknown"
            phases[phase] = phases.get(phase, 0) + 1
        self.metrics.set_traces(phases)
        self.metrics.pod_index_addresses.set(len(self.pods))
        self.last_sync = time.monotonic()

    async def sync_forever(self) -> None:
        while True:
            await self.sync_once()
            await asyncio.sleep(self.settings.sync_interval)

    def observe_trace(self, event_type: Optional[str], body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        uid = body["metadata"].get("uid")
        if event_type == "DELETED":
            self._deleted.add(uid)
            self.traces.pop(name, None)
            self._locks.pop(name, None)
            return
        if uid in self._deleted:
            return
        known = self.traces.get(name)
        if known is None or not _newer(known, body):
            self.traces[name] = dict(body)

    def healthy(self) -> bool:
        """The sync loop ran recently (it is the operator's heartbeat)."""
        if self.last_sync is None:
            return True  # still starting: readiness says so
        return time.monotonic() - self.last_sync < 10 * self.settings.sync_interval + 60


def register_handlers(registry: kopf.OperatorRegistry, settings: Settings,
                      kube: Optional[KubeApi] = None, metrics: Optional[OperatorMetrics] = None) -> Reconciler:
    """Wire the operator into `registry`; returns the Reconciler (its state is inspectable)."""
    metrics = metrics or OperatorMetrics()
    kube = kube or KubeApi(kube_module.client_configuration(settings.kubeconfig), metrics)
    reconciler = Reconciler(settings, kube, metrics)
    tasks: list[asyncio.Task[Any]] = []
    trace = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)

    @kopf.on.login(registry=registry, id="login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube_module.connection_info(kube.cfg)

    @kopf.on.startup(registry=registry, id="start-sync")
    async def startup(**_: Any) -> None:
        tasks.append(asyncio.create_task(reconciler.sync_forever(), name="rtrace-sync"))
        if settings.metrics_port:
            tasks.append(asyncio.create_task(metrics.serve(settings.metrics_port, reconciler), name="rtrace-http"))
        log.info("operator started: agents in namespace %s, image %s, security mode %s",
                 settings.namespace, settings.agent_image, settings.agent_security_mode)

    @kopf.on.cleanup(registry=registry, id="stop-sync")
    async def cleanup(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await metrics.stop()

    async def apply(body: kopf.Body, trigger: str) -> None:
        reconciler.observe_trace(None, dict(body))
        try:
            await reconciler.reconcile(dict(body), trigger=trigger, roll=True)
        except ApiFailure as e:
            if e.permanent:
                # Retrying the same request cannot help (RBAC, say): log it, the sync loop tries later.
                log.error("trace %s: %s", body["metadata"]["name"], e)
                return
            raise kopf.TemporaryError(str(e), delay=5)

    @kopf.on.create(**trace, id="create")
    async def on_create(body: kopf.Body, **_: Any) -> None:
        await apply(body, "create")

    @kopf.on.resume(**trace, id="resume")
    async def on_resume(body: kopf.Body, **_: Any) -> None:
        await apply(body, "resume")

    @kopf.on.update(**trace, field="spec", id="spec")
    async def on_spec_change(body: kopf.Body, **_: Any) -> None:
        await apply(body, "update")

    @kopf.on.event(**trace, id="trace-cache")
    def on_trace_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.observe_trace(event.get("type"), event["object"])

    @kopf.on.event("", "v1", "pods", registry=registry, id="pod-index")
    def on_pod_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.pods.observe(event["object"], deleted=event.get("type") == "DELETED")

    return reconciler


def kopf_settings(settings: Settings) -> kopf.OperatorSettings:
    """kopf's own knobs: progress and diff-base in annotations (status belongs to the API),
    no kopf events (ours go where kubectl describe finds them), no CRD scanning (no RBAC for it)."""
    s = kopf.OperatorSettings()
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    s.posting.enabled = False
    s.scanning.disabled = True
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.watching.connect_timeout = 30
    s.networking.request_timeout = 60
    s.execution.max_workers = 4
    s.queueing.error_delays = (1, 2, 5, 10, 30, 60)
    return s
