"""`make bench`: run every measurement once and write bench/results/latest.json and latest.png
(and bench/results/kernel_breakdown.json and .md: the kernel cost per part of the program).

    python -m bench.run [--skip-node] [--skip-controlplane] [--window 60]

Needs root (BPF, network namespaces), `make setup` and `make k8s-binaries`. About 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import controlplane_bench, figures, kernel_bench, kernel_breakdown
from bench.plot import plot

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def meta() -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
    }


def single_object_figures(previous: dict) -> dict:
    """The figures of the design this replaced (every agent writing into one shared trace
    object), from the last run that measured it, kept next to the new ones."""
    if "single_object_previous" in previous:
        return previous["single_object_previous"]
    if not previous.get("controlplane"):
        return {}
    keys = ("aggregation_lag_p50_s", "aggregation_lag_p99_s", "aggregation_lag_nodes", "aggregation_lag_p99_s_by_nodes",
            "status_bytes_1000_nodes", "writes_per_second_1000_nodes", "write_bytes_per_second_1000_nodes",
            "max_nodes_stored", "object_bytes_per_node")
    return {"meta": {k: previous.get("meta", {}).get(k) for k in ("date", "git_commit")},
            **{k: previous.get(k) for k in keys}, "controlplane": previous["controlplane"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-node", action="store_true", help="skip the kernel/agent measurements")
    parser.add_argument("--skip-controlplane", action="store_true", help="skip the API server/operator measurements")
    parser.add_argument("--window", type=float, default=60.0, help="control-plane write window per node count (s)")
    parser.add_argument("--output", default=str(RESULTS / "latest.json"))
    args = parser.parse_args(argv)

    started = time.monotonic()
    results: dict = {"meta": meta()}
    out = Path(args.output)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if not args.skip_node:
        log("node: kernel cost, exactness, agent vs baseline overhead, sweep")
        results["node"] = kernel_bench.run(log=log)
        log("node: kernel cost per part of the program, every variant on one load")
        breakdown = {"meta": meta(), **kernel_breakdown.run(log=log)}
        kernel_breakdown.write(breakdown, RESULTS / "kernel_breakdown.json", "python -m bench.run")
        results["node"]["breakdown"] = {key: breakdown[key] for key in (
            "ns_per_event", "ratio_default", "ratio_causes_off", "ratio_port_filter")}
    elif "node" in previous:
        # Kept from the run that measured them (its commit and date in node_measured).
        results["node"] = previous["node"]
        results["meta"]["node_measured"] = previous.get("meta", {}).get("node_measured") or {
            k: previous.get("meta", {}).get(k) for k in ("date", "git_commit", "git_dirty")}
    results["single_object_previous"] = single_object_figures(previous)
    if not args.skip_controlplane:
        log("control plane: operator reconcile, N simulated nodes on one trace")
        results["controlplane"] = controlplane_bench.run(window=args.window, log=log)
    elif "controlplane" in previous:
        # Kept from the run that measured them (its commit and date in controlplane_measured).
        results["controlplane"] = previous["controlplane"]
        results["meta"]["controlplane_measured"] = previous.get("meta", {}).get("controlplane_measured") or {
            k: previous.get("meta", {}).get(k) for k in ("date", "git_commit", "git_dirty")}
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)

    summary = figures.headline(results.get("node", {}), results.get("controlplane", {}))
    document = {**summary, "units": figures.UNITS, "targets": figures.targets(summary), **results}
    document = figures.clean(document)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {out}")
    if "node" in results:
        png = plot(document, out.with_suffix(".png"))
        log(f"wrote {png}")
    print(json.dumps({k: document[k] for k in summary}, indent=2))
    missed = [name for name, t in document["targets"].items() if t["met"] is False]
    log(f"targets missed: {', '.join(missed) if missed else 'none'} ({results['meta']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
