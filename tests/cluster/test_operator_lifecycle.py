"""The operator against the real API server, controller-manager and scheduler, with the node
simulator playing kubelet for node-a and node-b.

The operator runs as its own process (`retransmit-operator`) with a ServiceAccount token
bound to exactly the rules of retransmit_operator.rbac, so every permission it uses is proven
here. The agent pods run a stand-in for the agent (it parses its args with the agent
contract, then waits for SIGTERM): these tests are about the operator; the node entries
an agent would write are written by the test with the agents' field managers.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import kubernetes
import kubernetes.dynamic
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from retransmit_operator import rbac
from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION, NodeStatus
from retransmit_core.naming import report_object, trace_selector
from retransmit_core.contract import parse_agent_args
from tests.harness.controlplane import free_port, wait_gone
from tests.harness.controlplane import wait_until as _wait_until

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = Path.home() / ".cache" / "retransmit-operator" / "bin" / "kubectl"
SYNC = "1s"
# The stand-in agent: proves the pod got a valid `retransmit-agent cluster` invocation.
STAND_IN = (
    "import signal, sys, time\n"
    "from retransmit_core.contract import parse_agent_args\n"
    "inv = parse_agent_args(sys.argv[1:])\n"
    "print('stand-in agent for trace', inv.trace, 'topFlows', inv.spec.top_flows, flush=True)\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "time.sleep(1e9)\n"
)
SIM_SELECTOR = {"rtrace.dev/simulated": "true"}


# ---------------------------------------------------------------------------- helpers

def wait_until(predicate, what: str, timeout: float = 180):
    """The harness's wait with a generous bound: two shared cores, other suites running."""
    return _wait_until(predicate, what, timeout=timeout)


class OperatorProcess:
    """`retransmit-operator` as a subprocess of the test."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "KUBECONFIG": str(kubeconfig),
            "RTRACE_NAMESPACE": namespace,
            "RTRACE_AGENT_SERVICE_ACCOUNT": "retransmit-agent",
            "RTRACE_AGENT_COMMAND": f"{shlex.quote(sys.executable)} -c {shlex.quote(STAND_IN)}",
            "RTRACE_METRICS_PORT": str(self.port),
            "RTRACE_SYNC_INTERVAL": SYNC,
            "RTRACE_LOG_LEVEL": "INFO",
        }
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "OperatorProcess":
        out = open(self.log, "a")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "retransmit-operator")],
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        wait_until(self._ready, "the operator's /readyz", timeout=120)
        return self

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"operator exited with {self.proc.returncode}:\n{self.tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:]) if self.log.exists() else ""


def _ssa(api: kubernetes.client.ApiClient, body: dict) -> None:
    """Server-side apply of a manifest as admin (field manager rtrace-test)."""
    dyn = kubernetes.dynamic.DynamicClient(api)
    resource = dyn.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    resource.server_side_apply(body=body, name=body["metadata"]["name"],
                               namespace=body["metadata"].get("namespace"), field_manager="rtrace-test", force_conflicts=True)


@pytest.fixture(scope="module")
def admin(control_plane):
    api = control_plane.api_client()
    yield api
    api.close()


@pytest.fixture(scope="module")
def crd_installed(admin):
    ext = kubernetes.client.ApiextensionsV1Api(admin)
    for path, plural in (("crd.yaml", PLURAL), ("crd-nodereports.yaml", REPORT_PLURAL)):
        _ssa(admin, yaml.safe_load((ROOT / "manifests" / path).read_text()))
        wait_until(lambda: any(c.type == "Established" and c.status == "True"
                               for c in ext.read_custom_resource_definition(f"{plural}.{GROUP}").status.conditions or []),
                   f"the CRD {plural} to be established")


@pytest.fixture(scope="module")
def operator_namespace(admin, control_plane):
    name = f"rtrace-op-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_service_account(name, {"metadata": {"name": "retransmit-agent"}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator_kubeconfig(admin, control_plane, operator_namespace, tmp_path_factory):
    """A kubeconfig for ServiceAccount retransmit-operator bound to exactly rbac.*_RULES."""
    ns, sa = operator_namespace, "retransmit-operator"
    rbac_api = kubernetes.client.RbacAuthorizationV1Api(admin)
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    role_name = f"rtrace-operator-{ns}"
    rbac_api.create_cluster_role({"metadata": {"name": role_name}, "rules": rbac.CLUSTER_RULES})
    rbac_api.create_cluster_role_binding({"metadata": {"name": role_name}, "subjects": subject,
                                          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name}})
    for role_ns, rules in ((ns, rbac.NAMESPACE_RULES), ("default", rbac.EVENTS_RULES)):
        rbac_api.create_namespaced_role(role_ns, {"metadata": {"name": role_name}, "rules": rules})
        rbac_api.create_namespaced_role_binding(role_ns, {"metadata": {"name": role_name}, "subjects": subject,
                                                          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name}})
    token = control_plane.service_account_token(ns, sa, expiration_seconds=7200)
    path = control_plane.kubeconfig_for_token(token, tmp_path_factory.mktemp("operator") / "kubeconfig")
    yield path
    rbac_api.delete_cluster_role(role_name)
    rbac_api.delete_cluster_role_binding(role_name)
    for role_ns in (ns, "default"):
        rbac_api.delete_namespaced_role(role_name, role_ns)
        rbac_api.delete_namespaced_role_binding(role_name, role_ns)


@pytest.fixture(scope="module")
def operator(crd_installed, node_simulator, operator_kubeconfig, operator_namespace, tmp_path_factory):
    op = OperatorProcess(operator_kubeconfig, operator_namespace, tmp_path_factory.mktemp("operator-log") / "operator.log")
    op.start()
    yield op
    alive = op.alive()
    if alive:
        op.stop()
    print(op.tail(200))
    assert alive, f"the operator process died:\n{op.tail()}"


@pytest.fixture
def custom(admin):
    return kubernetes.client.CustomObjectsApi(admin)


@pytest.fixture
def traces(custom):
    """Create traces through this; they are deleted after the test."""
    made: list[str] = []

    def create(spec: dict, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:8]}"
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name}, "spec": spec})
        made.append(name)
        return name

    yield create
    for name in made:
        try:
            custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as e:
            if e.status != 404:
                raise


def api_requests(operator: OperatorProcess, operation: str | None = None) -> float:
    """The operator's own API requests so far (rtrace_operator_api_requests_total), of every
    operation or of one ("get daemonset"), whatever the answer's code."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in operator.metrics().splitlines()
               if line.startswith("rtrace_operator_api_requests_total{")
               and (operation is None or f'operation="{operation}"' in line))


def sync_passes(operator: OperatorProcess) -> float:
    """Completed sync passes over every trace (rtrace_operator_sync_passes_total)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in operator.metrics().splitlines()
               if line.startswith("rtrace_operator_sync_passes_total "))


def wait_sync_passes(operator: OperatorProcess, passes: int = 2) -> None:
    """Until `passes` more sync passes completed: "nothing happened" then means the operator
    looked and did nothing, not that it had no time to."""
    target = sync_passes(operator) + passes
    wait_until(lambda: sync_passes(operator) >= target, f"{passes} more sync passes", timeout=120)


def get_trace(custom, name: str) -> dict:
    return custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def condition(trace: dict, type_: str) -> dict:
    return next((c for c in (trace.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def wait_trace(custom, name: str, what: str, predicate, timeout: float = 180) -> dict:
    def check():
        t = get_trace(custom, name)
        return t if predicate(t) else None
    return wait_until(check, f"trace {name}: {what}", timeout=timeout)


def phase(t: dict) -> str | None:
    return (t.get("status") or {}).get("phase")


def apply_node_entry(admin, namespace: str, trace: str, entry: dict) -> None:
    """What an agent does: server-side apply of its own node's RetransmitNodeReport (owned by the trace)."""
    custom = kubernetes.client.CustomObjectsApi(admin)
    uid = get_trace(custom, trace)["metadata"]["uid"]
    body = report_object(trace, uid, entry["node"], namespace, NodeStatus.model_validate(entry))
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, REPORT_PLURAL, body["metadata"]["name"], body,
        field_manager=f"rtrace-agent/{entry['node']}", force=True, _content_type="application/apply-patch+yaml")


def node_entry(node: str, retransmits: int, flows: list[dict], phase_: str = "Running", **extra) -> dict:
    return {"node": node, "phase": phase_, "retransmits": retransmits, "synackRetransmits": 1, "lostEvents": 0,
            "flows": len(flows), "byState": {"ESTABLISHED": retransmits}, "topFlows": flows,
            "lastReportTime": datetime.utcnow().replace(microsecond=0).isoformat() + "Z", **extra}


def trace_events(core, name: str) -> list:
    return [e for e in core.list_namespaced_event("default").items if e.involved_object.name == name]


def wait_event(core, name: str, reason: str, type_: str = "Normal"):
    """The operator posts an Event right after the status write that made the transition."""
    return wait_until(lambda: [e for e in trace_events(core, name) if (e.reason, e.type) == (reason, type_)],
                      f"a {type_} {reason} event about {name}")


def daemonset(apps, ns: str, trace: str):
    try:
        return apps.read_namespaced_daemon_set(f"rtrace-{trace}", ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


# ---------------------------------------------------------------------------- tests

def test_sample_trace_gets_an_owned_daemonset_rendered_from_its_spec(operator, operator_namespace, traces, custom, apps, core, node_simulator):
    spec = {
        "nodeSelector": SIM_SELECTOR,
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "net", "effect": "NoSchedule"}],
        "filter": {"ports": [5432], "ipFamilies": ["IPv4", "IPv6"]},
        "reportInterval": "2s",
    }
    name = traces(spec)
    ds = wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet")
    trace = get_trace(custom, name)
    (owner,) = ds.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid, owner.controller, owner.block_owner_deletion) == (
        "RetransmitTrace", name, trace["metadata"]["uid"], True, True)
    assert ds.spec.selector.match_labels["retransmit.dev/trace"] == name
    pod = ds.spec.template.spec
    assert pod.node_selector == {**SIM_SELECTOR, "kubernetes.io/os": "linux"}
    assert [(t.key, t.operator, t.value, t.effect) for t in pod.tolerations] == [("dedicated", "Equal", "net", "NoSchedule")]
    assert pod.host_network is True and pod.service_account_name == "retransmit-agent"
    (container,) = pod.containers
    invocation = parse_agent_args(container.args)
    assert invocation.trace == name and invocation.spec.filter.ports == [5432]
    mounts = {m.mount_path: m.read_only for m in container.volume_mounts}
    for path in ("/sys/kernel/debug", "/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src"):
        assert mounts[path] is True

    # The real controller-manager and scheduler place one agent on each simulated node, and
    # the simulator runs the rendered command: the stand-in parsed its args.
    def agent_pods():
        pods = core.list_namespaced_pod(operator_namespace, label_selector=f"retransmit.dev/trace={name}").items
        return pods if sorted(p.spec.node_name or "" for p in pods) == ["node-a", "node-b"] else None
    pods = wait_until(agent_pods, "one agent pod per node")
    for p in pods:
        wait_until(lambda: f"stand-in agent for trace {name}" in node_simulator.log_path(operator_namespace, p.metadata.name).read_text(),
                   f"{p.metadata.name} to start the stand-in")

    running = wait_trace(custom, name, "Running with the desired count", lambda t: phase(t) == "Running"
                         and ((t["status"].get("summary") or {}).get("nodesDesired") == 2))
    assert running["status"]["startTime"] and running["status"]["observedGeneration"] == 1
    assert running["status"]["summary"]["nodes"] == "0/2"
    assert condition(running, "AgentsReady")["status"] == "False"
    assert condition(running, "Ready")["observedGeneration"] == 1
    wait_event(core, name, "AgentsScheduled")


def test_a_running_traces_passes_read_its_daemonset_from_the_watch_not_with_a_get(operator, operator_namespace, traces,
                                                                                   custom, apps):
    """The agents' DaemonSets come from the operator's watch (list + watch in its namespace,
    granted by rbac.NAMESPACE_RULES): nodesDesired follows the DaemonSet controller's status,
    which no write of the operator returned, and passes make no GET or list of DaemonSets."""
    name = traces({"nodeSelector": SIM_SELECTOR})
    wait_trace(custom, name, "Running with the desired count", lambda t: phase(t) == "Running"
               and ((t["status"].get("summary") or {}).get("nodesDesired") == 2))
    reads = api_requests(operator, "get daemonset") + api_requests(operator, "list daemonsets")
    wait_sync_passes(operator, 3)
    assert api_requests(operator, "get daemonset") + api_requests(operator, "list daemonsets") == reads
    assert "watch of agents' DaemonSets" not in operator.log.read_text()   # never interrupted (a 403, say)


def test_node_entries_from_two_agents_are_aggregated_with_remote_pod_attribution(operator, operator_namespace, traces, custom, core, admin, namespace):
    # A real pod on node-b gets an address from the simulator; a flow towards it from node-a
    # must name it on the remote side, through the operator's cluster-wide pod index.
    core.create_namespaced_pod(namespace, {"metadata": {"name": "db"}, "spec": {
        "nodeName": "node-b", "containers": [{"name": "db", "image": "none", "command": ["sleep", "1000"]}]}})
    db = wait_until(lambda: (lambda p: p if p.status.pod_ips and len(p.status.pod_ips) == 2 else None)(
        core.read_namespaced_pod("db", namespace)), "pod db to get its addresses")
    ips = {(":" in a.ip): a.ip for a in db.status.pod_ips}
    v4, v6 = ips[False], ips[True]

    name = traces({"nodeSelector": SIM_SELECTOR, "topFlows": 5})
    wait_trace(custom, name, "Running", lambda t: phase(t) == "Running")
    apply_node_entry(admin, operator_namespace, name, node_entry("node-a", 7, [
        {"local": {"ip": "198.18.250.1", "port": 40000}, "remote": {"ip": v4, "port": 5432}, "family": "IPv4", "retransmits": 5},
        {"local": {"ip": "fd00::250:1", "port": 40001}, "remote": {"ip": v6, "port": 5432}, "family": "IPv6", "retransmits": 2},
    ]))
    apply_node_entry(admin, operator_namespace, name, node_entry("node-b", 4, [
        {"local": {"ip": v4, "port": 5432, "pod": "db", "namespace": namespace}, "remote": {"ip": "198.18.250.1", "port": 40000},
         "family": "IPv4", "retransmits": 4},
    ], topPods=[{"pod": "db", "namespace": namespace, "node": "node-b", "retransmits": 4}]))
    done = wait_trace(custom, name, "summary of both nodes", lambda t: (t["status"].get("summary") or {}).get("nodes") == "2/2")
    s = done["status"]["summary"]
    assert (s["retransmits"], s["synackRetransmits"], s["nodesReporting"], s["nodesDesired"]) == (11, 2, 2, 2)
    assert s["byState"] == {"ESTABLISHED": 11}
    flows = {(f["node"], f["local"]["port"]): f for f in s["topFlows"]}
    assert [f["retransmits"] for f in s["topFlows"]] == [5, 4, 2]
    assert (flows[("node-a", 40000)]["remote"]["pod"], flows[("node-a", 40000)]["remote"]["namespace"]) == ("db", namespace)
    assert flows[("node-a", 40001)]["remote"]["pod"] == "db"  # IPv6 too
    # Pods by what they sent, as their nodes' agents counted them (node-a's flows are not a pod's).
    assert s["topPods"] == [{"pod": "db", "namespace": namespace, "node": "node-b", "retransmits": 4}]
    assert condition(done, "Ready")["status"] == "True" and condition(done, "AgentsReady")["reason"] == "AllAgentsReporting"

    # Written only when something changed: with nothing new, the object stays as it is over
    # two sync passes. Waited for, because the agent pods the simulator starts may still turn
    # Running after the summary says 2/2 (the coverage in the status then changes once); an
    # operator that rewrote an unchanged status every pass never gets there.
    def unchanged_over_two_passes():
        version = get_trace(custom, name)["metadata"]["resourceVersion"]
        wait_sync_passes(operator)
        return get_trace(custom, name)["metadata"]["resourceVersion"] == version
    wait_until(unchanged_over_two_passes, "the trace to stay unwritten over two sync passes", timeout=120)

    # The trace's status is the operator's alone; each node's report is its agent's.
    managers = {m["manager"] for m in done["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert managers == {"rtrace-operator"}
    rows = {n["node"]: n for n in done["status"]["nodes"]}
    assert sorted(rows) == ["node-a", "node-b"] and rows["node-a"]["retransmits"] == 7 and rows["node-a"]["reporting"]
    reports = custom.list_namespaced_custom_object(GROUP, VERSION, operator_namespace, REPORT_PLURAL,
                                                   label_selector=trace_selector(name))["items"]
    assert {r["spec"]["node"]: {m["manager"] for m in r["metadata"]["managedFields"]} for r in reports} == {
        "node-a": {"rtrace-agent/node-a"}, "node-b": {"rtrace-agent/node-b"}}

    # A node that fails shows as Degraded, naming the node and its message.
    apply_node_entry(admin, operator_namespace, name, node_entry("node-b", 4, [], phase_="Failed", message="tracefs not mounted: mount -t tracefs"))
    degraded = wait_trace(custom, name, "Degraded", lambda t: condition(t, "Degraded").get("status") == "True")
    assert "node-b: tracefs not mounted" in condition(degraded, "Degraded")["message"]
    wait_event(core, name, "NodeFailed", "Warning")


def test_remote_ends_are_named_as_a_service_a_node_port_a_node_or_outside(
        operator, operator_namespace, traces, custom, core, admin, namespace, node_simulator):
    """A real Service (its ClusterIP allocated by the API server, a NodePort), the simulated
    nodes' real addresses: flows towards them in a node's report come out named in the
    summary, and the busiest Services are counted."""
    core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": {
        "type": "NodePort", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    svc = core.read_namespaced_service("web", namespace)
    vip, node_port = svc.spec.cluster_ip, svc.spec.ports[0].node_port
    node_b = next(n for n in node_simulator.nodes if n.name == "node-b")

    name = traces({"nodeSelector": SIM_SELECTOR, "topFlows": 10})
    wait_trace(custom, name, "Running", lambda t: phase(t) == "Running")
    apply_node_entry(admin, operator_namespace, name, node_entry("node-a", 16, [
        {"local": {"ip": "198.18.250.1", "port": 40000 + i}, "remote": {"ip": ip, "port": port}, "family": "IPv4",
         "retransmits": n}
        for i, (ip, port, n) in enumerate([(vip, 80, 6), (node_b.ip_v4, node_port, 4), (node_b.ip_v4, 22, 3),
                                           ("203.0.113.9", 443, 3)])]))

    def named(t):
        flows = {f["local"]["port"]: f["remote"] for f in (t["status"].get("summary") or {}).get("topFlows") or []}
        return flows if len(flows) == 4 and flows[40000].get("service") else None
    done = wait_trace(custom, name, "the Service named", named)
    flows = named(done)
    assert (flows[40000]["service"], flows[40000]["namespace"], flows[40000]["servicePort"]) == ("web", namespace, "http")
    assert (flows[40001]["service"], flows[40001]["node"], flows[40001]["servicePort"]) == ("web", "node-b", "http")
    assert flows[40002]["node"] == "node-b" and "service" not in flows[40002]
    assert flows[40003]["outside"] is True
    assert done["status"]["summary"]["topServices"] == [{"namespace": namespace, "service": "web", "retransmits": 10}]


def test_kubectl_get_shows_phase_nodes_retransmits_age_and_explain_documents_the_filter(operator, operator_namespace, traces, custom, admin, control_plane):
    name = traces({"nodeSelector": SIM_SELECTOR})
    wait_trace(custom, name, "Running", lambda t: phase(t) == "Running")
    apply_node_entry(admin, operator_namespace, name, node_entry("node-a", 3, []))
    wait_trace(custom, name, "retransmits in summary", lambda t: (t["status"].get("summary") or {}).get("retransmits") == 3)
    out = subprocess.run([str(KUBECTL), "get", "rtrace", name], env=control_plane.env(), capture_output=True, text=True, check=True).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "NODES", "RETRANSMITS", "AGE"]
    assert row.split()[:4] == [name, "Running", "1/2", "3"]
    describe = subprocess.run([str(KUBECTL), "describe", "rtrace", name], env=control_plane.env(),
                              capture_output=True, text=True, check=True).stdout
    assert "AgentsScheduled" in describe  # Events about the cluster-scoped trace are found
    # The per-node table: the trace's reports, by label.
    out = subprocess.run([str(KUBECTL), "-n", operator_namespace, "get", "rtreport", "-l", f"retransmit.dev/trace={name}"],
                         env=control_plane.env(), capture_output=True, text=True, check=True).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "NODE", "PHASE", "RETRANSMITS", "SYN-ACK", "LOST", "LAST", "REPORT", "AGE"]
    assert row.split()[:6] == [f"{name}.node-a", "node-a", "Running", "3", "1", "0"]
    explain = subprocess.run([str(KUBECTL), "explain", "rtrace.spec.filter"], env=control_plane.env(),
                             capture_output=True, text=True, check=True).stdout
    assert "remoteCIDRs" in explain and "Kernel-side filters" in explain and "10.0.0.0/8" in explain


def test_spec_change_rolls_the_daemonset(operator, operator_namespace, traces, custom, apps):
    name = traces({"nodeSelector": SIM_SELECTOR, "topFlows": 10})
    ds = wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet")
    before = ds.spec.template.metadata.annotations["retransmit.dev/spec-hash"]
    custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": {"topFlows": 3}})

    def rolled():
        d = daemonset(apps, operator_namespace, name)
        return d if d.spec.template.metadata.annotations["retransmit.dev/spec-hash"] != before else None
    ds = wait_until(rolled, "the DaemonSet to roll")
    assert parse_agent_args(ds.spec.template.spec.containers[0].args).spec.top_flows == 3
    t = wait_trace(custom, name, "observedGeneration 2", lambda t: (t.get("status") or {}).get("observedGeneration") == 2)
    assert all(c["observedGeneration"] == 2 for c in t["status"]["conditions"])


def test_trace_with_duration_completes_removes_its_agents_and_keeps_results(operator, operator_namespace, traces, custom, apps, core, admin):
    name = traces({"nodeSelector": SIM_SELECTOR, "duration": "20s"})
    wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet")
    wait_trace(custom, name, "Running", lambda t: phase(t) == "Running")
    apply_node_entry(admin, operator_namespace, name, node_entry("node-a", 12, []))
    done = wait_trace(custom, name, "Completed", lambda t: phase(t) == "Completed")
    assert daemonset(apps, operator_namespace, name) is None
    start = datetime.fromisoformat(done["status"]["startTime"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(done["status"]["completionTime"].replace("Z", "+00:00"))
    assert end - start >= timedelta(seconds=20)
    assert done["status"]["summary"]["retransmits"] == 12 and done["status"]["nodes"][0]["retransmits"] == 12
    assert condition(done, "Ready")["reason"] == "Completed"
    wait_event(core, name, "Completed")
    # Agents' pods go with their DaemonSet.
    wait_until(lambda: not core.list_namespaced_pod(operator_namespace, label_selector=f"retransmit.dev/trace={name}").items,
               "the agent pods to go")
    # A late final report (an agent flushing on SIGTERM) still lands in the summary.
    apply_node_entry(admin, operator_namespace, name, node_entry("node-a", 13, [], phase_="Completed"))
    wait_trace(custom, name, "the final report in the summary", lambda t: t["status"]["summary"]["retransmits"] == 13)
    assert phase(get_trace(custom, name)) == "Completed"


def test_completion_time_survives_an_operator_restart_mid_trace(operator, operator_namespace, traces, custom, apps):
    name = traces({"nodeSelector": SIM_SELECTOR, "duration": "20s"})
    running = wait_trace(custom, name, "Running", lambda t: phase(t) == "Running")
    start = running["status"]["startTime"]
    uid = wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet").metadata.uid
    assert operator.stop() == 0, operator.tail()   # SIGTERM: a clean exit
    time.sleep(5)                                   # the trace keeps running without an operator
    operator.start()
    wait_sync_passes(operator, 1)
    before, ds, after = phase(get_trace(custom, name)), daemonset(apps, operator_namespace, name), phase(get_trace(custom, name))
    # The restarted operator never makes new agents for a running trace: the same DaemonSet
    # goes on, or (a slow restart, past the end) it is being removed with the trace's end.
    assert ds is None or ds.metadata.uid == uid
    if before == after == "Running":
        assert ds is not None
    done = wait_trace(custom, name, "Completed", lambda t: phase(t) == "Completed")
    assert done["status"]["startTime"] == start     # the restart did not restart the clock
    end = datetime.fromisoformat(done["status"]["completionTime"].replace("Z", "+00:00"))
    assert end - datetime.fromisoformat(start.replace("Z", "+00:00")) >= timedelta(seconds=20)
    assert daemonset(apps, operator_namespace, name) is None


def reports_of(custom, namespace: str, trace: str) -> dict[str, dict]:
    """The trace's RetransmitNodeReports by node."""
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, REPORT_PLURAL,
                                                 label_selector=trace_selector(trace))["items"]
    return {r["spec"]["node"]: r for r in items}


@pytest.mark.parametrize("propagation", ["Background", "Foreground"])
def test_deleting_a_trace_garbage_collects_its_daemonset_pods_and_reports(operator, operator_namespace, traces, custom, apps, core, admin, propagation):
    name = traces({"nodeSelector": SIM_SELECTOR})
    wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet")
    wait_until(lambda: len(core.list_namespaced_pod(operator_namespace, label_selector=f"retransmit.dev/trace={name}").items) == 2,
               "two agent pods")
    for node in ("node-a", "node-b"):
        apply_node_entry(admin, operator_namespace, name, node_entry(node, 2, []))
    assert sorted(reports_of(custom, operator_namespace, name)) == ["node-a", "node-b"]
    assert not get_trace(custom, name)["metadata"].get("finalizers")  # nothing blocks deletion
    custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name, propagation_policy=propagation)
    wait_until(lambda: daemonset(apps, operator_namespace, name) is None, "the DaemonSet to be collected")
    wait_until(lambda: not core.list_namespaced_pod(operator_namespace, label_selector=f"retransmit.dev/trace={name}").items,
               "the agent pods to be collected")
    wait_until(lambda: not reports_of(custom, operator_namespace, name), "the node reports to be collected")

    wait_gone(lambda: get_trace(custom, name), "the trace to be gone", timeout=180)
    # The operator does not bring the agents back for a trace that is gone or going.
    wait_sync_passes(operator)
    assert daemonset(apps, operator_namespace, name) is None


def test_a_node_that_leaves_the_selector_is_marked_and_its_report_kept_through_completion(
        operator, operator_namespace, traces, custom, apps, core, admin):
    """node-b leaves the trace's node selector: its agent pod goes, its report goes silent, the
    operator marks it departed (not counted as desired nor reporting, counts kept); after
    completion both reports stay with their final counts."""
    label = f"rtrace.dev/leave-{uuid.uuid4().hex[:6]}"
    for node in ("node-a", "node-b"):
        core.patch_node(node, {"metadata": {"labels": {label: "yes"}}})
    try:
        name = traces({"nodeSelector": {label: "yes"}, "reportInterval": "1s", "duration": "90s"})
        wait_until(lambda: len(core.list_namespaced_pod(operator_namespace, label_selector=f"retransmit.dev/trace={name}").items) == 2,
                   "two agent pods")
        for node, count in (("node-a", 5), ("node-b", 7)):
            apply_node_entry(admin, operator_namespace, name, node_entry(node, count, []))
        wait_trace(custom, name, "both nodes reporting", lambda t: (t["status"].get("summary") or {}).get("nodes") == "2/2")

        core.patch_node("node-b", {"metadata": {"labels": {label: None}}})
        wait_until(lambda: [p.spec.node_name for p in core.list_namespaced_pod(
            operator_namespace, label_selector=f"retransmit.dev/trace={name}").items] == ["node-a"], "node-b's agent pod to go")
        marked = wait_until(lambda: (lambda r: r if (r.get("status") or {}).get("departed") else None)(
            reports_of(custom, operator_namespace, name)["node-b"]), "node-b's report marked departed")
        assert marked["status"]["departedTime"] and marked["spec"]["retransmits"] == 7
        t = wait_trace(custom, name, "node-b's row departed",
                       lambda t: {r["node"]: r.get("departed", False) for r in t["status"]["nodes"]} == {"node-a": False, "node-b": True})
        assert t["status"]["summary"]["retransmits"] == 12  # its counts stay in the totals
        assert t["status"]["summary"]["nodesDesired"] == 1 and "node-b" not in condition(t, "AgentsReady")["message"]

        done = wait_trace(custom, name, "Completed", lambda t: phase(t) == "Completed")
        reports = reports_of(custom, operator_namespace, name)
        assert {n: r["spec"]["retransmits"] for n, r in reports.items()} == {"node-a": 5, "node-b": 7}
        assert reports["node-b"]["status"]["departed"] and not (reports["node-a"].get("status") or {}).get("departed")
        assert done["status"]["summary"]["retransmits"] == 12
    finally:
        for node in ("node-a", "node-b"):
            core.patch_node(node, {"metadata": {"labels": {label: None}}})


# ---------------------------------------------------------------------------- invalid specs

# Refused by the API server at create time: (spec or metadata name, text the error must contain).
SCHEMA_REFUSED = [
    ({"duration": "banana"}, "spec.duration"),
    ({"duration": "0s"}, "spec.duration must be longer than 0s"),
    ({"reportInterval": "500ms"}, "spec.reportInterval must be at least 1s"),
    ({"reportInterval": "10"}, "spec.reportInterval"),
    ({"topFlows": 0}, "spec.topFlows"),
    ({"topFlows": 101}, "spec.topFlows"),
    ({"topFlows": "ten"}, "spec.topFlows"),
    ({"events": {"keep": 101}}, "spec.events.keep"),
    ({"events": {"maxPerSecond": -1}}, "spec.events.maxPerSecond"),
    ({"filter": {"ports": [0]}}, "spec.filter.ports[0]"),
    ({"filter": {"ports": [443, 70000]}}, "spec.filter.ports[1]"),
    ({"filter": {"ports": [80, 80]}}, "spec.filter.ports[1]"),
    ({"filter": {"remoteCIDRs": ["10.0.0.0/33"]}}, "spec.filter.remoteCIDRs[0]"),
    ({"filter": {"remoteCIDRs": ["banana"]}}, "spec.filter.remoteCIDRs[0]"),
    ({"filter": {"states": ["TCP_ESTABLISHED"]}}, "spec.filter.states[0]"),
    ({"filter": {"ipFamilies": ["IPv5"]}}, "spec.filter.ipFamilies[0]"),
    ({"filter": {"bogus": True}}, "spec.filter.bogus"),
    ({"tolerations": [{"operator": "Exists", "value": "x"}]}, "tolerations[].value must be empty when operator is Exists"),
    ({"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}, "tolerationSeconds applies only to effect NoExecute"),
    ({"tolerations": [{"operator": "Sometimes", "key": "k"}]}, "spec.tolerations[0].operator"),
    ({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}, "operators In and NotIn need values"),
    ({"namespaces": ["Kube_System"]}, "spec.namespaces[0]"),
    ({"nodeSelector": {"zone": "has space"}}, "spec.nodeSelector.zone"),
    ("x" * 60, "metadata.name: at most 56 characters"),
    ("a.b", "metadata.name: use lowercase letters, digits and '-' only, no dots"),
]
# Past the schema (it cannot express these), caught by the operator: (spec, field named in the message).
OPERATOR_REFUSED = [
    ({"filter": {"remoteCIDRs": ["10.0.0.0/8", "1:::2/64"]}}, "spec.filter.remoteCIDRs[1]"),
    ({"nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector[bad key!]"),
    ({"podSelector": {"matchLabels": {"-app": "web"}}}, "spec.podSelector.matchLabels[-app]"),
    ({"podSelector": {"matchExpressions": [{"key": "a b", "operator": "Exists"}]}}, "spec.podSelector.matchExpressions[0].key"),
    # Only the DaemonSet's validation knows toleration keys: the API server's refusal is the message.
    ({"nodeSelector": SIM_SELECTOR, "tolerations": [{"key": "bad key!", "operator": "Exists"}]}, "tolerations[0].key"),
]


@pytest.mark.parametrize("spec, expected", SCHEMA_REFUSED, ids=[f"schema-{i}" for i in range(len(SCHEMA_REFUSED))])
def test_invalid_spec_is_refused_by_the_api_server_naming_the_field(crd_installed, custom, spec, expected):
    name, body_spec = (spec, {}) if isinstance(spec, str) else (f"bad-{uuid.uuid4().hex[:8]}", spec)
    with pytest.raises(ApiException) as refused:
        custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "RetransmitTrace", "metadata": {"name": name}, "spec": body_spec,
        }, field_validation="Strict")   # what kubectl apply does by default
    assert refused.value.status in (400, 422), refused.value.body  # 400: strict decoding (unknown field)
    message = json.loads(refused.value.body)["message"]
    assert expected in message, message


def test_specs_past_the_schema_end_failed_invalid_spec_without_crash_or_retry_storm(operator, operator_namespace, traces, custom, apps, core):
    names = {traces(spec): field for spec, field in OPERATOR_REFUSED}
    for name, field in names.items():
        t = wait_trace(custom, name, "Failed", lambda t: phase(t) == "Failed")
        ready = condition(t, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert field in ready["message"], ready["message"]
        assert daemonset(apps, operator_namespace, name) is None
        wait_event(core, name, "InvalidSpec", "Warning")
    # No retry storm: while nothing changes, a few sync passes write nothing and ask the API
    # server nothing (a trace fails once per spec generation).
    versions = {n: get_trace(custom, n)["metadata"]["resourceVersion"] for n in names}
    requests = api_requests(operator)
    wait_sync_passes(operator, 3)
    assert {n: get_trace(custom, n)["metadata"]["resourceVersion"] for n in names} == versions
    assert api_requests(operator) == requests
    assert operator.alive(), operator.tail()
    assert 'rtrace_operator_traces{phase="Failed"}' in operator.metrics()


def test_running_trace_edited_to_an_invalid_spec_stops_its_agents_and_recovers_when_fixed(operator, operator_namespace, traces, custom, apps):
    name = traces({"nodeSelector": SIM_SELECTOR})
    wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet")
    custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": {"filter": {"remoteCIDRs": ["1:::2/64"]}}})
    failed = wait_trace(custom, name, "Failed", lambda t: phase(t) == "Failed")
    assert "spec.filter.remoteCIDRs[0]" in condition(failed, "Ready")["message"]
    wait_until(lambda: daemonset(apps, operator_namespace, name) is None, "the DaemonSet to go")
    custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": {"filter": {"remoteCIDRs": ["fd00::/8"]}}})
    wait_trace(custom, name, "Running again", lambda t: phase(t) == "Running")
    wait_until(lambda: daemonset(apps, operator_namespace, name), "the DaemonSet again")
    assert operator.alive()
