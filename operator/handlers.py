"""kopf handlers: registration only. Each handler is a one-line entry point into
`Reconciler` (reconciler.py), whose logic is the pure modules'.

`register_handlers(registry, settings)` wires one operator into an explicit kopf registry
(tests embed the operator with injected settings); `kopf_settings` holds kopf's own knobs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Optional

import kopf

from retransmit_core.api import GROUP, PLURAL, VERSION

from . import kube as kube_module
from .kube import ApiFailure, KubeApi
from .metrics import OperatorMetrics
from .reconciler import Reconciler
from .settings import Settings

log = logging.getLogger("retransmit_operator")


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

    # One stop flag per leadership term: a replica that stood by again and leads anew starts
    # fresh watch threads, while the last term's end at their next wake-up.
    stop_watch = [threading.Event()]

    @kopf.on.startup(registry=registry, id="start-sync")
    async def startup(**_: Any) -> None:
        # The nodes' reports, their heartbeat Leases and the agents' DaemonSets: one
        # label-selected watch of each kind in the operator's namespace, each in its own thread.
        # The DaemonSets, reports and Leases as a last term saw them may have changed since
        # (another replica led): passes read the DaemonSets from the API server, and wait for
        # the reports and Leases, until the new watches have listed them.
        stop_watch[0] = threading.Event()
        reconciler.reports.reset()
        reconciler.daemonsets.reset()
        for watch, into, thread in ((kube.watch_reports, reconciler.reports, "rtrace-report-watch"),
                                    (kube.watch_heartbeats, reconciler.reports, "rtrace-heartbeat-watch"),
                                    (kube.watch_daemonsets, reconciler.daemonsets, "rtrace-daemonset-watch")):
            threading.Thread(target=watch, args=(settings.namespace, into, stop_watch[0]),
                             name=thread, daemon=True).start()
        tasks.append(asyncio.create_task(reconciler.sync_forever(), name="rtrace-sync"))
        log.info("operator started: agents in namespace %s, image %s, security mode %s",
                 settings.namespace, settings.agent_image, settings.agent_security_mode)

    @kopf.on.cleanup(registry=registry, id="stop-sync")
    async def cleanup(**_: Any) -> None:
        stop_watch[0].set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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

    @kopf.on.event("", "v1", "nodes", registry=registry, id="node-index")
    def on_node_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.observe_node(event["object"], deleted=event.get("type") == "DELETED")

    @kopf.on.event("", "v1", "services", registry=registry, id="service-index")
    def on_service_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.services.observe(event["object"], deleted=event.get("type") == "DELETED")

    @kopf.on.event("", "v1", "pods", registry=registry, id="pod-index")
    def on_pod_event(event: kopf.RawEvent, **_: Any) -> None:
        reconciler.pods.observe(event["object"], deleted=event.get("type") == "DELETED")
        reconciler.observe_agent_pod(event["object"], deleted=event.get("type") == "DELETED")

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
