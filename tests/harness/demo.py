"""`python -m tests.harness.demo` (make demo): the whole flow on a real control plane, real BPF.

1. start etcd, kube-apiserver, controller-manager and scheduler on 127.0.0.1 (tests.harness.controlplane);
2. install the CRD, the namespace and the agent's ServiceAccount + RBAC from manifests/;
3. run the operator (`retransmit-operator`, a local process) and a simulated node named
   after this host (tests.harness.nodesim plays its kubelet);
4. create namespace `shop` with two labelled pods, `web` and `load`, each with a network
   namespace and IPv4+IPv6 addresses of its own; 8% of the TCP segments arriving at either
   pod are dropped (nftables inside the pods' namespaces);
5. apply a trace for namespace `shop` (40s, reports every 2s), drive lossy traffic between
   the pods, print `kubectl get rtrace` as the counts grow;
6. show the trace's top flows and top pods from its status (rich tables);
7. clean up everything (trace, operator, pods, node, control plane).
Needs root and `make k8s-binaries`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION
from retransmit_core.naming import DEFAULT_NAMESPACE
from tests.harness import podtraffic
from tests.harness.controlplane import ControlPlane, end_process, start_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ["00-namespace.yaml", "crd.yaml", "crd-nodereports.yaml", "agent-serviceaccount.yaml",
             "agent-clusterrole.yaml", "agent-clusterrolebinding.yaml", "agent-role.yaml", "agent-rolebinding.yaml",
             "agent-report-guard-policy.yaml", "agent-report-guard-binding.yaml"]
SYSTEM_NS = DEFAULT_NAMESPACE
AGENT_SA = "retransmit-operator-agent"
DEMO_NS = "shop"
TRACE = "shop-retransmits"
LOSS = 8
SECONDS = 40

# Wide enough for the flows table even when the output is not a terminal (make, CI logs).
console = Console(width=max(140, shutil.get_terminal_size((140, 40)).columns))


def node_name() -> str:
    """This host's name as a Node name (RFC 1123 label)."""
    name = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower()).strip("-")[:50]
    return name or "this-host"


def trace_manifest(node: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace",
        "metadata": {"name": TRACE},
        "spec": {
            "duration": f"{SECONDS}s",
            "namespaces": [DEMO_NS],
            "nodeSelector": {"kubernetes.io/hostname": node},
            "reportInterval": "2s",
            "topFlows": 8,
            "events": {"keep": 5},
        },
    }


def apply(api: Any, doc: dict) -> None:
    from kubernetes.dynamic import DynamicClient

    dyn = DynamicClient(api)
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    dyn.server_side_apply(resource, body=doc, field_manager="rtrace-demo", force_conflicts=True)


def kubectl(cp: ControlPlane, *args: str) -> None:
    tool = shutil.which("kubectl") or str(Path(os.environ.get("RTRACE_CACHE", Path.home() / ".cache/retransmit-operator")) / "bin/kubectl")
    console.print(f"[bold]$ kubectl {' '.join(args)}[/bold]")
    if not Path(tool).exists():
        console.print("(kubectl not installed: `make tools`)")
        return
    out = subprocess.run([tool, *args], env=cp.env(), capture_output=True, text=True)
    console.print(out.stdout.rstrip() or out.stderr.rstrip(), highlight=False)


def endpoint(side: dict) -> str:
    ip = side.get("ip", "")
    addr = f"[{ip}]:{side.get('port')}" if ":" in ip else f"{ip}:{side.get('port')}"
    who = f"{side['namespace']}/{side['pod']}" if side.get("pod") else (f"node {side['node']}" if side.get("node") else "")
    addr = escape(addr)  # "[fd00::2]:80" is no rich markup tag
    return f"{addr}\n[dim]{escape(who)}[/dim]" if who else addr


def flows_table(status: dict) -> Table:
    summary = status.get("summary") or {}
    table = Table(title=f"top flows of {TRACE}: {summary.get('retransmits', 0)} retransmits, "
                        f"{summary.get('synackRetransmits', 0)} SYN-ACK retransmits on "
                        f"{summary.get('nodesReporting', 0)}/{summary.get('nodesDesired', 0)} nodes")
    for column, justify, width in (("local (retransmitted)", "left", 30), ("remote", "left", 30), ("family", "left", 6),
                                   ("retransmits", "right", 11), ("SYN-ACK", "right", 7), ("last state", "left", 11),
                                   ("node", "left", 8)):
        table.add_column(column, justify=justify, min_width=width, overflow="fold")
    for flow in summary.get("topFlows") or []:
        table.add_row(endpoint(flow["local"]), endpoint(flow["remote"]), flow.get("family", ""),
                      str(flow.get("retransmits", 0)), str(flow.get("synackRetransmits", 0)),
                      flow.get("lastState") or "", flow.get("node") or "")
    return table


def pods_table(status: dict) -> Table:
    summary = status.get("summary") or {}
    table = Table(title="top pods (local side)")
    for column in ("namespace", "pod", "node", "retransmits"):
        table.add_column(column, justify="right" if column == "retransmits" else "left")
    for pod in summary.get("topPods") or []:
        table.add_row(pod.get("namespace", ""), pod.get("pod", ""), pod.get("node") or "", str(pod.get("retransmits", 0)))
    return table


def by_state_table(status: dict) -> Table:
    table = Table(title="retransmits by TCP state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, count in sorted(((status.get("summary") or {}).get("byState") or {}).items(), key=lambda kv: -kv[1]):
        table.add_row(state, str(count))
    return table


def load(web: podtraffic.PodNet, client: podtraffic.PodNet, web_ips: list[str], stop: threading.Event) -> None:
    """Duplex bulk transfers in both families, plus one round of SYN-ACK retransmits."""
    round_ = 0
    while not stop.is_set():
        for i, ip in enumerate(web_ips):
            podtraffic.bulk(web, client, ip, 8080 + i, connections=3, nbytes=1 << 20)
        if round_ == 0:
            web.clear_loss()
            podtraffic.synack(web, client, web_ips[0], 8443, connections=2, seconds=3.5)
            web.random_loss(LOSS)
        round_ += 1


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it loads BPF programs and creates network namespaces)", file=sys.stderr)
        return 1
    import kubernetes

    from tests.harness.nodesim import NodeSimulator

    node = node_name()
    operator: Optional[subprocess.Popen] = None
    console.rule("[bold]1. control plane")
    with ControlPlane() as cp:
        console.print(f"kube-apiserver {cp.server}, admin kubeconfig {cp.kubeconfig}")
        api = cp.api_client()
        core = kubernetes.client.CoreV1Api(api)
        objects = kubernetes.client.CustomObjectsApi(api)

        console.rule("[bold]2. CRD, namespace, agent RBAC (manifests/)")
        for name in MANIFESTS:
            for doc in yaml.safe_load_all((ROOT / "manifests" / name).read_text()):
                if doc:
                    apply(api, doc)
                    console.print(f"applied {doc['kind']} {doc['metadata']['name']}")
        ext = kubernetes.client.ApiextensionsV1Api(api)
        for plural in (PLURAL, REPORT_PLURAL):
            wait_until(lambda: any(c.type == "Established" and c.status == "True" for c in
                                   ext.read_custom_resource_definition(f"{plural}.{GROUP}").status.conditions or []),
                       f"the CRD {plural} to be established")

        console.rule(f"[bold]3. operator and simulated node {node}")
        env = {**cp.env(), "RTRACE_NAMESPACE": SYSTEM_NS, "RTRACE_AGENT_SERVICE_ACCOUNT": AGENT_SA,
               "RTRACE_METRICS_PORT": "0", "RTRACE_SYNC_INTERVAL": "1s", "PYTHONUNBUFFERED": "1"}
        operator_log = cp.workdir / "operator.log"
        operator = start_process([str(Path(sys.executable).parent / "retransmit-operator"),
                                  "--kubeconfig", str(cp.kubeconfig)], operator_log, env=env)
        console.print(f"retransmit-operator pid {operator.pid}, log {operator_log}")
        try:
            with NodeSimulator(cp.kubeconfig, (node,)) as sim:
                return _run(cp, sim, core, objects, node)
        finally:
            end_process(operator, grace=10)
            api.close()
            console.rule("[bold]cleaned up: operator, pods, node, control plane")


def _run(cp: ControlPlane, sim: Any, core: Any, objects: Any, node: str) -> int:
    console.rule(f"[bold]4. namespace {DEMO_NS}: pods web and load, {LOSS}% loss arriving at each")
    core.create_namespace({"metadata": {"name": DEMO_NS}})
    wait_until(lambda: core.read_namespaced_service_account("default", DEMO_NS), "ServiceAccount default")
    podtraffic.create_pod(core, DEMO_NS, "web", node, {"app": "web"})
    podtraffic.create_pod(core, DEMO_NS, "load", node, {"app": "load"})
    web_ips = podtraffic.wait_pod_ips(core, DEMO_NS, "web")
    load_ips = podtraffic.wait_pod_ips(core, DEMO_NS, "load")
    web, client = podtraffic.PodNet.of(sim, DEMO_NS, "web"), podtraffic.PodNet.of(sim, DEMO_NS, "load")
    console.print(f"web  {', '.join(web_ips)}\nload {', '.join(load_ips)}")
    kubectl(cp, "get", "pods", "-n", DEMO_NS, "-o", "wide")

    console.rule("[bold]5. apply a trace")
    manifest = trace_manifest(node)
    console.print(yaml.safe_dump(manifest, sort_keys=False), highlight=False)
    objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, manifest)

    def get() -> dict:
        return objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, TRACE)

    def attached() -> bool:
        nodes = (get().get("status") or {}).get("nodes") or []
        return any(n.get("node") == node and n.get("phase") in ("Running", "Failed") for n in nodes)
    wait_until(attached, "the agent to attach and report", timeout=180, interval=0.5)
    kubectl(cp, "get", "daemonset,pods", "-n", SYSTEM_NS)
    entry = next(n for n in get()["status"]["nodes"] if n["node"] == node)
    if entry["phase"] == "Failed":
        console.print(f"[red]the agent cannot trace on this host: {entry.get('message')}")
        return 1

    stop = threading.Event()
    web.random_loss(LOSS)
    client.random_loss(LOSS)
    driver = threading.Thread(target=load, args=(web, client, web_ips, stop), daemon=True)
    driver.start()
    try:
        while (get().get("status") or {}).get("phase") != "Completed":
            kubectl(cp, "get", "rtrace")
            time.sleep(5)
    finally:
        stop.set()
        driver.join(120)
        web.clear_loss()
        client.clear_loss()
    wait_until(lambda: get()["status"].get("phase") == "Completed", "the trace to complete", timeout=120)
    time.sleep(3)  # the agents' final reports, then one more aggregation

    console.rule("[bold]6. results (status of the RetransmitTrace, and its per-node reports)")
    kubectl(cp, "get", "rtrace")
    kubectl(cp, "get", "rtreport", "-n", SYSTEM_NS, "-l", f"retransmit.dev/trace={TRACE}")
    status = get()["status"]
    console.print(flows_table(status))
    console.print(pods_table(status))
    console.print(by_state_table(status))
    for cond in status.get("conditions") or []:
        console.print(f"{cond['type']}={cond['status']} ({cond['reason']}): {cond.get('message', '')}", highlight=False)

    console.rule("[bold]7. clean up")
    objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, TRACE)
    core.delete_namespace(DEMO_NS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
