"""`python -m tests.harness.demo` (make demo): the whole flow on a real control plane, real BPF.

1. start etcd, kube-apiserver, controller-manager and scheduler on 127.0.0.1 (tests.harness.controlplane);
2. install the CRD, the namespace and the agent's ServiceAccount + RBAC from manifests/;
3. run the operator (`retransmit-operator`, a local process) and two simulated nodes, node-a
   in zone-a and node-b in zone-b (tests.harness.nodesim plays their kubelet; both share
   this host's kernel);
4. create namespace `shop` with two labelled pods, `web` on node-a and `load` on node-b, each
   with a network namespace and IPv4+IPv6 addresses of its own, and a dual-stack Service
   `web` (port `http` 80 -> web's 8090) that the real kube-proxy (tests.harness.kubeproxy)
   routes; 8% of the TCP data segments arriving at `web` from node-b's pod addresses are
   dropped (nftables inside web's namespace): the loss is on the path node-b -> node-a and
   nowhere else;
5. apply a trace for namespace `shop` (40s, reports every 2s), drive lossy traffic from load
   to web, straight to its addresses and through the Service's ClusterIPs, print
   `kubectl get rtrace` as the counts grow;
6. show the answer with the kubectl plugin, `kubectl retransmit show`: where the loss is
   (the node pair, the node that dropped and why), then the tables, where load's flows to
   the ClusterIPs name the Service and the backend kube-proxy chose
   (`(service shop/web:http -> web)`);
7. clean up everything (trace, operator, pods, nodes, control plane).
Needs root and `make k8s-binaries`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Console

from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION
from retransmit_core.naming import DEFAULT_NAMESPACE
from retransmit_operator.paths import ZONE_LABEL
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


NODES = {"node-a": "zone-a", "node-b": "zone-b"}   # simulated node -> its topology.kubernetes.io/zone
WEB_NODE, LOAD_NODE = "node-a", "node-b"
SERVICE, SERVICE_PORT, TARGET_PORT = "web", 80, 8090


def trace_manifest() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace",
        "metadata": {"name": TRACE},
        "spec": {
            "duration": f"{SECONDS}s",
            "namespaces": [DEMO_NS],
            "reportInterval": "2s",
            "topFlows": 10,
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


def create_service(core: Any) -> list[str]:
    """Service shop/web (dual-stack ClusterIPs, port `http` -> web's TARGET_PORT); its
    ClusterIPs once the EndpointSlice controller lists web's addresses as its backends."""
    import kubernetes

    core.create_namespaced_service(DEMO_NS, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE},
        "spec": {"selector": {"app": "web"}, "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": TARGET_PORT}]}})
    discovery = kubernetes.client.DiscoveryV1Api(core.api_client)
    web_ips = set(podtraffic.wait_pod_ips(core, DEMO_NS, "web"))

    def backends() -> set[str]:
        slices = discovery.list_namespaced_endpoint_slice(
            DEMO_NS, label_selector=f"kubernetes.io/service-name={SERVICE}").items
        return {ip for s in slices for e in s.endpoints or [] for ip in e.addresses}
    wait_until(lambda: backends() >= web_ips, f"Service {DEMO_NS}/{SERVICE}'s EndpointSlices to list web")
    return list(core.read_namespaced_service(SERVICE, DEMO_NS).spec.cluster_ips)


def load(web: podtraffic.PodNet, client: podtraffic.PodNet, web_ips: list[str], cluster_ips: list[str],
         loss_from: list[str], stop: threading.Event) -> None:
    """Duplex bulk transfers in both families straight to web, plus, in the first round, one
    longer connection through each of the Service's ClusterIPs (so its flows rank among the
    trace's topFlows: the ones whose backend the agents report, which places their
    retransmits at web's node in the path matrix) and SYN-ACK retransmits."""
    round_ = 0
    while not stop.is_set():
        for i, ip in enumerate(web_ips):
            podtraffic.bulk(web, client, ip, 8080 + i, connections=3, nbytes=1 << 20)
        if round_ == 0:
            for ip in cluster_ips:
                podtraffic.bulk(web, client, ip, SERVICE_PORT, connections=1, nbytes=4 << 20,
                                listen_ip="::", listen_port=TARGET_PORT)
            web.clear_loss()
            podtraffic.synack(web, client, web_ips[0], 8443, connections=2, seconds=3.5)
            web.data_loss_from(loss_from, LOSS)
        round_ += 1


def show(cp: ControlPlane) -> None:
    """The plugin's answer, as a user runs it: `kubectl retransmit show TRACE`."""
    plugin = str(Path(sys.executable).parent / "kubectl-retransmit")
    console.print(f"[bold]$ kubectl retransmit show {TRACE}[/bold]")
    out = subprocess.run([plugin, "show", TRACE, "--kubeconfig", str(cp.kubeconfig)], env=cp.env(),
                         capture_output=True, text=True)
    console.print(out.stdout.rstrip() or out.stderr.rstrip(), markup=False, highlight=False, soft_wrap=True)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it loads BPF programs and creates network namespaces)", file=sys.stderr)
        return 1
    import kubernetes

    from tests.harness.kubeproxy import KubeProxy, simulator_network
    from tests.harness.nodesim import NodeSimulator

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

        console.rule(f"[bold]3. operator and simulated nodes {', '.join(NODES)}")
        env = {**cp.env(), "RTRACE_NAMESPACE": SYSTEM_NS, "RTRACE_AGENT_SERVICE_ACCOUNT": AGENT_SA,
               "RTRACE_METRICS_PORT": "0", "RTRACE_SYNC_INTERVAL": "1s", "PYTHONUNBUFFERED": "1"}
        operator_log = cp.workdir / "operator.log"
        operator = start_process([str(Path(sys.executable).parent / "retransmit-operator"),
                                  "--kubeconfig", str(cp.kubeconfig)], operator_log, env=env)
        console.print(f"retransmit-operator pid {operator.pid}, log {operator_log}")
        try:
            zoned = {node: {ZONE_LABEL: zone} for node, zone in NODES.items()}
            with NodeSimulator(cp.kubeconfig, zoned) as sim, KubeProxy(
                    cp.kubeconfig, simulator_network(sim), workdir=sim.state_dir) as proxy:
                console.print(f"kube-proxy (nftables) routes Services between the nodes, log {proxy.log}")
                return _run(cp, sim, core, objects)
        finally:
            end_process(operator, grace=10)
            api.close()
            console.rule("[bold]cleaned up: operator, pods, nodes, control plane")


def _run(cp: ControlPlane, sim: Any, core: Any, objects: Any) -> int:
    console.rule(f"[bold]4. namespace {DEMO_NS}: web on {WEB_NODE}, load on {LOAD_NODE}, "
                 f"{LOSS}% loss on the data arriving at web from {LOAD_NODE}'s pods")
    core.create_namespace({"metadata": {"name": DEMO_NS}})
    wait_until(lambda: core.read_namespaced_service_account("default", DEMO_NS), "ServiceAccount default")
    podtraffic.create_pod(core, DEMO_NS, "web", WEB_NODE, {"app": "web"})
    podtraffic.create_pod(core, DEMO_NS, "load", LOAD_NODE, {"app": "load"})
    web_ips = podtraffic.wait_pod_ips(core, DEMO_NS, "web")
    load_ips = podtraffic.wait_pod_ips(core, DEMO_NS, "load")
    web, client = podtraffic.PodNet.of(sim, DEMO_NS, "web"), podtraffic.PodNet.of(sim, DEMO_NS, "load")
    load_node = sim.nodes_by_name[LOAD_NODE]
    loss_from = [str(load_node.pod_cidr_v4), str(load_node.pod_cidr_v6)]
    console.print(f"web  {', '.join(web_ips)}\nload {', '.join(load_ips)}")
    kubectl(cp, "get", "pods", "-n", DEMO_NS, "-o", "wide")
    cluster_ips = create_service(core)
    console.print(f"service {DEMO_NS}/{SERVICE} {', '.join(cluster_ips)} port http {SERVICE_PORT} -> web:{TARGET_PORT}")
    kubectl(cp, "get", "service,endpointslices", "-n", DEMO_NS)

    console.rule("[bold]5. apply a trace")
    manifest = trace_manifest()
    console.print(yaml.safe_dump(manifest, sort_keys=False), highlight=False)
    objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, manifest)

    def get() -> dict:
        return objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, TRACE)

    def attached() -> bool:
        nodes = (get().get("status") or {}).get("nodes") or []
        return {n.get("node") for n in nodes if n.get("phase") in ("Running", "Failed")} >= set(NODES)
    wait_until(attached, "the agents to attach and report", timeout=180, interval=0.5)
    kubectl(cp, "get", "daemonset,pods", "-n", SYSTEM_NS)
    failed = [n for n in get()["status"]["nodes"] if n["phase"] == "Failed"]
    if failed:
        console.print(f"[red]the agent cannot trace on this host: {failed[0].get('message')}")
        return 1

    stop = threading.Event()
    web.data_loss_from(loss_from, LOSS)
    driver = threading.Thread(target=load, args=(web, client, web_ips, cluster_ips, loss_from, stop), daemon=True)
    driver.start()
    try:
        while (get().get("status") or {}).get("phase") != "Completed":
            kubectl(cp, "get", "rtrace")
            time.sleep(5)
    finally:
        stop.set()
        driver.join(120)
        web.clear_loss()
    wait_until(lambda: get()["status"].get("phase") == "Completed", "the trace to complete", timeout=120)
    time.sleep(3)  # the agents' final reports, then one more aggregation

    console.rule("[bold]6. results: the plugin's answer, the trace and its per-node reports")
    show(cp)
    kubectl(cp, "get", "rtrace")
    kubectl(cp, "get", "rtreport", "-n", SYSTEM_NS, "-l", f"retransmit.dev/trace={TRACE}")

    console.rule("[bold]7. clean up")
    objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, TRACE)
    core.delete_namespace(DEMO_NS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
