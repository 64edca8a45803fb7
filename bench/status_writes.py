"""What one status write of a 5,000-node trace costs the API server, by how the rows are kept.

    python -m bench.status_writes [--writes 40] [--output bench/results/status_writes.json]

A real etcd + kube-apiserver (no controllers) with both CRDs from manifests/. The status is
the operator's own: 5,000 simulated nodes (bench/synthetic.py) aggregated by
`aggregate_summary` and `node_rows`. Every layout gets its own trace and `--writes`
server-side applies of its status on /status as the operator sends them (field manager
rtrace-operator, force), each with the counts moved on so that every write changes the
object. Per layout: the kube-apiserver process's CPU over the writes (ms per write, from
/proc/<pid>/stat), the median request time, and the stored object's size and its
managedFields at the end.

Layouts (the CRD is re-applied before each, the trace created after):
  shipped        status.nodes[] as manifests/crd.yaml has it (atomic, at most MAX_NODE_ROWS)
  atomic-500     the same list with 500 rows
  keyed-500      500 rows in a list keyed by node (x-kubernetes-list-type: map), the
                 layout before: the server tracks every row's fields in managedFields
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from bench import procstat
from bench.controlplane_bench import GROUP, PLURAL, VERSION, _ssa, install_crd
from bench.run import meta
from bench.synthetic import SyntheticNode
from retransmit_core.api import DEFAULT_TOP_FLOWS, MAX_NODE_ROWS, Phase, RetransmitTraceStatus, to_api
from retransmit_operator.aggregate import aggregate_summary, node_rows
from tests.harness.controlplane import ControlPlane, wait_until

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NODES = 5000
LAYOUTS = {"shipped": (MAX_NODE_ROWS, None), "atomic-500": (500, "atomic"), "keyed-500": (500, "map")}


def crd_with(rows: int, list_type: str | None) -> dict:
    """manifests/crd.yaml with status.nodes[] bounded at `rows` and kept as `list_type`."""
    crd = yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text())
    nodes = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["nodes"]
    nodes["maxItems"] = rows
    if list_type == "map":
        nodes.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["node"]})
    elif list_type is not None:
        nodes.pop("x-kubernetes-list-map-keys", None)
        nodes["x-kubernetes-list-type"] = list_type
    return crd


def statuses(nodes: int) -> tuple[dict, list[dict]]:
    """The operator's status without rows, and every row (busiest first), for `nodes` nodes."""
    entries = [SyntheticNode(f"node-{i:05d}", seed=i).next_entry() for i in range(nodes)]
    summary = aggregate_summary(entries, nodes, DEFAULT_TOP_FLOWS, None)
    rows, _ = node_rows(entries, None, None, limit=nodes)
    return to_api(RetransmitTraceStatus(phase=Phase.RUNNING, summary=summary)), [to_api(r) for r in rows]


def moved_on(status: dict, rows: list[dict], k: int) -> dict:
    """The status with every count moved on by k: each write a real change, as a busy trace's."""
    out = copy.deepcopy(status)
    out["summary"]["retransmits"] += k
    out["nodes"] = [{**row, "retransmits": row.get("retransmits", 0) + k} for row in rows]
    return out


def measure(custom: Any, apiserver: int, name: str, keyed: bool, status: dict, rows: list[dict], writes: int) -> dict:
    import kubernetes

    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name}, "spec": {}})

    def write(k: int) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name},
                "status": moved_on(status, rows, k)}
        return custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, body, field_manager="rtrace-operator",
                                                         force=True, _content_type="application/apply-patch+yaml")

    def in_layout() -> bool:
        """The API server applies the layout's schema: it takes the rows and keeps them as asked
        (its schema cache follows a CRD change a moment after the CRD is stored)."""
        try:
            stored = write(0)
        except kubernetes.client.ApiException as e:
            if e.status == 422:
                return False
            raise
        return ('"k:{' in json.dumps(stored["metadata"]["managedFields"])) == keyed   # a row's key

    wait_until(in_layout, f"the API server to keep {name}'s rows as its CRD says")
    latencies = []
    ticks = procstat.cpu_ticks(apiserver)
    for k in range(1, writes + 1):
        started = time.monotonic()
        write(k)
        latencies.append(time.monotonic() - started)
    ticks = procstat.cpu_ticks(apiserver) - ticks
    stored = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    compact = lambda x: len(json.dumps(x, separators=(",", ":")))  # noqa: E731
    return {"rows": len(rows), "apiserver_cpu_ms_per_write": ticks * 10.0 / writes,
            "request_p50_s": procstat.percentile(latencies, 50), "status_bytes": compact(moved_on(status, rows, 0)),
            "object_bytes": compact(stored), "managed_fields_bytes": compact(stored["metadata"].get("managedFields") or [])}


def run(writes: int, log=print) -> dict:
    import kubernetes

    status, rows = statuses(NODES)
    out: dict[str, Any] = {"nodes": NODES, "writes": writes, "layouts": {}}
    with ControlPlane(controllers=False) as cp:
        admin = cp.api_client()
        install_crd(admin)
        custom = kubernetes.client.CustomObjectsApi(admin)
        apiserver = cp.component("kube-apiserver").proc.pid
        for layout, (count, list_type) in LAYOUTS.items():
            _ssa(admin, crd_with(count, list_type))
            result = measure(custom, apiserver, f"status-{layout}", list_type == "map", status, rows[:count], writes)
            out["layouts"][layout] = result
            log(f"{layout}: {json.dumps(result)}")
        admin.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=40)
    parser.add_argument("--output", default=str(RESULTS / "status_writes.json"))
    args = parser.parse_args(argv)
    figures = run(args.writes)
    command = "python -m bench.status_writes" + (f" --writes {args.writes}" if args.writes != 40 else "")
    Path(args.output).write_text(json.dumps({"command": command, "meta": meta(), **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
