"""End to end on the real API server and the real kernel: apply a RetransmitTrace, read real
retransmits from its nodes' RetransmitNodeReports and its status.

The operator runs embedded (its real handlers), renders the agents' DaemonSet; the real
controller-manager and scheduler place the pods; the node simulator runs each agent pod's
command exactly as rendered (hostNetwork, downward-API env, its own ServiceAccount token),
so `retransmit-agent cluster` attaches real BPF and server-side-applies its node's report.
Client and server are pods with network namespaces and addresses of their own; loss is
injected where segments arrive in the pods. Ground truth: an independent reference counter on the same
tracepoints, restricted to the test's own pod addresses.

All simulated nodes share this machine's kernel, so every agent sees every retransmit of
the host: the traces here select the test's own pods (namespaces/podSelector), which the
agents turn into the kernel's local-IP filter.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import kubernetes
import pytest

from retransmit_agent.reportwriter import ReportTarget, ReportWriter
from retransmit_core.api import GROUP, PLURAL, REPORT_PLURAL, VERSION, NodeStatus
from retransmit_core.schedule import stale_after
from retransmit_core.naming import daemonset_name
from retransmit_core.naming import (
    LEASE_GROUP,
    LEASE_PLURAL,
    LEASE_VERSION,
    heartbeat_object,
    heartbeat_of,
    heartbeat_renewal,
    report_name,
)
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import (
    AGENT_SA,
    NODE_A,
    NODE_B,
    SYSTEM_NS,
    Pods,
    Trace,
    entry_flows,
    expected,
    running,
    totals,
    trace_body,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

QUIET_NODE_SECONDS = 300  # how long a quiet node must stay 1/1 and Ready (issue: five minutes)


# ---------------------------------------------------------------- the tests

def test_a_completed_trace_equals_the_reference_and_names_both_pods(operator, reference, pods, traces):
    # No duration while the load runs (a busy machine may take long): once it is done, a
    # duration already elapsed ends the trace, as a user shortening it would.
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    trace.wait_entry("agent attached and reporting", running)
    before = reference.read()
    pods.lossy_bulk()
    pods.synack()
    after = reference.read()
    trace.objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name, {"spec": {"duration": "1s"}})

    # The operator ends the trace; the agent's SIGTERM flush carries the rest.
    wait_until(lambda: (trace.get().get("status") or {}).get("phase") == "Completed", "the trace to complete",
               timeout=120)

    want = expected(after, set(pods.server_ips + pods.client_ips), before)
    want_r, want_s = totals(want)
    assert want_r > 0 and want_s > 0
    assert {f[0] for f in want} == {"IPv4", "IPv6"}

    entry = trace.wait_entry("final counts", lambda e: (e.retransmits, e.synack_retransmits) == (want_r, want_s),
                             timeout=60)
    assert entry_flows(entry) == want
    assert entry.by_state.get("SYN_RECV", 0) >= want_s
    assert sum(entry.by_state.values()) == want_r + want_s

    # Both counts: the SYN-ACKs come after the bulk load, so an earlier report (and summary)
    # already had the final retransmits.
    summary = wait_until(lambda: (lambda s: s if (s.get("retransmits"), s.get("synackRetransmits")) == (want_r, want_s)
                                  else None)(trace.get()["status"].get("summary") or {}),
                         "the summary to follow the final entry", timeout=60)
    assert summary["byState"] == entry.by_state

    owners = pods.owners
    # Per pod: everything the pod retransmitted (local side, skb + SYN-ACK), from every flow.
    want_pods = Counter()
    for (_family, local_ip, _lport, _rip, _rport), (r, s) in want.items():
        want_pods[(pods.namespace, owners[local_ip])] += r + s
    assert {(p.namespace, p.pod): p.retransmits for p in entry.top_pods or []} == dict(want_pods)
    assert {(p["namespace"], p["pod"]): p["retransmits"] for p in summary.get("topPods", [])} == dict(want_pods)
    assert all(p["node"] == NODE_A for p in summary["topPods"])
    for flow in entry.top_flows:
        assert (flow.local.pod, flow.local.namespace) == (owners[flow.local.ip], pods.namespace), flow
        assert (flow.remote.pod, flow.remote.namespace) == (owners[flow.remote.ip], pods.namespace), flow
    for flow in summary["topFlows"]:
        assert flow["local"]["pod"] == owners[flow["local"]["ip"]], flow
        assert flow["remote"]["pod"] == owners[flow["remote"]["ip"]], flow
        assert flow["local"]["namespace"] == flow["remote"]["namespace"] == pods.namespace


def test_two_traces_with_different_filters_get_exactly_their_own_flows(operator, reference, pods, traces):
    servers = traces(namespaces=[pods.namespace], podSelector={"matchLabels": {"app": "server"}},
                     nodeSelector={"kubernetes.io/hostname": NODE_A})
    clients_v6 = traces(namespaces=[pods.namespace], podSelector={"matchLabels": {"app": "client"}},
                        filter={"ipFamilies": ["IPv6"]}, nodeSelector={"kubernetes.io/hostname": NODE_A})
    servers.wait_entry("attached", running)
    clients_v6.wait_entry("attached", running)
    before = reference.read()
    pods.lossy_bulk()
    after = reference.read()

    want_servers = expected(after, set(pods.server_ips), before)
    want_clients = {k: v for k, v in expected(after, set(pods.client_ips), before).items() if k[0] == "IPv6"}
    assert want_servers and want_clients, (want_servers, want_clients, pods.server_ips, pods.client_ips,
                                           Counter({e.local_ip: n for e, n in (after - before).items()}))
    e1 = servers.wait_entry("server flows", lambda e: entry_flows(e) == want_servers)
    e2 = clients_v6.wait_entry("client IPv6 flows", lambda e: entry_flows(e) == want_clients)
    assert (e1.retransmits, e1.synack_retransmits) == totals(want_servers)
    assert (e2.retransmits, e2.synack_retransmits) == totals(want_clients)
    assert all(f.local.pod == "server" for f in e1.top_flows)
    assert all(f.local.pod == "client" and f.family == "IPv6" for f in e2.top_flows)


def _kill_agent(sim: Any, trace: Trace, sig: int) -> int:
    pod = trace.agent_pod()
    pids = sim.pids(SYSTEM_NS, pod)
    assert pids, f"agent pod {pod} has no running process"
    pid = next(iter(pids.values()))
    os.kill(pid, sig)
    return pid


def test_kill_9_loses_at_most_the_last_interval_and_sigterm_loses_nothing(operator, reference, pods, traces,
                                                                          node_simulator):
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A},
                   reportInterval="3s")
    ips = set(pods.server_ips + pods.client_ips)
    trace.wait_entry("attached", running)
    seen: list[int] = []
    pods_seen: list[dict] = []

    def observe(e: NodeStatus) -> NodeStatus:
        seen.append(e.retransmits + e.synack_retransmits)
        pods_seen.append({(p.namespace, p.pod): p.retransmits for p in e.top_pods or []})
        return e

    start = reference.read()
    pods.lossy_bulk(connections=2)
    phase_a = sum(totals(expected(reference.read(), ips, start)))
    trace.wait_entry("phase A reported", lambda e: observe(e).retransmits + e.synack_retransmits == phase_a)

    # Phase B, then kill -9 at once: what was not yet reported is lost, nothing else.
    b_start = reference.read()
    pods.lossy_bulk(connections=2)
    phase_b = sum(totals(expected(reference.read(), ips, b_start)))
    killed = _kill_agent(node_simulator, trace, signal.SIGKILL)
    at_kill = observe(trace.entry())   # a write in flight may still land after this read

    restarted = trace.wait_entry(
        "the restarted agent reporting",
        lambda e: observe(e).last_report_time > at_kill.last_report_time and running(e)
        and next(iter(node_simulator.pids(SYSTEM_NS, trace.agent_pod()).values()), killed) != killed)
    # The pods were quiet before the kill, so the restarted agent reports exactly the baseline it
    # resumed from: what the killed agent's last committed write held.
    reported_at_kill = restarted.retransmits + restarted.synack_retransmits
    assert reported_at_kill >= at_kill.retransmits + at_kill.synack_retransmits
    lost = phase_a + phase_b - reported_at_kill
    assert 0 <= lost <= phase_b

    c_start = reference.read()
    pods.lossy_bulk(connections=2)
    phase_c = sum(totals(expected(reference.read(), ips, c_start)))
    trace.wait_entry("phase C added to the resumed counts",
                     lambda e: observe(e).retransmits + e.synack_retransmits == reported_at_kill + phase_c)

    # SIGTERM right after phase D: the final report carries all of it.
    d_start = reference.read()
    pods.lossy_bulk(connections=2)
    phase_d = sum(totals(expected(reference.read(), ips, d_start)))
    _kill_agent(node_simulator, trace, signal.SIGTERM)
    final = trace.wait_entry("the SIGTERM flush",
                             lambda e: observe(e).retransmits + e.synack_retransmits
                             == reported_at_kill + phase_c + phase_d)
    assert seen == sorted(seen), f"counts went backwards: {seen}"
    assert final.phase == "Running"
    # Every retransmit here is a selected pod's: the pods' counts resume and add up to the totals.
    assert sum(p.retransmits for p in final.top_pods) == final.retransmits + final.synack_retransmits
    for earlier, later in zip(pods_seen, pods_seen[1:]):
        assert all(later.get(pod, 0) >= n for pod, n in earlier.items()), f"a pod's count went backwards: {pods_seen}"


def _restart_apiserver_after(control_plane: Any, seconds: float, during: Callable[[], None]) -> None:
    """Stop kube-apiserver (its process ends: connections are refused), run `during`, keep it
    down for `seconds` in all, then start it again and wait until it answers."""
    stopped_at = time.monotonic()
    with control_plane.stopped("kube-apiserver"):
        during()
        time.sleep(max(0.0, seconds - (time.monotonic() - stopped_at)))


def _agent_metrics(trace: Trace) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    port = trace.metrics_port()
    # The agent serves on its pod's IP (the simulated node's address: hostNetwork).
    ip = trace.core.read_namespaced_pod(trace.agent_pod(), SYSTEM_NS).status.pod_ip
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels.get("pod_name")}


def test_counts_are_complete_after_the_api_server_was_stopped_for_30s(operator, reference, pods, traces,
                                                                      control_plane):
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    ips = set(pods.server_ips + pods.client_ips)
    trace.wait_entry("attached", running)
    before = reference.read()
    errors_before = _agent_metrics(trace)["rtrace_report_errors_total"]

    _restart_apiserver_after(control_plane, 30, pods.lossy_bulk)

    during = expected(reference.read(), ips, before)
    assert sum(totals(during)) > 0
    entry = trace.wait_entry("the full totals after the outage",
                             lambda e: (e.retransmits, e.synack_retransmits) == totals(during), timeout=180)
    assert entry_flows(entry) == during
    metrics = _agent_metrics(trace)
    assert metrics["rtrace_report_errors_total"] > errors_before  # it did try, and failed, meanwhile
    assert metrics["rtrace_node_retransmits_total"] == entry.retransmits
    assert metrics["rtrace_program_attached"] == 1
    # No write budget any more: the interval is the spec's, whatever the node count.
    assert trace.get()["status"]["summary"]["nodesDesired"] == 1
    assert metrics["rtrace_report_interval_seconds"] == 1.0


def _report_body(trace: dict, node: str, retransmits: int = 0) -> dict:
    from retransmit_core.naming import report_object

    meta = trace["metadata"]
    return report_object(meta["name"], meta["uid"], node, SYSTEM_NS,
                         NodeStatus(node=node, phase="Running", retransmits=retransmits))


def _refused(call: Callable[[], Any]) -> kubernetes.client.ApiException:
    with pytest.raises(kubernetes.client.ApiException) as err:
        call()
    return err.value


def test_an_agent_writes_only_its_own_nodes_report_and_reads_only_pods(operator, installed, objects, traces, core):
    """RBAC gives the agents' account reports in their namespace; the report-guard admission
    policy narrows that to the node of the agent's pod-bound token (as NodeRestriction does
    for kubelets). The token of a pod on node-a may write node-a's report, never node-b's."""
    trace = traces(nodeSelector={"kubernetes.io/hostname": "no-such-node"})
    body = trace.get()
    core.create_namespaced_pod(SYSTEM_NS, {"metadata": {"name": "agent-token-a"}, "spec": {
        "nodeName": NODE_A, "serviceAccountName": AGENT_SA,
        "containers": [{"name": "c", "image": "none", "command": ["sleep", "1000"]}]}})
    try:
        pod = core.read_namespaced_pod("agent-token-a", SYSTEM_NS)
        token_a = installed.service_account_token(SYSTEM_NS, AGENT_SA, create=False,
                                                  bound_pod=(pod.metadata.name, pod.metadata.uid))
        unbound = installed.service_account_token(SYSTEM_NS, AGENT_SA, create=False)
        with installed.api_client(token=token_a) as api:
            # Our API server (v1.34) puts the pod's node into the bound token's user info.
            review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
            assert review.status.user_info.extra["authentication.kubernetes.io/node-name"] == [NODE_A]
            as_agent = kubernetes.client.CustomObjectsApi(api)
            as_core = kubernetes.client.CoreV1Api(api)
            own, other = _report_body(body, NODE_A), _report_body(body, NODE_B)
            # Allowed: create, read and server-side apply its own node's report; list its node's pods.
            as_agent.create_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own)
            own["spec"]["retransmits"] = 5
            as_agent.patch_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own["metadata"]["name"],
                                                    own, field_manager=f"rtrace-agent/{NODE_A}", force=True,
                                                    _content_type="application/apply-patch+yaml")
            assert as_agent.get_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL,
                                                         own["metadata"]["name"])["spec"]["retransmits"] == 5
            as_core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE_A}")
            # ... and its own node's heartbeat Lease, created and renewed as the agent does.
            now = datetime.now(timezone.utc)
            own_lease, other_lease = (heartbeat_object(trace.name, body["metadata"]["uid"], node, SYSTEM_NS, now, 15)
                                      for node in (NODE_A, NODE_B))
            lease_api = (LEASE_GROUP, LEASE_VERSION, SYSTEM_NS, LEASE_PLURAL)
            as_agent.create_namespaced_custom_object(*lease_api, own_lease)
            as_agent.patch_namespaced_custom_object(*lease_api, own_lease["metadata"]["name"],
                                                    heartbeat_renewal(now + timedelta(seconds=1)),
                                                    _content_type="application/merge-patch+json")
            # It may read its DaemonSet (the node count), nothing more of it.
            writer = ReportWriter(api, ReportTarget(trace.name, body["metadata"]["uid"], NODE_A, SYSTEM_NS))
            wait_until(lambda: writer.desired_nodes() == 0, "the agent to read its DaemonSet's node count "
                       "(its nodeSelector matches no node)", timeout=60)

            # Refused by the admission policy: another node's report, made or taken over.
            denied = {
                "create node-b's report": lambda: as_agent.create_namespaced_custom_object(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, other),
                "apply node-b's report": lambda: as_agent.patch_namespaced_custom_object(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, other["metadata"]["name"], other,
                    field_manager=f"rtrace-agent/{NODE_B}", force=True, _content_type="application/apply-patch+yaml"),
                "turn its report into node-b's": lambda: as_agent.patch_namespaced_custom_object(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own["metadata"]["name"], {"spec": {"node": NODE_B}}),
                # The squat: node-b's report name with spec.node and labels of its own node,
                # which would lock node-b's agent out of its report for good.
                "create a report under node-b's name": lambda: as_agent.create_namespaced_custom_object(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL,
                    {**own, "metadata": {**own["metadata"], "name": other["metadata"]["name"]}}),
                "create a Lease under node-b's name": lambda: as_agent.create_namespaced_custom_object(
                    *lease_api, {**own_lease, "metadata": {**own_lease["metadata"], "name": other_lease["metadata"]["name"]}}),
                "label its report as node-b's": lambda: as_agent.patch_namespaced_custom_object(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own["metadata"]["name"],
                    {"metadata": {"labels": {"retransmit.dev/node": NODE_B}}}),
                "create node-b's heartbeat Lease": lambda: as_agent.create_namespaced_custom_object(
                    *lease_api, other_lease),
                "hand its Lease to node-b": lambda: as_agent.patch_namespaced_custom_object(
                    *lease_api, own_lease["metadata"]["name"], {"spec": {"holderIdentity": NODE_B}},
                    _content_type="application/merge-patch+json"),
            }
            for what, call in denied.items():
                e = _refused(call)
                assert e.status == 403 and "may" in e.body and NODE_A in e.body, f"{what}: {e.status} {e.body}"
            # Refused by RBAC: everything else.
            forbidden = {
                "read the trace": lambda: as_agent.get_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name),
                "patch the trace's status": lambda: as_agent.patch_cluster_custom_object_status(
                    GROUP, VERSION, PLURAL, trace.name, {"status": {"phase": "Failed"}}),
                "patch the trace's spec": lambda: as_agent.patch_cluster_custom_object(
                    GROUP, VERSION, PLURAL, trace.name, {"spec": {"topFlows": 3}}),
                "delete the trace": lambda: as_agent.delete_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name),
                "create a trace": lambda: as_agent.create_cluster_custom_object(GROUP, VERSION, PLURAL, trace_body("evil")),
                "delete its report": lambda: as_agent.delete_namespaced_custom_object(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own["metadata"]["name"]),
                "mark its report's status": lambda: as_agent.patch_namespaced_custom_object_status(
                    GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own["metadata"]["name"], {"status": {"departed": True}}),
                "write a report in another namespace": lambda: as_agent.create_namespaced_custom_object(
                    GROUP, VERSION, "default", REPORT_PLURAL, {**own, "metadata": {**own["metadata"], "namespace": "default"}}),
                "delete its Lease": lambda: as_agent.delete_namespaced_custom_object(
                    *lease_api, own_lease["metadata"]["name"]),
                "write a Lease in another namespace": lambda: as_agent.create_namespaced_custom_object(
                    LEASE_GROUP, LEASE_VERSION, "default", LEASE_PLURAL,
                    {**own_lease, "metadata": {**own_lease["metadata"], "namespace": "default"}}),
                "list DaemonSets": lambda: kubernetes.client.AppsV1Api(api).list_namespaced_daemon_set(SYSTEM_NS),
                "patch a DaemonSet": lambda: kubernetes.client.AppsV1Api(api).patch_namespaced_daemon_set(
                    daemonset_name(trace.name), SYSTEM_NS, {"metadata": {"labels": {"a": "b"}}}),
                "patch a pod": lambda: as_core.patch_namespaced_pod("x", SYSTEM_NS, {"metadata": {"labels": {"a": "b"}}}),
                "create a config map": lambda: as_core.create_namespaced_config_map(SYSTEM_NS, {"metadata": {"name": "x"}}),
                "read secrets": lambda: as_core.list_namespaced_secret(SYSTEM_NS),
                "read nodes": lambda: as_core.list_node(),
            }
            for what, call in forbidden.items():
                e = _refused(call)
                assert e.status == 403 and "forbidden" in e.body.lower(), f"{what}: {e.status} {e.body}"
        # A token bound to no pod names no node: refused even for a report that exists.
        with installed.api_client(token=unbound) as api:
            e = _refused(lambda: kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object(
                GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, own["metadata"]["name"], {"spec": {"retransmits": 1}}))
            assert e.status == 403 and "names no node" in e.body
    finally:
        core.delete_namespaced_pod("agent-token-a", SYSTEM_NS, grace_period_seconds=0)
    assert trace.entry(NODE_A).retransmits == 5 and trace.report(NODE_B) is None
    # node-a may write its own report, but this trace selects no node and no agent pod of it
    # ran on node-a: the operator leaves the report out of the trace and says so.
    ignored = wait_until(lambda: [e for e in core.list_namespaced_event("default").items
                                  if e.involved_object.name == trace.name and e.reason == "ReportIgnored"],
                         "a ReportIgnored Warning about node-a's report", timeout=60)
    assert ignored[0].type == "Warning" and NODE_A in ignored[0].message, ignored[0].message
    status = trace.get().get("status") or {}
    assert (status.get("summary") or {}).get("retransmits", 0) == 0, status
    assert NODE_A not in [row["node"] for row in status.get("nodes") or []], status


def test_a_node_without_the_tracepoint_fails_while_the_other_counts(operator, reference, pods, traces,
                                                                    agent_state):
    marker = agent_state / f"broken-{NODE_B}"
    marker.touch()
    try:
        trace = traces(namespaces=[pods.namespace])
        broken = trace.wait_entry("Failed with a message", lambda e: e.phase == "Failed", node=NODE_B)
        trace.wait_entry("attached", running, node=NODE_A)
    finally:
        marker.unlink()
    assert "tcp_retransmit_skb is missing" in broken.message and str(agent_state) in broken.message
    before = reference.read()
    pods.lossy_bulk(connections=2)
    want = expected(reference.read(), set(pods.server_ips + pods.client_ips), before)
    trace.wait_entry("node-a counts", lambda e: entry_flows(e) == want, node=NODE_A)

    def degraded():
        status = trace.get().get("status") or {}
        cond = {c["type"]: c for c in status.get("conditions") or []}
        summed = (status.get("summary") or {}).get("retransmits") == totals(want)[0]
        return status if cond.get("Degraded", {}).get("status") == "True" and summed else None
    status = wait_until(degraded, "Degraded=True and the summary of node-a's counts", timeout=60)
    cond = {c["type"]: c for c in status["conditions"]}
    assert NODE_B in cond["Degraded"]["message"] and "tcp_retransmit_skb" in cond["Degraded"]["message"]
    assert status["phase"] == "Running"
    assert status["summary"]["retransmits"] == totals(want)[0]
    # The failed agent stays up (no crash loop): same process, no restarts.
    pod = trace.agent_pod(NODE_B)
    statuses = kubernetes.client.CoreV1Api(trace.objects.api_client).read_namespaced_pod(pod, SYSTEM_NS).status
    assert all(c.restart_count == 0 for c in statuses.container_statuses or [])


def test_pods_started_after_the_trace_are_selected_as_they_come(operator, reference, traces, core,
                                                                node_simulator, namespace):
    """The agent's pod watch feeds the kernel's local-IP filter live: at the start the
    namespace has no pod (the filter matches nothing), then the pods come."""
    trace = traces(namespaces=[namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    trace.wait_entry("attached", running)
    assert _agent_metrics(trace)["rtrace_selected_local_ips"] == 0
    late = Pods(core, node_simulator, namespace)
    wait_until(lambda: _agent_metrics(trace).get("rtrace_selected_local_ips") == 4,
               "the agent to put the pods' 4 addresses into the kernel filter")
    before = reference.read()
    late.lossy_bulk(connections=2)
    want = expected(reference.read(), set(late.server_ips + late.client_ips), before)
    assert want
    entry = trace.wait_entry("the late pods' flows", lambda e: entry_flows(e) == want)
    assert {f.local.pod for f in entry.top_flows} <= {"server", "client"}


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


def _report_time(raw: Optional[str]) -> Optional[datetime]:
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if raw else None


def test_a_quiet_node_stays_reporting_and_a_stopped_agent_goes_stale_by_name(operator, pods, traces,
                                                                            node_simulator):
    """The heartbeat: no retransmits at all, yet the node stays 1/1 and Ready=True for five
    minutes (many staleness bounds), kept alive by its heartbeat Lease rather than by report
    writes; then its agent stops (SIGSTOP) and the operator names it."""
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    first = trace.wait_entry("attached", running)
    interval = _agent_metrics(trace)["rtrace_report_interval_seconds"]
    bound = stale_after(interval, 1)
    quiet = max(QUIET_NODE_SECONDS, 4 * bound.total_seconds())
    windows = int(quiet // bound.total_seconds())
    wait_until(lambda: (lambda st: (st.get("summary") or {}).get("nodes") == "1/1"
                        and _conditions(st).get("Ready", {}).get("status") == "True")(trace.get().get("status") or {}),
               "the node reporting and the trace Ready", timeout=60)

    observed: list[tuple[float, str, str, Optional[datetime]]] = []

    def quiet_for_several_bounds():
        status = trace.get().get("status") or {}
        node = next((n for n in status.get("nodes") or [] if n["node"] == NODE_A), {})
        sync = operator.reconciler.last_sync
        observed.append((sync, (status.get("summary") or {}).get("nodes"),
                         _conditions(status).get("Ready", {}).get("status"), _report_time(node.get("lastReportTime"))))
        last = observed[-1][3]
        # Done once the operator evaluated the trace `quiet` seconds past the first report.
        return last is not None and (last - first.last_report_time).total_seconds() >= quiet and sync != observed[0][0]
    wait_until(quiet_for_several_bounds, f"{quiet:.0f} s ({windows} staleness bounds) of a quiet node",
               timeout=quiet + 120, interval=1.0)
    ready_views = [(nodes, ready) for _, nodes, ready, _ in observed if nodes is not None]
    assert ready_views and set(ready_views) == {("1/1", "True")}, f"a quiet node dropped out: {set(ready_views)}"
    heartbeats = {t for *_, t in observed if t is not None}
    assert len(heartbeats) >= windows, f"the agent wrote no heartbeats while quiet: {sorted(heartbeats)}"
    assert trace.entry().retransmits == 0  # quiet indeed: every write was a heartbeat
    # ... and the heartbeats went to the report's Lease, not into rewriting the report.
    lease = kubernetes.client.CustomObjectsApi(trace.objects.api_client).get_namespaced_custom_object(
        LEASE_GROUP, LEASE_VERSION, SYSTEM_NS, LEASE_PLURAL, report_name(trace.name, NODE_A))
    # Renewed during the quiet phase. (Not compared with the report's latest write: under a
    # load of other BPF programs missedEvents changes, and a report written for that may come
    # after the last renewal.)
    assert heartbeat_of(lease)[1] > first.last_report_time + timedelta(seconds=quiet / 2)
    metrics = _agent_metrics(trace)
    # A report write happens only when something changed (missedEvents can, under load).
    assert metrics["rtrace_heartbeats_total"] >= windows and metrics["rtrace_heartbeats_total"] > metrics["rtrace_reports_total"]
    assert len({sync for sync, *_ in observed}) > windows  # the operator re-evaluated throughout

    pid = _kill_agent(node_simulator, trace, signal.SIGSTOP)
    try:
        def named_stale():
            status = trace.get().get("status") or {}
            agents = _conditions(status).get("AgentsReady", {})
            return status if agents.get("reason") == "AgentsNotReporting" else None
        status = wait_until(named_stale, "the stopped agent's node named as not reporting",
                            timeout=bound.total_seconds() + 120, interval=1.0)
        stopped_entry = trace.entry()
    finally:
        os.kill(pid, signal.SIGCONT)
    cond = _conditions(status)
    assert NODE_A in cond["AgentsReady"]["message"] and f"{bound.total_seconds():.0f}s" in cond["AgentsReady"]["message"]
    assert cond["Ready"]["status"] == "False" and status["summary"]["nodes"] == "0/1"
    # Not early: the operator gave the node its whole bound.
    assert _report_time(cond["AgentsReady"]["lastTransitionTime"]) >= stopped_entry.last_report_time + bound - timedelta(seconds=1)
    wait_until(lambda: (trace.get()["status"].get("summary") or {}).get("nodes") == "1/1",
               "the resumed agent reporting again", timeout=120)


def test_a_namespaces_trace_keeps_the_server_side_of_a_dual_stack_pod(operator, reference, pods, traces):
    """A server on [::] (Go, Java, nginx) answering IPv4 clients retransmits from an IPv6
    socket with v4-mapped addresses: the trace, which keeps flows whose local address is a
    selected pod's, must see those as the pod's IPv4 flows."""
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    trace.wait_entry("agent attached and reporting", running)
    server_v4 = next(ip for ip in pods.server_ips if ":" not in ip)
    before = reference.read()
    pods.server.random_loss(10)
    pods.client.random_loss(10)
    try:
        podtraffic.bulk(pods.server, pods.client, server_v4, 5401, connections=2, nbytes=1 << 20, listen_ip="::")
    finally:
        pods.server.clear_loss()
        pods.client.clear_loss()
    pods.quiet()
    server_side = {k: v for k, v in expected(reference.read(), {server_v4}, before).items() if k[2] == 5401}
    assert server_side, "the dual-stack server retransmitted nothing: the test proves nothing"
    assert {k[0] for k in server_side} == {"IPv4"}

    def has_server_side(e: NodeStatus) -> bool:
        return {k: v for k, v in entry_flows(e).items() if k[1] == server_v4 and k[2] == 5401} == server_side
    entry = trace.wait_entry("the dual-stack server's retransmits as IPv4 flows", has_server_side, timeout=120)
    assert all(f.local.pod == "server" for f in entry.top_flows if f.local.ip == server_v4)
