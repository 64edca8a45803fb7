"""Control-plane figures: one trace on a real kube-apiserver + etcd with N simulated nodes
writing their entries the way the agent does, and the real operator aggregating them.

- Simulated nodes: bench.synthetic (the agent's report code on synthetic kernel counters),
  written with the agent's StatusWriter (server-side apply, field manager per node).
- The operator: `retransmit-operator` as a subprocess at its default settings (sync every
  2s, 5 writes/s per trace), admin credentials.
- For N in 20, 100, 500, 1000 (each node's entry trimmed to its share for N nodes, as the
  agent does): the nodes not in the object yet write once (one apply per node up to 100
  nodes, beyond that in bulk with the same managedFields), then for a window the nodes write
  at the agents' budget: 5 writes/s per trace in total, fewer for objects over 160 KiB
  (reporter.report_interval: the same bytes per second), round robin. Measured: object
  size, API server write requests/s and request bytes/s (the API server's own metrics) and
  CPU, bytes/s stored (object size x accepted writes), and the operator's lag from a node's
  write (request sent) to the first summary that includes it (seen on a watch).
- operator_reconcile_s: `kubectl apply -f trace.yaml` started -> the DaemonSet exists.
"""

from __future__ import annotations

import json
import os
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
from pathlib import Path
from typing import Any, Optional

import yaml

from bench import procstat
from bench.synthetic import SyntheticNode
from retransmit_agent.reporter import ApiError, StatusWriter, apply_body, backoff_delay, report_interval
from retransmit_operator.api import GROUP, PLURAL, VERSION, to_api
from retransmit_operator.contract import DEFAULT_MAX_WRITES_PER_SECOND
from tests.harness.controlplane import ControlPlane, free_port, start_process, wait_until

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = Path(os.environ.get("RTRACE_CACHE") or Path.home() / ".cache" / "retransmit-operator") / "bin" / "kubectl"
OPERATOR = Path(sys.executable).parent / "retransmit-operator"
SPEC_REPORT_INTERVAL = 10.0   # spec.reportInterval default
COUNTS = (20, 100, 500, 1000)  # simulated nodes on one trace
ONE_BY_ONE = 100               # up to this many nodes, seeding is one apply per node
MiB = 1 << 20


# ---------------------------------------------------------------- helpers

def _ssa(api: Any, body: dict) -> None:
    import kubernetes.dynamic

    dyn = kubernetes.dynamic.DynamicClient(api)
    resource = dyn.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    resource.server_side_apply(body=body, name=body["metadata"]["name"], namespace=body["metadata"].get("namespace"),
                               field_manager="rtrace-bench", force_conflicts=True)


def install_crd(api: Any) -> None:
    import kubernetes

    _ssa(api, yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text()))
    ext = kubernetes.client.ApiextensionsV1Api(api)
    wait_until(lambda: any(c.type == "Established" and c.status == "True"
                           for c in ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions or []),
               "the CRD to be established")


def apiserver_counters(api: Any) -> dict[str, float]:
    """Write requests to retransmittraces and their body bytes, from the API server's /metrics."""
    text = api.call_api("GET", api.configuration.host + "/metrics").read().decode()
    return parse_write_metrics(text)


WRITE_VERBS = {"apply", "patch", "update", "create"}


def parse_write_metrics(text: str) -> dict[str, float]:
    """Sum apiserver_request_total and apiserver_request_body_size_bytes_sum over write
    verbs on retransmittraces (any subresource) from Prometheus text."""
    out = {"requests": 0.0, "body_bytes": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or "retransmittraces" not in line:
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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SummaryWatch:
    """A watch on one trace, recording (time received, summary.retransmits) of every version."""

    def __init__(self, api: Any, trace: str) -> None:
        self.api, self.trace = api, trace
        self.seen: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import kubernetes

        custom = kubernetes.client.CustomObjectsApi(self.api)
        while not self._stop.is_set():
            w = kubernetes.watch.Watch()
            try:
                for event in w.stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                      field_selector=f"metadata.name={self.trace}", timeout_seconds=30):
                    summary = ((event["object"].get("status") or {}).get("summary") or {})
                    self.seen.append((time.monotonic(), int(summary.get("retransmits") or 0)))
                    if self._stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - a dropped watch is re-opened
                time.sleep(0.2)
            finally:
                w.stop()

    def first_at_least(self, total: int, after: float) -> Optional[float]:
        for at, value in list(self.seen):
            if at >= after and value >= total:
                return at
        return None

    def stop(self) -> None:
        self._stop.set()


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

def run(counts=COUNTS, window: float = 30.0, log=print) -> dict:
    import kubernetes

    results: dict[str, Any] = {"scale": []}
    workdir = Path(tempfile.mkdtemp(prefix="rtrace-bench-"))   # the operator's log
    with ControlPlane(controllers=False) as cp:
        admin = cp.api_client()
        custom = kubernetes.client.CustomObjectsApi(admin)
        apps = kubernetes.client.AppsV1Api(admin)
        install_crd(admin)
        namespace = f"rtrace-bench-{uuid.uuid4().hex[:6]}"
        kubernetes.client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
        operator = OperatorProcess(cp.kubeconfig, namespace, workdir / "operator.log")
        try:
            times = [measure_reconcile(cp, apps, namespace, f"bench-{i}", workdir) for i in range(3)]
            results["operator_reconcile_s"] = sorted(times)[1]
            results["operator_reconcile_samples_s"] = times
            log(f"operator reconcile (kubectl apply -> DaemonSet): {', '.join(f'{t:.3f}' for t in times)} s")
            for i in (1, 2):
                custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, f"bench-{i}")
            apiserver = cp.component("kube-apiserver").proc.pid
            results.update(scale(admin, custom, apiserver, "bench-0", counts, window, log))
        finally:
            operator.stop()
            admin.close()
            if not os.environ.get("RTRACE_KEEP_CLUSTER"):
                shutil.rmtree(workdir, ignore_errors=True)
    results["entry_sizes"] = entry_sizes(results.get("managed_fields_bytes_per_node", 0.0))
    return results


def entry_sizes(managed_per_node: float) -> list[dict[str, Any]]:
    """Bytes per node (entry + its managedFields) and the nodes that fit in 1 MiB, by settings."""
    out = []
    for top, keep in ((10, 20), (10, 0), (3, 0), (1, 0)):
        node = SyntheticNode("node-0000", seed=0, top_flows=top, keep_events=keep)
        entry = len(json.dumps(to_api(node.next_entry()), separators=(",", ":"))) + 1
        per_node = entry + managed_per_node
        out.append({"topFlows": top, "events.keep": keep, "entry_bytes": entry,
                    "bytes_per_node": round(per_node), "nodes_under_1MiB": int(MiB // per_node)})
    return out


def _write(writer: StatusWriter, node: SyntheticNode) -> tuple[bool, int, str, int]:
    """One agent write; (ok, request body bytes, error, HTTP status)."""
    entry = node.next_entry()
    body_bytes = len(json.dumps(apply_body(writer.trace, entry), separators=(",", ":")))
    try:
        writer.apply(entry)
        return True, body_bytes, "", 200
    except ApiError as e:
        return False, body_bytes, str(e)[:300], e.status


def too_large(error: str, status: int) -> bool:
    """The API server (or etcd behind it) refused the write because of the object's size."""
    return status == 413 or "too large" in error.lower() or "too long" in error.lower()


def seed(writers: list[StatusWriter], nodes: list[SyntheticNode], log) -> tuple[int, str]:
    """Each node writes once, one after the other (no conflicts), retrying transient errors
    like the agent does. Stops at the first size refusal, or when a write keeps failing;
    returns (entries written, why it stopped or "")."""
    for i, (writer, node) in enumerate(zip(writers, nodes)):
        for attempt in range(4):
            sent = time.monotonic()
            ok, _size, error, status = _write(writer, node)
            if time.monotonic() - sent > 5:
                log(f"seeding {node.name}: write took {time.monotonic() - sent:.1f} s ({error[:80] or 'ok'})")
            if ok:
                break
            if too_large(error, status):
                return i, error
            time.sleep(backoff_delay(attempt))
        else:
            return i, f"{node.name}: 4 writes failed, last: {error}"
    return len(nodes), ""


def managed_fields_entry(entry: dict[str, Any], manager: str, apply_time: str) -> dict[str, Any]:
    """The managedFields record a node's agent gets for its server-side apply of `entry`
    (same shape as the API server writes: atomic lists, granular byState map)."""
    fields: dict[str, Any] = {".": {}}
    for key, value in entry.items():
        fields[f"f:{key}"] = {f"f:{k}": {} for k in value} if key == "byState" else {}
    node_key = "k:" + json.dumps({"node": entry["node"]}, separators=(",", ":"))
    return {"apiVersion": f"{GROUP}/{VERSION}", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:nodes": {node_key: fields}}},
            "manager": manager, "operation": "Apply", "subresource": "status", "time": apply_time}


def bulk_seed(custom: Any, trace: str, nodes: list[SyntheticNode]) -> str:
    """Every node's entry in two requests instead of one apply per node: the status with
    all entries, then metadata.managedFields as each node's own apply would have left it
    (one field manager per node). Seeding 1000 nodes one apply at a time costs the API
    server ~1 s of CPU per write at this object size. Returns the refusal, or ""."""
    from kubernetes.client.exceptions import ApiException

    entries = [to_api(node.next_entry()) for node in nodes]
    names = {e["node"] for e in entries}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for step in ("status", "managedFields"):
        for attempt in range(6):
            obj = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace)
            try:
                if step == "status":
                    kept = [e for e in (obj.get("status") or {}).get("nodes") or [] if e["node"] not in names]
                    obj.setdefault("status", {})["nodes"] = kept + entries
                    custom.replace_cluster_custom_object_status(GROUP, VERSION, PLURAL, trace, obj,
                                                                field_manager="rtrace-bench-seed")
                else:
                    managed = [m for m in obj["metadata"].get("managedFields") or []
                               if m["manager"] != "rtrace-bench-seed" and m["manager"].removeprefix("rtrace-agent/") not in names]
                    managed += [managed_fields_entry(e, f"rtrace-agent/{e['node']}", stamp) for e in entries]
                    obj["metadata"]["managedFields"] = managed
                    custom.replace_cluster_custom_object(GROUP, VERSION, PLURAL, trace, obj,
                                                         field_manager="rtrace-bench-seed")
                break
            except ApiException as e:
                if e.status == 409:     # the operator wrote meanwhile: read again
                    continue
                text = f"HTTP {e.status}: {str(e.body or e.reason)[:300]}"
                if too_large(text, e.status or 0):
                    return text
                time.sleep(backoff_delay(attempt))
        else:
            return f"bulk seeding ({step}) kept failing"
    return ""


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


def scale(admin: Any, custom: Any, apiserver: int, trace: str, counts, window: float, log) -> dict:
    nodes = [SyntheticNode(f"node-{i:04d}", seed=i) for i in range(max(counts))]
    writers = [StatusWriter(admin, trace, n.name, timeout=30) for n in nodes]
    written = 0            # nodes[:written] have an entry
    refusal = ""
    watch = SummaryWatch(admin, trace)
    out: dict[str, Any] = {"scale": []}
    out["node_entry_bytes"] = len(json.dumps(to_api(nodes[0].next_entry()), separators=(",", ":")))
    empty = object_sizes(custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace))
    out["empty_object_bytes"] = empty["object"]
    try:
        for n in counts:
            point: dict[str, Any] = {"nodes": n}
            out["scale"].append(point)
            for node in nodes[:n]:
                node.nodes_desired = n     # as if the DaemonSet controller counted n nodes
            if not refusal and written < n:
                settle(custom, trace)
                started = time.monotonic()
                if n <= ONE_BY_ONE:
                    added, refusal = seed(writers[written:n], nodes[written:n], log)
                    written += added
                else:
                    refusal = bulk_seed(custom, trace, nodes[:n])
                    written = n if not refusal else written
                    point["seeded_in_bulk"] = True
                point["seed_s"] = round(time.monotonic() - started, 2)
            obj = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace)
            sizes = object_sizes(obj)
            stored = len((obj.get("status") or {}).get("nodes") or [])
            if refusal:
                # The object cannot hold n entries. Still measured: what the API server gets
                # when n agents write at the budget (the writes that would grow it are refused).
                out["max_nodes_stored"] = stored
                out["max_object_bytes"] = sizes["object"]
                point.update(stored=False, nodes_stored=stored, error=refusal, status_bytes_at_limit=sizes["object"])
                log(f"{n} nodes: only {stored} entries fit ({sizes['object']} bytes): {refusal}")
                settle(custom, trace)
                point.update(budget_window(admin, apiserver, watch, nodes[:n], writers[:n], min(window, 10.0)))
                log(f"{n} nodes at the budget: {point['writes_per_second']:.2f} writes/s, "
                    f"{point['agent_writes_failed']}/{point['agent_writes']} failed, "
                    f"API server {point['apiserver_cpu_percent']:.0f}% CPU")
                continue
            settle(custom, trace)
            expected = sum(node.retransmits for node in nodes[:n])
            try:
                wait_until(lambda: watch.first_at_least(expected, 0.0) is not None,
                           "the summary to include every node", timeout=60)
            except TimeoutError as e:
                point["summary_wait_error"] = str(e)
            point.update(stored=True, status_bytes=sizes["object"], status_only_bytes=sizes["status"],
                         managed_fields_bytes=sizes["managed_fields"])
            point.update(budget_window(admin, apiserver, watch, nodes[:n], writers[:n], window, sizes["object"]))
            log(f"{n} nodes: object {sizes['object']} bytes, {point['writes_per_second']:.2f} writes/s "
                f"({point['agent_writes_failed']}/{point['agent_writes']} failed), write p99 "
                f"{point['write_latency_p99_s']:.2f} s, API server {point['apiserver_cpu_percent']:.0f}% CPU, "
                f"lag p50 {point['aggregation_lag_p50_s']:.2f} s p99 {point['aggregation_lag_p99_s']:.2f} s "
                f"({point['aggregation_lag_samples']} samples)")
    finally:
        watch.stop()
    stored_points = [p for p in out["scale"] if p.get("stored")]
    if stored_points:
        # Bytes the object grows by per node entry (the entry plus its field manager's managedFields).
        last = stored_points[-1]
        out["object_bytes_per_node"] = (last["status_bytes"] - out["empty_object_bytes"]) / last["nodes"]
        out["managed_fields_bytes_per_node"] = (last["managed_fields_bytes"] - empty["managed_fields"]) / last["nodes"]
        out["projected_object_bytes"] = {str(n): projected_bytes(nodes[:n], out["empty_object_bytes"],
                                                                 out["managed_fields_bytes_per_node"]) for n in counts}
    return out


def projected_bytes(nodes: list[SyntheticNode], empty: int, managed_per_node: float) -> int:
    """The object's size with these nodes' entries at their budget for len(nodes) nodes:
    the empty object, every entry, and the measured managedFields per node."""
    size = 0
    for node in nodes:
        saved, node.nodes_desired = node.nodes_desired, len(nodes)
        size += len(json.dumps(to_api(node.next_entry()), separators=(",", ":"))) + 1
        node.nodes_desired = saved
    return round(empty + size + len(nodes) * managed_per_node)


def budget_window(admin: Any, apiserver: int, watch: SummaryWatch, nodes: list[SyntheticNode],
                  writers: list[StatusWriter], window: float, object_bytes: int = 0) -> dict[str, Any]:
    """Nodes write round robin at the per-trace budget for `window` seconds.

    Each node is its own agent, so writes are sent on schedule whether or not earlier ones
    have returned (a pool of threads). A write's lag ends at the first summary on the watch,
    received after the write was sent, whose total includes every write sent up to it.
    """
    import kubernetes

    n = len(nodes)
    rate = DEFAULT_MAX_WRITES_PER_SECOND
    # The agents' own budget: fewer writes for objects larger than BUDGET_OBJECT_BYTES.
    interval = report_interval(SPEC_REPORT_INTERVAL, n, rate, object_bytes)
    per_second = min(rate, n / interval)
    records: list[dict[str, Any]] = []

    def send(node: SyntheticNode, writer: StatusWriter, record: dict[str, Any]) -> None:
        if time.monotonic() - record["sent"] > 30:
            # Queued behind 16 writes that are still waiting for the API server: counted as
            # failed unsent (an agent whose write times out retries later).
            record.update(ok=False, unsent=True)
            return
        ok, size, _err, _status = _write(writer, node)
        record.update(ok=ok, bytes=size, latency=time.monotonic() - record["sent"])

    before = apiserver_counters(admin)
    cpu_before = procstat.cpu_ticks(apiserver)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        i = 0
        while True:
            due = t0 + i / per_second
            if due - t0 >= window:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            node, writer = nodes[i % n], writers[i % n]
            node.grow(7)
            record = {"sent": time.monotonic(), "total": sum(x.retransmits for x in nodes)}
            records.append(record)
            pool.submit(send, node, writer, record)
            i += 1
        elapsed = time.monotonic() - t0
        after = apiserver_counters(admin)
        cpu = procstat.cpu_percent(procstat.cpu_ticks(apiserver) - cpu_before, elapsed)
    time.sleep(5)   # let the last writes reach the summary
    lags = []
    for r in records:
        seen = watch.first_at_least(r["total"], r["sent"]) if r.get("ok") else None
        if seen is not None:
            lags.append(seen - r["sent"])
    obj_bytes = object_sizes(kubernetes.client.CustomObjectsApi(admin).get_cluster_custom_object(
        GROUP, VERSION, PLURAL, writers[0].trace))["object"]
    ok = [r for r in records if r.get("ok")]
    body = sum(r.get("bytes", 0) for r in records)
    latencies = [r["latency"] for r in records if "latency" in r]
    return {
        "node_report_interval_s": interval,
        "window_s": round(elapsed, 2),
        "agent_writes": len(records),
        "agent_writes_failed": len(records) - len(ok),
        "agent_writes_unsent": sum(1 for r in records if r.get("unsent")),
        "writes_per_second": (after["requests"] - before["requests"]) / elapsed,
        "agent_writes_per_second": len(records) / elapsed,
        "write_request_bytes_per_second": (after["body_bytes"] - before["body_bytes"]) / elapsed
        if after["body_bytes"] else body / elapsed,
        "agent_request_bytes_per_second": body / elapsed,
        # Each accepted write stores the whole object in etcd and returns it in the response.
        "stored_bytes_per_second": len(ok) / elapsed * obj_bytes,
        "apiserver_cpu_percent": cpu,
        "write_latency_p50_s": procstat.percentile(latencies, 50),
        "write_latency_p99_s": procstat.percentile(latencies, 99),
        "aggregation_lag_p50_s": procstat.percentile(lags, 50),
        "aggregation_lag_p99_s": procstat.percentile(lags, 99),
        "aggregation_lag_max_s": max(lags) if lags else None,
        "aggregation_lag_samples": len(lags),
    }


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(json.dumps(run(counts=(20, 50) if quick else COUNTS, window=10 if quick else 30), indent=2))
