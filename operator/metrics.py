"""The operator's HTTP endpoints: Prometheus /metrics, /healthz (liveness), /readyz (readiness).

Each operator instance has its own registry, so several can live in one process (tests).

Metrics:
- rtrace_operator_reconciles_total{trigger,result}: passes over a trace (create, resume,
  update, sync) and how they ended (ok, api_error, error).
- rtrace_operator_reconcile_seconds: time per pass over one trace.
- rtrace_operator_sync_pass_seconds: time per sync pass over every trace (the traces run
  concurrently; a busy node's write waits up to one pass plus the sync interval).
- rtrace_operator_gc_pause_seconds: the Python garbage collector's pauses while /metrics is
  served. Every thread stops for them; a full collection goes over every object the operator
  holds (millions with 25,000 reports), so a long one shows as summary lag.
- rtrace_operator_status_writes_total: server-side applies of a trace's status (only when
  something changed).
- rtrace_operator_daemonset_applies_total: DaemonSet creations and rolls.
- rtrace_operator_events_total{reason}: Kubernetes Events posted.
- rtrace_operator_traces{phase}: traces by phase at the last sync.
- rtrace_operator_pod_index_addresses: pod IPs known for remote attribution.
- rtrace_operator_api_requests_total{operation,code}: the operator's own API requests (kopf's
  watches and annotation patches aside).
"""

from __future__ import annotations

import gc
import time
from typing import Optional, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PHASES = ("Pending", "Running", "Completed", "Failed", "Unknown")
# Every (trigger, result) of rtrace_operator_reconciles_total exists from the start at 0, so
# an error rate is 0 (not "no data") until the first error and alerts and dashboards need no
# `or vector(0)`.
RECONCILE_TRIGGERS = ("create", "resume", "update", "sync")
RECONCILE_RESULTS = ("ok", "api_error", "error")
PASS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
GC_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class Liveness(Protocol):
    """What /healthz and /readyz read (the Reconciler is one): this module imports nothing
    of the operator's, so the metrics sit below everything that counts into them."""

    last_sync: Optional[float]

    def healthy(self) -> bool: ...


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("rtrace_operator_reconciles", "Passes over a trace", ["trigger", "result"], registry=r)
        self.reconcile_seconds = Histogram("rtrace_operator_reconcile_seconds", "Time per pass over a trace", registry=r)
        self.status_writes = Counter("rtrace_operator_status_writes", "Server-side applies of trace status", registry=r)
        self.daemonset_applies = Counter("rtrace_operator_daemonset_applies", "DaemonSet creations and rolls", registry=r)
        self.events = Counter("rtrace_operator_events", "Kubernetes Events posted", ["reason"], registry=r)
        self.traces = Gauge("rtrace_operator_traces", "Traces by phase at the last sync", ["phase"], registry=r)
        self.sync_passes = Counter("rtrace_operator_sync_passes", "Completed passes over every known trace", registry=r)
        self.sync_pass_seconds = Histogram("rtrace_operator_sync_pass_seconds", "Time per sync pass over every trace",
                                           buckets=PASS_BUCKETS, registry=r)
        self.gc_pause_seconds = Histogram("rtrace_operator_gc_pause_seconds", "Python garbage collector pauses",
                                          buckets=GC_BUCKETS, registry=r)
        self._gc_started: Optional[float] = None
        self.api_requests = Counter("rtrace_operator_api_requests", "Kubernetes API requests (not kopf's watches)",
                                    ["operation", "code"], registry=r)
        self.pod_index_addresses = Gauge("rtrace_operator_pod_index_addresses", "Pod IPs in the attribution index", registry=r)
        for trigger in RECONCILE_TRIGGERS:
            for result in RECONCILE_RESULTS:
                self.reconciles.labels(trigger=trigger, result=result)
        self._runner: Optional[web.AppRunner] = None

    def set_traces(self, by_phase: dict[str, int]) -> None:
        for phase in PHASES:
            self.traces.labels(phase=phase).set(by_phase.get(phase, 0))

    def _gc_phase(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pause_seconds.observe(time.perf_counter() - self._gc_started)
            self._gc_started = None

    async def serve(self, port: int, reconciler: Liveness, host: str = "0.0.0.0") -> None:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            ok = reconciler.healthy()
            return web.Response(status=200 if ok else 500, text="ok\n" if ok else "sync loop stalled\n")

        async def readyz(_: web.Request) -> web.Response:
            ready = reconciler.last_sync is not None
            return web.Response(status=200 if ready else 503, text="ready\n" if ready else "starting\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        gc.callbacks.append(self._gc_phase)

    async def stop(self) -> None:
        if self._gc_phase in gc.callbacks:
            gc.callbacks.remove(self._gc_phase)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
