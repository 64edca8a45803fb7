"""The test cluster behaves as a real one: one writer per part of a node report, DaemonSet
pods from the real controller-manager and scheduler run by the node simulator, pod
networking (IPv4 and IPv6, own netns or the host's) and RBAC for tokens and pods."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import uuid

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.harness.controlplane import pod_ready, wait_pod, wait_until

pytestmark = pytest.mark.cluster

PY = sys.executable   # pods run on this host: the venv's Python has the kubernetes client
MERGE = "application/merge-patch+json"


def python_container(name: str, script: str, **extra) -> dict:
    return {"name": name, "image": "nodesim/python", "command": [PY, "-u", "-c", textwrap.dedent(script)],
            **extra}


def field_env(**paths: str) -> list[dict]:
    return [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in paths.items()]


def log_lines(sim, namespace: str, pod: str) -> list[str]:
    """The container's output without the simulator's own start markers."""
    text = sim.log_path(namespace, pod).read_text()
    return [line for line in text.splitlines() if not line.startswith("--- node simulator")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- server-side apply on a status list-map ----------------------------------------------

def test_a_node_report_has_one_writer_per_part_the_agent_its_spec_the_operator_its_status(
        installed, kube, control_plane):
    """Today's design on the real API server and the real CRD: each agent server-side-applies
    its own report's spec (ReportWriter, field manager rtrace-agent/<node>), the operator
    alone marks the report's status (KubeApi.apply_report_status, through /status). Neither
    write touches the other's part, and status sent to the main resource is dropped."""
    from retransmit_agent.reportwriter import ReportTarget, ReportWriter
    from retransmit_core.api import API_VERSION, GROUP, KIND, PLURAL, REPORT_PLURAL, VERSION, NodeStatus, Phase
    from retransmit_operator.kube import KubeApi, client_configuration

    from tests.harness.tracecluster import SYSTEM_NS

    co = kubernetes.client.CustomObjectsApi(kube)
    name = f"writers-{uuid.uuid4().hex[:6]}"
    # A real owner: the garbage collector removes reports whose trace does not exist.
    trace = co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": {}})
    writer = ReportWriter(kube, ReportTarget(name, trace["metadata"]["uid"], "node-a", SYSTEM_NS))
    operator = KubeApi(client_configuration(str(control_plane.kubeconfig)))
    try:
        def entry(count: int) -> NodeStatus:
            return NodeStatus(node="node-a", phase=Phase.RUNNING, retransmits=count)

        writer.create(entry(1))
        writer.apply(entry(5))
        asyncio.run(operator.apply_report_status(SYSTEM_NS, writer.target.name, {"departed": True}))
        writer.apply(entry(9))   # the agent's next write: the whole spec, no status
        stored = writer.read()
        assert stored["spec"]["retransmits"] == 9
        assert stored["status"] == {"departed": True}
        managers = {(m["manager"], m.get("subresource", "")) for m in stored["metadata"]["managedFields"]}
        assert ("rtrace-agent/node-a", "") in managers and ("rtrace-operator", "status") in managers

        # The status subresource is on: status written through the main resource is ignored.
        co.patch_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, writer.target.name,
                                          {"status": {"departed": False}}, _content_type=MERGE)
        assert writer.read()["status"] == {"departed": True}
    finally:
        operator.close()
        co.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def test_the_operators_status_apply_can_empty_the_summary_maps(installed, kube, control_plane):
    """byState and byCause go back to {} when a trace's reports go (deleted, say): server-side
    apply must store that, not null (a granular map once did, the schema refused it with
    HTTP 422, and the trace's status froze until a report came back)."""
    from retransmit_core.api import API_VERSION, GROUP, KIND, PLURAL, VERSION, Phase, RetransmitTraceStatus, Summary, to_api
    from retransmit_operator.kube import KubeApi, client_configuration

    co = kubernetes.client.CustomObjectsApi(kube)
    name = f"maps-{uuid.uuid4().hex[:6]}"
    co.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": {}})
    operator = KubeApi(client_configuration(str(control_plane.kubeconfig)))
    try:
        for by_state, by_cause in (({"ESTABLISHED": 3}, {"fast": 3}), ({}, {})):
            status = RetransmitTraceStatus(phase=Phase.RUNNING, summary=Summary(by_state=by_state, by_cause=by_cause))
            asyncio.run(operator.apply_status(name, to_api(status)))
            summary = co.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)["status"]["summary"]
            assert (summary.get("byState", {}), summary.get("byCause", {})) == (by_state, by_cause)
    finally:
        operator.close()
        co.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def test_an_operator_call_fails_within_its_timeout_when_the_api_server_never_answers(control_plane):
    """A frozen API server accepts the connection and never answers: every KubeApi call has a
    timeout, so the call ends as a failure the next pass retries, instead of hanging the pass."""
    from retransmit_operator.kube import ApiFailure, KubeApi, client_configuration

    api = KubeApi(client_configuration(str(control_plane.kubeconfig)), timeout=2)
    try:
        assert asyncio.run(api.get_daemonset("default", "none-here")) is None   # answered: 404
        with control_plane.paused("kube-apiserver"):
            with pytest.raises(ApiFailure) as failed:
                asyncio.run(api.get_daemonset("default", "none-here"))
        assert failed.value.status == 0 and "did not answer" in str(failed.value)
        assert not failed.value.permanent   # retried
    finally:
        api.close()


# ---- DaemonSet through the real controller-manager and scheduler -------------------------

def test_daemonset_runs_one_ready_pod_per_node_and_deleting_it_ends_the_processes(
        node_simulator, namespace, core, apps):
    script = """
        import os, time
        print("node", os.environ["NODE"], "pod", os.environ["POD"], "ns", os.environ["NS"], "ip", os.environ["IP"])
        time.sleep(3600)
    """
    apps.create_namespaced_daemon_set(namespace, {
        "metadata": {"name": "echo"},
        "spec": {
            "selector": {"matchLabels": {"app": "echo"}},
            "template": {"metadata": {"labels": {"app": "echo"}}, "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [python_container("main", script, env=field_env(
                    NODE="spec.nodeName", POD="metadata.name", NS="metadata.namespace", IP="status.podIP"))],
            }},
        },
    })

    # Other tests of the session may have added nodes of their own: one pod on each node.
    nodes = {n.metadata.name for n in core.list_node().items}
    assert {"node-a", "node-b"} <= nodes

    def ready_pods():
        pods = core.list_namespaced_pod(namespace, label_selector="app=echo").items
        return pods if len(pods) == len(nodes) and all(pod_ready(p) for p in pods) else None
    pods = wait_until(ready_pods, f"{len(nodes)} Ready DaemonSet pods")
    assert sorted(p.spec.node_name for p in pods) == sorted(nodes)

    pids = []
    for p in (p for p in pods if p.spec.node_name in ("node-a", "node-b")):
        assert p.status.phase == "Running"
        name = p.metadata.name
        lines = wait_until(lambda: log_lines(node_simulator, namespace, name), f"output of {name}")
        assert lines[0] == f"node {p.spec.node_name} pod {name} ns {namespace} ip {p.status.pod_ip}"
        pid = node_simulator.pids(namespace, name)["main"]
        assert pid_alive(pid)
        pids.append(pid)

    apps.delete_namespaced_daemon_set("echo", namespace, propagation_policy="Background")
    wait_until(lambda: not core.list_namespaced_pod(namespace, label_selector="app=echo").items,
               "the DaemonSet's pods to be deleted")
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), "the pods' processes to end")


# ---- pod networking -----------------------------------------------------------------------

SERVER = """
    import os, socket, threading
    def serve(family, address):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, 7000))
        s.listen()
        while True:
            conn, peer = s.accept()
            conn.sendall(f"{os.environ['POD']} saw {peer[0]}\\n".encode())
            conn.close()
    threading.Thread(target=serve, args=(socket.AF_INET6, "::"), daemon=True).start()
    serve(socket.AF_INET, "0.0.0.0")
"""

CLIENT = """
    import os, socket
    for address in (os.environ["SERVER_V4"], os.environ["SERVER_V6"]):
        with socket.create_connection((address, 7000), timeout=10) as s:
            print(s.makefile().readline().strip(), flush=True)
"""


def test_pods_on_two_nodes_have_own_addresses_and_talk_over_ipv4_and_ipv6(
        node_simulator, namespace, core):
    nodes = {n.name: n for n in node_simulator.nodes}
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "server"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "node-a"},
            "containers": [python_container(
                "main", SERVER, env=field_env(POD="metadata.name"),
                ports=[{"name": "echo", "containerPort": 7000}],
                readinessProbe={"tcpSocket": {"port": "echo"}, "periodSeconds": 1})],
        },
    })
    server = wait_pod(core, namespace, "server", "Ready", pod_ready)
    server_ips = [ip.ip for ip in server.status.pod_ips]

    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "client"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "node-b"},
            "restartPolicy": "Never",
            "containers": [python_container("main", CLIENT, env=[
                {"name": "SERVER_V4", "value": server_ips[0]}, {"name": "SERVER_V6", "value": server_ips[1]}])],
        },
    })
    client = wait_pod(core, namespace, "client", "to finish", lambda p: p.status.phase in ("Succeeded", "Failed"))
    assert client.status.phase == "Succeeded", log_lines(node_simulator, namespace, "client")
    client_ips = [ip.ip for ip in client.status.pod_ips]

    import ipaddress
    assert ipaddress.ip_address(server_ips[0]) in nodes["node-a"].pod_cidr_v4
    assert ipaddress.ip_address(server_ips[1]) in nodes["node-a"].pod_cidr_v6
    assert ipaddress.ip_address(client_ips[0]) in nodes["node-b"].pod_cidr_v4
    assert ipaddress.ip_address(client_ips[1]) in nodes["node-b"].pod_cidr_v6
    # The server saw the client's own pod addresses: no NAT between simulated nodes.
    assert log_lines(node_simulator, namespace, "client") == [
        f"server saw {client_ips[0]}", f"server saw {client_ips[1]}"]


NETNS = """
    import os
    print(os.readlink("/proc/self/ns/net"))
"""


def test_host_network_pod_runs_in_the_host_namespace_and_others_do_not(node_simulator, namespace, core):
    for name, host_network in (("host", True), ("own", False)):
        core.create_namespaced_pod(namespace, {
            "metadata": {"name": name},
            "spec": {"hostNetwork": host_network, "restartPolicy": "Never",
                     "nodeSelector": {"kubernetes.io/hostname": "node-b"},
                     "containers": [python_container("main", NETNS)]},
        })
    host = wait_pod(core, namespace, "host", "to succeed", lambda p: p.status.phase == "Succeeded")
    own = wait_pod(core, namespace, "own", "to succeed", lambda p: p.status.phase == "Succeeded")

    host_netns = os.readlink("/proc/self/ns/net")
    assert log_lines(node_simulator, namespace, "host") == [host_netns]
    assert log_lines(node_simulator, namespace, "own") != [host_netns]
    node_b = next(n for n in node_simulator.nodes if n.name == "node-b")
    assert host.status.pod_ip == node_b.ip_v4 == host.status.host_ip   # a hostNetwork pod has the node's IP
    assert own.status.pod_ip != node_b.ip_v4


# ---- RBAC ---------------------------------------------------------------------------------

def test_service_account_token_without_permission_is_forbidden(control_plane, namespace, kube):
    token = control_plane.service_account_token(namespace, "reader")
    with control_plane.api_client(token=token) as api:
        as_reader = kubernetes.client.CoreV1Api(api)
        with pytest.raises(ApiException) as denied:
            as_reader.list_namespaced_pod(namespace)
        assert denied.value.status == 403

        rbac = kubernetes.client.RbacAuthorizationV1Api(kube)
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
        wait_until(lambda: as_reader.list_namespaced_pod(namespace) is not None, "the Role to apply")
        with pytest.raises(ApiException) as still_denied:
            as_reader.list_namespaced_secret(namespace)
        assert still_denied.value.status == 403


WHOAMI = """
    import json, os
    import kubernetes
    from kubernetes.client.rest import ApiException
    kubernetes.config.load_kube_config()          # $KUBECONFIG from the node simulator
    api = kubernetes.client.ApiClient()
    review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review({})
    user = review.status.user_info
    out = {"user": user.username, "pod": (user.extra or {}).get("authentication.kubernetes.io/pod-name")}
    v1 = kubernetes.client.CoreV1Api(api)
    out["pods"] = sorted(p.metadata.name for p in v1.list_namespaced_pod(os.environ["NS"]).items)
    try:
        v1.list_namespaced_secret(os.environ["NS"])
        out["secrets"] = 200
    except ApiException as e:
        out["secrets"] = e.status
    print(json.dumps(out))
"""


def test_pod_process_acts_with_its_own_service_account(control_plane, node_simulator, namespace, core, kube):
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "lister"}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube)
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-lister"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "lister"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
        "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": namespace}]})
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "whoami"},
        "spec": {"serviceAccountName": "lister", "restartPolicy": "Never",
                 "containers": [python_container("main", WHOAMI, env=field_env(NS="metadata.namespace"))]},
    })
    pod = wait_pod(core, namespace, "whoami", "to finish", lambda p: p.status.phase in ("Succeeded", "Failed"))
    lines = log_lines(node_simulator, namespace, "whoami")
    assert pod.status.phase == "Succeeded", lines
    seen = json.loads(lines[-1])
    assert seen == {"user": f"system:serviceaccount:{namespace}:lister", "pod": ["whoami"],
                    "pods": ["whoami"], "secrets": 403}


def test_exited_container_is_restarted_per_restart_policy_with_its_last_exit_reported(
        node_simulator, namespace, core):
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "crasher"},
        "spec": {"containers": [python_container("main", "print('up'); raise SystemExit(3)")]},
    })

    def restarted_twice(pod):
        statuses = pod.status.container_statuses or []
        return statuses and statuses[0].restart_count >= 2 and statuses[0].last_state.terminated
    pod = wait_pod(core, namespace, "crasher", "restarted twice", restarted_twice)
    status = pod.status.container_statuses[0]
    assert status.last_state.terminated.exit_code == 3
    assert log_lines(node_simulator, namespace, "crasher")[:2] == ["up", "up"]
