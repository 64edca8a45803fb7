"""Control-plane figures: one trace on a real kube-apiserver + etcd with N simulated nodes
each writing its own RetransmitNodeReport the way the agent does, and the real operator
aggregating them into the trace's status.

- Simulated nodes: bench.synthetic (the agent's report code on synthetic kernel counters),
  written with the agent's ReportWriter (create, then server-side apply, field manager per
  node; heartbeat Lease renewals) on the agent's own write decision (retransmit_agent
  .writeschedule.decide_write): every reportInterval (10 s, jittered) a node wakes up and writes its report
  when it changed and its report period passed (the interval, stretched beyond 1,000 nodes),
  else renews its heartbeat Lease when a heartbeat is due. BUSY_FRACTION of the nodes (every
  10th) retransmit between every two wake-ups; the others are quiet and only renew Leases.
- The operator: `retransmit-operator` as a subprocess at its default settings (sync every
  2 s), admin credentials, one label-selected watch on the reports.
- For N in 100, 1000, 5000: the reports not there yet are created (16 at a time), then for
  a window the nodes run their schedule. Measured: write requests/s and request bytes/s to
  reports, Leases and the trace (the API server's own metrics), API server CPU, the trace
  object's size, each node's freshness at the end (now - the later of its report's
  lastReportTime and its Lease's renewTime), the gaps between a busy node's report writes,
  and the operator's lag from a busy node's write (request sent) to the first summary that
  includes it (seen on a watch).
- operator_reconcile_s: `kubectl apply -f trace.yaml` started -> the DaemonSet exists.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from bench import procstat
from bench.synthetic import SyntheticNode
from retransmit_agent.reportwriter import ApiError, ReportTarget, ReportWriter
from retransmit_agent.writeschedule import WriteTimes, decide_write
from retransmit_core.backoff import jittered
from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION, to_api
from retransmit_core.schedule import (
    LEASE_RENEWALS_PER_SECOND,
    REPORT_WRITES_PER_SECOND,
    Write,
    bound_agents,
    heartbeat_seconds,
    report_period,
    stale_after,
)
from retransmit_operator.reportindex import ReportIndex
from retransmit_core.naming import (
    CLUSTER_AGENTS_ANNOTATION,
    LEASE_GROUP,
    LEASE_PLURAL,
    LEASE_VERSION,
    daemonset_name,
    trace_selector,
)
from tests.harness.controlplane import ControlPlane, end_process, free_port, start_process, wait_until

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = Path(os.environ.get("RTRACE_CACHE") or Path.home() / ".cache" / "retransmit-operator") / "bin" / "kubectl"
OPERATOR = Path(sys.executable).parent / "retransmit-operator"
SPEC_REPORT_INTERVAL = 10.0   # spec.reportInterval default
COUNTS = (100, 1000, 5000)    # simulated nodes on one trace
BUSY_FRACTION = 0.1           # nodes whose counts change between every two reports
WRITERS = 16                  # threads sending the simulated agents' requests


# ---------------------------------------------------------------- helpers

def _ssa(api: Any, body: dict) -> None:
    import kubernetes.dynamic

    dyn = kubernetes.dynamic.DynamicClient(api)
    resource = dyn.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    resource.server_side_apply(body=body, name=body["metadata"]["name"], namespace=body["metadata"].get("namespace"),
                               field_manager="rtrace-bench", force_conflicts=True)


def install_crd(api: Any) -> None:
    import kubernetes

    ext = kubernetes.client.ApiextensionsV1Api(api)
    for path, plural in (("crd.yaml", PLURAL), ("crd-nodereports.yaml", REPORT_PLURAL)):
        _ssa(api, yaml.safe_load((ROOT / "manifests" / path).read_text()))
        wait_until(lambda: any(c.type == "Established" and c.status == "True"
                               for c in ext.read_custom_resource_definition(f"{plural}.{GROUP}").status.conditions or []),
                   f"the CRD {plural} to be established")


def apiserver_counters(api: Any, resource: str) -> dict[str, float]:
    """Write requests to `resource` and their body bytes, from the API server's /metrics."""
    # Admin credentials are a client certificate, which the connection pool carries.
    text = api.call_api("GET", api.configuration.host + "/metrics").read().decode()
    return parse_write_metrics(text, resource)


WRITE_VERBS = {"apply", "patch", "update", "create"}


def parse_write_metrics(text: str, resource: str = PLURAL) -> dict[str, float]:
    """Sum apiserver_request_total and apiserver_request_body_size_bytes_sum over write
    verbs on `resource` (any subresource) from Prometheus text."""
    out = {"requests": 0.0, "body_bytes": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not re.search(rf'resource="{resource}(\.{re.escape(GROUP)})?"', line):
            continue
        verb = re.search(r'verb="([A-Za-z]+)"', line)
        if not verb or verb.group(1).lower() not in WRITE_VERBS:
            continue
        name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
        if name == "apiserver_request_total":
            out["requests"] += value
        elif name == "apiserver_request_body_size_bytes_sum":
            out["body_bytes"] += value
    return out


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespace: str, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RTRACE_NAMESPACE": namespace,
               "RTRACE_METRICS_PORT": str(self.port), "RTRACE_LOG_LEVEL": "WARNING",
               "RTRACE_AGENT_COMMAND": f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(1e9)'"}
        # Ends with this process (PR_SET_PDEATHSIG) even when the bench is killed.
        self.proc = start_process([str(OPERATOR)], log, env=env)
        wait_until(self._ready, "the operator's /readyz", timeout=120)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """The operator's own unlabelled series (pass counts and times) and its histograms'
        buckets (as name{le}), from its /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {s.name + (f"{{{s.labels['le']}}}" if s.labels else ""): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples
                if not s.labels or set(s.labels) == {"le"}}

    def stop(self) -> None:
        end_process(self.proc, grace=30)


def operator_window(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the operator did between two reads of its /metrics: its sync passes, one trace's
    reconcile (the mean), and the garbage collector's pauses (every thread stops for them)."""
    delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    out: dict[str, Any] = {}
    for key, series in (("operator_pass_mean_s", "rtrace_operator_reconcile_seconds"),
                        ("operator_sync_pass_mean_s", "rtrace_operator_sync_pass_seconds")):
        if delta(f"{series}_count"):
            out[key] = delta(f"{series}_sum") / delta(f"{series}_count")
    out["operator_sync_passes_over_2s"] = delta("rtrace_operator_sync_pass_seconds_count") - delta(
        "rtrace_operator_sync_pass_seconds_bucket{2.0}")
    out["operator_gc_pause_s"] = delta("rtrace_operator_gc_pause_seconds_sum")
    out["operator_gc_pauses_over_0.5s"] = delta("rtrace_operator_gc_pause_seconds_count") - delta(
        "rtrace_operator_gc_pause_seconds_bucket{0.5}")
    return out


def _watch_summaries(kubeconfig: str, trace: str, out: Any, stop: Any) -> None:
    """In its own process: put (time received, summary.retransmits) of every version of the
    trace on `out`. Its own process, so the load generator's threads never delay it."""
    import kubernetes

    custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=kubeconfig))
    while not stop.is_set():
        w = kubernetes.watch.Watch()
        try:
            for event in w.stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                  field_selector=f"metadata.name={trace}", timeout_seconds=30):
                summary = ((event["object"].get("status") or {}).get("summary") or {})
                out.put((time.monotonic(), int(summary.get("retransmits") or 0)))
                if stop.is_set():
                    break
        except Exception:  # noqa: BLE001 - a dropped watch is re-opened
            time.sleep(0.2)
        finally:
            w.stop()


class SummaryWatch:
    """A watch on one trace (in a child process), recording (time received,
    summary.retransmits) of every version. time.monotonic() is the same clock in both
    processes (CLOCK_MONOTONIC)."""

    def __init__(self, kubeconfig: Path, trace: str) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.seen: list[tuple[float, int]] = []
        self._queue, self._stop = ctx.Queue(), ctx.Event()
        self._proc = ctx.Process(target=_watch_summaries, args=(str(kubeconfig), trace, self._queue, self._stop),
                                 daemon=True)
        self._proc.start()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self.seen.append(item)

    def first_at_least(self, total: int, after: float) -> Optional[float]:
        for at, value in list(self.seen):
            if at >= after and value >= total:
                return at
        return None

    def stop(self) -> None:
        self._stop.set()
        self._proc.terminate()
        self._proc.join(10)
        self._queue.put(None)


def trace_manifest(name: str) -> str:
    return yaml.safe_dump({"apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace",
                           "metadata": {"name": name}, "spec": {}})


def measure_reconcile(cp: ControlPlane, apps: Any, namespace: str, name: str, workdir: Path) -> float:
    """Seconds from starting `kubectl apply -f` to the trace's DaemonSet existing."""
    from kubernetes.client.exceptions import ApiException

    path = workdir / f"{name}.yaml"
    path.write_text(trace_manifest(name))

    def exists() -> bool:
        try:
            apps.read_namespaced_daemon_set(f"rtrace-{name}", namespace)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    started = time.monotonic()
    subprocess.run([str(KUBECTL), "apply", "-f", str(path)], env=cp.env(), check=True, capture_output=True)
    wait_until(exists, f"DaemonSet rtrace-{name}", timeout=60, interval=0.01)
    return time.monotonic() - started


def object_sizes(obj: dict) -> dict[str, int]:
    compact = lambda x: len(json.dumps(x, separators=(",", ":")))  # noqa: E731
    meta = obj.get("metadata") or {}
    return {"object": compact(obj), "status": compact(obj.get("status") or {}),
            "managed_fields": compact(meta.get("managedFields") or [])}


# ---------------------------------------------------------------- the run

@dataclass
class BenchCluster:
    cp: ControlPlane
    admin: Any
    custom: Any
    apps: Any
    namespace: str
    operator: OperatorProcess
    workdir: Path


@contextmanager
def bench_cluster() -> Iterator[BenchCluster]:
    """etcd + kube-apiserver (no controllers), both CRDs, a namespace and the real operator."""
    import kubernetes

    workdir = Path(tempfile.mkdtemp(prefix="rtrace-bench-"))   # the operator's log
    with ControlPlane(controllers=False) as cp:
        admin = cp.api_client()
        install_crd(admin)
        namespace = f"rtrace-bench-{uuid.uuid4().hex[:6]}"
        kubernetes.client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
        operator = OperatorProcess(cp.kubeconfig, namespace, workdir / "operator.log")
        try:
            yield BenchCluster(cp, admin, kubernetes.client.CustomObjectsApi(admin), kubernetes.client.AppsV1Api(admin),
                               namespace, operator, workdir)
        finally:
            operator.stop()
            admin.close()
            if not os.environ.get("RTRACE_KEEP_CLUSTER"):
                shutil.rmtree(workdir, ignore_errors=True)


def run(counts=COUNTS, window: float = 60.0, log=print) -> dict:
    results: dict[str, Any] = {"scale": []}
    with bench_cluster() as bc:
        times = [measure_reconcile(bc.cp, bc.apps, bc.namespace, f"bench-{i}", bc.workdir) for i in range(3)]
        results["operator_reconcile_s"] = sorted(times)[1]
        results["operator_reconcile_samples_s"] = times
        log(f"operator reconcile (kubectl apply -> DaemonSet): {', '.join(f'{t:.3f}' for t in times)} s")
        for i in (1, 2):
            bc.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, f"bench-{i}")
        apiserver = bc.cp.component("kube-apiserver").proc.pid
        results.update(scale(bc.admin, bc.custom, apiserver, "bench-0", bc.namespace, counts, window, log,
                             bc.cp.kubeconfig, bc.operator.metrics))
    return results


def run_shared(traces: int = 5, nodes: int = 5000, window: float = 60.0, log=print) -> dict:
    """`traces` traces running at once, each on the same `nodes` simulated nodes: the agents of
    all of them follow one cluster-wide budget. No DaemonSet controller runs here, so the bench
    sets each DaemonSet's status as the controller would (`nodes` desired); the real operator
    writes the cluster's count on every DaemonSet (retransmit.dev/cluster-agents) and the
    simulated agents read it with the agent's own ReportWriter.desired_nodes (once per trace,
    on behalf of its agents, instead of once per agent)."""
    out: dict[str, Any] = {"traces": traces, "nodes_per_trace": nodes, "busy_fraction": BUSY_FRACTION,
                           "report_interval_s": SPEC_REPORT_INTERVAL,
                           "report_writes_budget_per_second": REPORT_WRITES_PER_SECOND,
                           "lease_renewals_budget_per_second": LEASE_RENEWALS_PER_SECOND}
    with bench_cluster() as bc:
        cp, admin, custom, apps, namespace, operator = bc.cp, bc.admin, bc.custom, bc.apps, bc.namespace, bc.operator
        watches: list[SummaryWatch] = []
        try:
            names = [f"bench-{i}" for i in range(traces)]
            for name in names:
                measure_reconcile(cp, apps, namespace, name, bc.workdir)
                # The count as the DaemonSet controller would report it, without observedGeneration:
                # no agent pods exist here, so the operator must not judge nodes departed (as in the
                # one-trace run, whose DaemonSet has no status at all); it sums the raw counts.
                apps.patch_namespaced_daemon_set_status(daemonset_name(name), namespace, {"status": {
                    "desiredNumberScheduled": nodes, "currentNumberScheduled": nodes, "numberReady": nodes,
                    "numberMisscheduled": 0}})

            def annotated() -> Optional[set]:
                found = {(d.metadata.annotations or {}).get(CLUSTER_AGENTS_ANNOTATION)
                         for d in apps.list_namespaced_daemon_set(namespace).items}
                return found if found == {str(traces * nodes)} else None
            out["daemonset_annotations"] = sorted(wait_until(annotated, "the operator's cluster-wide count on every "
                                                             "DaemonSet", timeout=60))
            uids = {name: custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)["metadata"]["uid"] for name in names}
            groups = []
            for t, name in enumerate(names):
                sims = [SyntheticNode(f"node-{i:04d}", seed=t * nodes + i) for i in range(nodes)]
                writers = [ReportWriter(admin, ReportTarget(name, uids[name], n.name, namespace), timeout=30) for n in sims]
                watch = SummaryWatch(cp.kubeconfig, name)
                watches.append(watch)
                groups.append((watch, sims, writers))
            read = {writers[0].desired_nodes() for _, _, writers in groups}
            assert len(read) == 1, f"the traces' agents read different counts: {read}"
            agents = read.pop() or 0
            out["agents_read"] = agents
            started = time.monotonic()
            errors = []
            for _, sims, writers in groups:
                errors += create_reports(writers, sims)
            out.update(create_s=round(time.monotonic() - started, 2), create_errors=len(errors), create_error_sample=errors[:3])
            log(f"{traces} x {nodes} nodes: reports created in {out['create_s']} s ({len(errors)} errors)")
            settle(custom, names[0])
            for watch, sims, _ in groups:
                expected = sum(n.retransmits for n in sims)
                try:
                    wait_until(lambda: watch.first_at_least(expected, 0.0) is not None,
                               "the summary to include every node", timeout=300)
                except TimeoutError as e:
                    out["summary_wait_error"] = str(e)
            passes_before = operator.metrics()
            # Everything else on the machine's cores during the window: etcd, the operator, and
            # this process (the simulated agents' requests, which on a cluster run on their nodes).
            others = {"etcd": cp.component("etcd").proc.pid, "operator": operator.proc.pid, "bench": os.getpid()}
            out.update(shared_window(admin, cp.component("kube-apiserver").proc.pid, groups, window, agents, others))
            out.update(operator_window(passes_before, operator.metrics()))
            now = datetime.now(timezone.utc)
            ages, bounds = [], set()
            for name in names:
                ages += freshness(custom, namespace, name, uids[name])
                ds = apps.api_client.sanitize_for_serialization(apps.read_namespaced_daemon_set(daemonset_name(name), namespace))
                bounds.add(stale_after(SPEC_REPORT_INTERVAL, bound_agents(ds, SPEC_REPORT_INTERVAL, now)).total_seconds())
            out.update(report_age_p50_s=procstat.percentile(ages, 50), report_age_p99_s=procstat.percentile(ages, 99),
                       report_age_max_s=max(ages) if ages else None, reports=len(ages),
                       operator_stale_after_s=sorted(bounds))
            out["writes_per_second"] = out["report_writes_per_second"] + out["lease_writes_per_second"]
            log(f"{traces} x {nodes} nodes ({agents} agents read): {out['writes_per_second']:.1f} writes/s to reports "
                f"({out['report_writes_per_second']:.1f}) and Leases ({out['lease_writes_per_second']:.1f}), "
                f"{out['agent_writes_failed']}/{out['agent_writes']} failed, API server {out['apiserver_cpu_percent']:.0f}% CPU, "
                f"lag p50 {out['aggregation_lag_p50_s']:.2f} s p99 {out['aggregation_lag_p99_s']:.2f} s "
                f"({out['aggregation_lag_samples']} samples; after the write p99 {out['aggregation_lag_after_write_p99_s']:.2f} s), "
                f"sync pass {out.get('operator_sync_pass_mean_s', float('nan')):.2f} s "
                f"({out['operator_sync_passes_over_2s']:.0f} over 2 s), GC pauses {out['operator_gc_pause_s']:.1f} s "
                f"({out['operator_gc_pauses_over_0.5s']:.0f} over 0.5 s), "
                f"operator {out['operator_cpu_percent']:.0f}%, etcd {out['etcd_cpu_percent']:.0f}%, "
                f"bench {out['bench_cpu_percent']:.0f}% CPU, operator pass {out.get('operator_pass_mean_s', float('nan')):.2f} s, "
                f"report age max {out['report_age_max_s']:.1f} s (bound {sorted(bounds)} s)")
        finally:
            for watch in watches:
                watch.stop()
    return out


def create_reports(writers: list[ReportWriter], nodes: list[SyntheticNode]) -> list[str]:
    """Each node's report created with its first content (16 at a time); the errors."""
    def create(pair) -> str:
        writer, node = pair
        try:
            writer.create(node.next_entry())
            return ""
        except ApiError as e:
            return f"{node.name}: {e}"[:300]
    with ThreadPoolExecutor(WRITERS) as pool:
        return [e for e in pool.map(create, zip(writers, nodes)) if e]


def settle(custom: Any, trace: str, timeout: float = 120.0) -> None:
    """Wait until a read of the trace is quick again (a saturated API server drains its backlog)."""
    def quick() -> bool:
        started = time.monotonic()
        custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace, _request_timeout=30)
        return time.monotonic() - started < 1.0
    try:
        wait_until(quick, "the API server to answer within 1 s", timeout=timeout, interval=2.0)
    except TimeoutError:
        pass


def freshness(custom: Any, namespace: str, trace: str, uid: str) -> list[float]:
    """Seconds since each node last said its report is current, now, as the operator reads it
    (its ReportIndex: the later of lastReportTime and the heartbeat Lease's renewTime)."""
    index = ReportIndex()
    for plural, group, version, heartbeats, fill in (
            (REPORT_PLURAL, GROUP, VERSION, False, index.replace),
            (LEASE_PLURAL, LEASE_GROUP, LEASE_VERSION, True, index.replace_heartbeats)):
        fill(custom.list_namespaced_custom_object(group, version, namespace, plural, _request_timeout=120,
                                                  label_selector=trace_selector(trace, heartbeats=heartbeats))["items"])
    now = datetime.now(timezone.utc)
    return [(now - r.entry.last_report_time).total_seconds()
            for r in index.for_trace(trace, uid) if r.entry.last_report_time is not None]


def scale(admin: Any, custom: Any, apiserver: int, trace: str, namespace: str, counts, window: float, log,
          kubeconfig: Path, operator_metrics: Callable[[], dict[str, float]]) -> dict:
    uid = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace)["metadata"]["uid"]
    nodes = [SyntheticNode(f"node-{i:04d}", seed=i) for i in range(max(counts))]
    writers = [ReportWriter(admin, ReportTarget(trace, uid, n.name, namespace), timeout=30) for n in nodes]
    created = 0
    watch = SummaryWatch(kubeconfig, trace)
    out: dict[str, Any] = {"scale": [], "busy_fraction": BUSY_FRACTION, "report_interval_s": SPEC_REPORT_INTERVAL,
                           "heartbeat_s": {str(n): heartbeat_seconds(SPEC_REPORT_INTERVAL, n) for n in counts},
                           "report_period_s": {str(n): report_period(SPEC_REPORT_INTERVAL, n) for n in counts}}
    out["report_bytes"] = len(json.dumps(to_api(nodes[0].next_entry()), separators=(",", ":")))
    try:
        for n in counts:
            point: dict[str, Any] = {"nodes": n}
            out["scale"].append(point)
            started = time.monotonic()
            errors = create_reports(writers[created:n], nodes[created:n])
            created = n
            point.update(create_s=round(time.monotonic() - started, 2), create_errors=len(errors), create_error_sample=errors[:3])
            log(f"{n} nodes: reports created in {point['create_s']} s ({len(errors)} errors)")
            settle(custom, trace)
            expected = sum(node.retransmits for node in nodes[:n])
            try:
                wait_until(lambda: watch.first_at_least(expected, 0.0) is not None,
                           "the summary to include every node", timeout=180)
            except TimeoutError as e:
                point["summary_wait_error"] = str(e)
            passes_before = operator_metrics()
            point.update(schedule_window(admin, apiserver, watch, nodes[:n], writers[:n], window))
            point.update(operator_window(passes_before, operator_metrics()))
            ages = freshness(custom, namespace, trace, uid)
            obj = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace)
            sizes = object_sizes(obj)
            point.update(trace_object_bytes=sizes["object"], trace_status_bytes=sizes["status"],
                         trace_managed_fields_bytes=sizes["managed_fields"],
                         trace_rows=len((obj.get("status") or {}).get("nodes") or []),
                         report_age_p50_s=procstat.percentile(ages, 50), report_age_p99_s=procstat.percentile(ages, 99),
                         report_age_max_s=max(ages) if ages else None, reports=len(ages))
            log(f"{n} nodes: {point['agent_writes_per_second']:.1f} writes/s, {point['heartbeats_per_second']:.1f} of them "
                f"heartbeats ({point['agent_writes_failed']}/"
                f"{point['agent_writes']} failed, {point['agent_writes_unsent']} unsent), "
                f"{point['report_write_bytes_per_second'] / 1024:.0f} KiB/s to reports, "
                f"trace {sizes['object']} bytes written {point['trace_writes_per_second']:.2f}/s, "
                f"API server {point['apiserver_cpu_percent']:.0f}% CPU, lag p50 {point['aggregation_lag_p50_s']:.2f} s "
                f"p99 {point['aggregation_lag_p99_s']:.2f} s ({point['aggregation_lag_samples']} samples), "
                f"operator pass {point.get('operator_pass_mean_s', float('nan')):.2f} s, "
                f"report age p99 {point['report_age_p99_s']:.1f} s, busy report gap p99 {point['busy_write_gap_p99_s']:.1f} s")
    finally:
        watch.stop()
    return out


def schedule_window(admin: Any, apiserver: int, watch: SummaryWatch, nodes: list[SyntheticNode],
                    writers: list[ReportWriter], window: float) -> dict[str, Any]:
    """One trace's nodes, on the schedule of their own count (shared_window)."""
    return shared_window(admin, apiserver, [(watch, nodes, writers)], window, len(nodes))


def shared_window(admin: Any, apiserver: int, groups: list[tuple[SummaryWatch, list[SyntheticNode], list[ReportWriter]]],
                  window: float, agents: int, others: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Every node of every trace (a group: its summary watch, nodes and writers) runs the
    agent's write decision (writeschedule.decide_write) for `window` seconds, for the
    cluster's `agents` (as its DaemonSet says): a wake-up every jittered interval; its report
    when it changed (the busy nodes) and its period passed, a heartbeat Lease renewal when one
    is due.

    Each node is its own agent, so writes are sent on schedule whether or not earlier ones
    have returned (a pool of threads). A busy write's lag ends at the first summary on its
    trace's watch, received after the write was sent, whose total includes every report of
    that trace sent up to it.
    """
    others = others or {}   # name -> pid of the other processes whose CPU is measured over the window
    agents_of = [(g, i) for g, (_, nodes, _) in enumerate(groups) for i in range(len(nodes))]
    n = len(agents_of)
    interval = SPEC_REPORT_INTERVAL
    lease_seconds = round(stale_after(interval, agents).total_seconds())
    rng = random.Random(n)
    busy = set(range(0, n, round(1 / BUSY_FRACTION)))
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    reported: dict[int, list[float]] = {}   # agent -> times its report writes were stored
    node = lambda k: groups[agents_of[k][0]][1][agents_of[k][1]]      # noqa: E731
    writer = lambda k: groups[agents_of[k][0]][2][agents_of[k][1]]    # noqa: E731

    def send(k: int, record: dict[str, Any]) -> None:
        if time.monotonic() - record["queued"] > 30:
            record.update(ok=False, unsent=True)   # queued too long: an agent's write would have timed out
            return
        try:
            if record["kind"] is Write.HEARTBEAT:
                record["sent"] = time.monotonic()
                writer(k).heartbeat(datetime.now(timezone.utc), lease_seconds)
            else:
                # Building the report is the agent's own work on its node, before it sends:
                # the lag starts when the request does.
                entry = node(k).next_entry()
                record["sent"] = time.monotonic()
                writer(k).apply(entry)
                with lock:
                    reported.setdefault(k, []).append(time.monotonic())
            record.update(ok=True, latency=time.monotonic() - record["sent"])
        except ApiError:
            record.update(ok=False)

    t0 = time.monotonic()
    # As if the agents had been running a while: wake-ups spread over one interval; a busy
    # node's last report write over one report period (and its last write of either kind over
    # one heartbeat, where heartbeats fill the period); a quiet node's last write (a Lease
    # renewal) over one heartbeat, as it is in steady state. A window shorter than a stretched
    # heartbeat (250 s at 25,000 agents) then sees the steady rate of renewals.
    period, heartbeat = report_period(interval, agents), heartbeat_seconds(interval, agents)
    written_at = {}
    for k in range(n):
        if k in busy:
            last_report = t0 - rng.uniform(0, period)
            written_at[k] = WriteTimes(report=last_report, any=max(last_report, t0 - rng.uniform(0, heartbeat)))
        else:
            last_write = t0 - rng.uniform(0, heartbeat)
            written_at[k] = WriteTimes(report=last_write - period, any=last_write)
    # What each node's last report write holds: a summary includes a write once it holds all.
    written = [{i: nd.retransmits for i, nd in enumerate(nodes)} for _, nodes, _ in groups]
    due = [(t0 + rng.uniform(0, interval), k) for k in range(n)]
    heapq.heapify(due)
    before = {plural: apiserver_counters(admin, plural) for plural in (REPORT_PLURAL, LEASE_PLURAL, PLURAL)}
    cpu_before = procstat.cpu_ticks(apiserver)
    others_before = {name: procstat.cpu_ticks(pid) for name, pid in others.items()}
    summaries_before = [len(watch.seen) for watch, _, _ in groups]
    with ThreadPoolExecutor(WRITERS) as pool:
        while due[0][0] < t0 + window:
            at, k = heapq.heappop(due)
            time.sleep(max(0.0, at - time.monotonic()))
            g, i = agents_of[k]
            changed = k in busy
            if changed:
                node(k).grow(7)
            kind = decide_write(changed, written_at[k], at, interval, agents)
            if kind is not Write.NOTHING:
                written_at[k] = written_at[k].after(kind, at)
                record = {"queued": time.monotonic(), "kind": kind, "node": k, "group": g}
                if kind is Write.REPORT:
                    written[g][i] = node(k).retransmits
                    record.update(busy=changed, total=sum(written[g].values()))
                records.append(record)
                pool.submit(send, k, record)
            heapq.heappush(due, (at + jittered(interval, rng.random), k))
        elapsed = time.monotonic() - t0
        after = {plural: apiserver_counters(admin, plural) for plural in (REPORT_PLURAL, LEASE_PLURAL, PLURAL)}
        cpu = procstat.cpu_percent(procstat.cpu_ticks(apiserver) - cpu_before, elapsed)
        others_cpu = {f"{name}_cpu_percent": procstat.cpu_percent(procstat.cpu_ticks(pid) - others_before[name], elapsed)
                      for name, pid in others.items()}
        summaries = sum(len(watch.seen) for watch, _, _ in groups) - sum(summaries_before)
    time.sleep(5)   # let the last writes reach the summary
    lags, after_stored = [], []
    for r in records:
        seen = groups[r["group"]][0].first_at_least(r["total"], r["sent"]) if r.get("ok") and r.get("busy") else None
        if seen is not None:
            lags.append(seen - r["sent"])
            after_stored.append(seen - r["sent"] - r["latency"])
    busy_gaps = [b - a for k, times in reported.items() if k in busy for a, b in zip(times, times[1:])]
    ok = [r for r in records if r.get("ok")]
    latencies = [r["latency"] for r in records if "latency" in r]
    rate = lambda plural, key: (after[plural][key] - before[plural][key]) / elapsed  # noqa: E731
    return {
        "window_s": round(elapsed, 2),
        "busy_nodes": len(busy),
        "report_period_s": period,
        "heartbeat_s": heartbeat_seconds(interval, agents),
        "agent_writes": len(records),
        "agent_writes_failed": len(records) - len(ok),
        "agent_writes_unsent": sum(1 for r in records if r.get("unsent")),
        "agent_writes_per_second": len(records) / elapsed,
        "heartbeats_per_second": sum(1 for r in records if r["kind"] is Write.HEARTBEAT) / elapsed,
        "report_writes_per_second": rate(REPORT_PLURAL, "requests"),
        "report_write_bytes_per_second": rate(REPORT_PLURAL, "body_bytes"),
        "lease_writes_per_second": rate(LEASE_PLURAL, "requests"),
        "lease_write_bytes_per_second": rate(LEASE_PLURAL, "body_bytes"),
        "trace_writes_per_second": rate(PLURAL, "requests"),
        "trace_write_bytes_per_second": rate(PLURAL, "body_bytes"),
        "trace_versions_seen": summaries,
        "apiserver_cpu_percent": cpu,
        **others_cpu,
        "write_latency_p50_s": procstat.percentile(latencies, 50),
        "write_latency_p99_s": procstat.percentile(latencies, 99),
        "busy_write_gap_p99_s": procstat.percentile(busy_gaps, 99),
        "busy_write_gap_max_s": max(busy_gaps) if busy_gaps else None,
        "aggregation_lag_p50_s": procstat.percentile(lags, 50),
        "aggregation_lag_p99_s": procstat.percentile(lags, 99),
        "aggregation_lag_max_s": max(lags) if lags else None,
        "aggregation_lag_samples": len(lags),
        # The lag's part after the API server answered the report's write: the operator's
        # (its watch, the wait for its next pass, the pass and its status write) and the
        # summary watch's delivery.
        "aggregation_lag_after_write_p50_s": procstat.percentile(after_stored, 50),
        "aggregation_lag_after_write_p99_s": procstat.percentile(after_stored, 99),
    }


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.controlplane_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--traces", type=int, default=0,
                        help="run this many traces at once on --nodes nodes each (the shared write budget)")
    parser.add_argument("--nodes", type=int, default=5000, help="with --traces: simulated nodes per trace")
    parser.add_argument("--window", type=float, default=60.0, help="write window (s)")
    parser.add_argument("--output", help="also write the figures here (JSON), with the command and commit")
    args = parser.parse_args(argv)
    if args.traces:
        figures = run_shared(args.traces, args.nodes, args.window)
    else:
        figures = run(counts=(20, 50) if args.quick else COUNTS, window=20 if args.quick else args.window)
    document = json.dumps(figures, indent=2)
    print(document)
    if args.output:
        from bench.run import meta

        path = Path(args.output)
        path.write_text(json.dumps({"command": "python -m bench.controlplane_bench " + " ".join(sys.argv[1:] if argv is None else argv),
                                    "meta": meta(), **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
