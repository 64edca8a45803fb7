"""The agent's lifecycle on the real API server with the real agent (issue 22): a deleted report
comes back, a trace re-created under its name starts from zero, SIGTERM always writes the report.

The operator runs embedded and the node simulator runs each agent pod's command as rendered,
as in test_e2e.py. Every wait is on a condition with a generous timeout.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone

import kubernetes
import pytest
import urllib3

from retransmit_core.api import GROUP, REPORT_PLURAL, VERSION, NodeStatus
from tests.cluster.test_e2e import _agent_metrics
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_A, SYSTEM_NS, Trace, expected, running, totals

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def _agent_log(sim, trace: Trace) -> str:
    return sim.log_path(SYSTEM_NS, trace.agent_pod()).read_text(errors="replace")


def _agent_pid(sim, trace: Trace) -> int:
    pids = sim.pids(SYSTEM_NS, trace.agent_pod())
    assert pids, f"agent pod {trace.agent_pod()} has no running process"
    return next(iter(pids.values()))


def _wait_heartbeat_last(trace: Trace) -> dict:
    """Wait until the agent's last write was a heartbeat: its heartbeat counter rose while its
    report counter stood still (/metrics); returns those metrics."""
    def heartbeat_after(first: dict) -> dict:
        return wait_until(lambda: (lambda m: m if m["rtrace_heartbeats_total"] > first["rtrace_heartbeats_total"]
                                   and m["rtrace_reports_total"] == first["rtrace_reports_total"] else None)(
                                       _agent_metrics(trace)), "a heartbeat", timeout=60, interval=0.5)
    return wait_until(lambda: _try(lambda: heartbeat_after(_agent_metrics(trace))),
                      "a heartbeat as the agent's last write", timeout=300, interval=0.1)


def _try(step):
    """step(), or None when one of its waits timed out (the outer wait retries)."""
    try:
        return step()
    except TimeoutError:
        return None


def _owner_uid(report: dict) -> str:
    return next(o["uid"] for o in report["metadata"]["ownerReferences"] if o.get("controller"))


def test_a_deleted_report_of_a_quiet_node_comes_back_with_the_same_counts(operator, reference, pods, traces,
                                                                           objects):
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    trace.wait_entry("attached", running)
    ips = set(pods.server_ips + pods.client_ips)
    start = reference.read()
    pods.lossy_bulk(connections=2)
    want = sum(totals(expected(reference.read(), ips, start)))
    assert want > 0, "the lossy load made no retransmits"
    before = trace.wait_entry("the load reported", lambda e: e.retransmits + e.synack_retransmits == want)
    _wait_heartbeat_last(trace)   # quiet: the agent renews its Lease and leaves the report alone
    old_uid = trace.report()["metadata"]["uid"]

    objects.delete_namespaced_custom_object(GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL, trace.report()["metadata"]["name"])
    back = wait_until(lambda: (lambda r: r if r is not None and r["metadata"]["uid"] != old_uid else None)(trace.report()),
                      "the deleted report written again", timeout=120, interval=0.5)
    again = trace.wait_entry("the re-created report complete", lambda e: e.retransmits + e.synack_retransmits == want)
    assert _owner_uid(back) == trace.get()["metadata"]["uid"]
    assert again.by_state == before.by_state
    assert {(f.local.port, f.remote.port, f.retransmits) for f in again.top_flows} \
        == {(f.local.port, f.remote.port, f.retransmits) for f in before.top_flows}


def test_a_trace_recreated_under_its_name_does_not_carry_the_old_counts(operator, reference, pods, objects, core):
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    spec = dict(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    first = Trace(objects, core, name, **spec)
    second = None
    try:
        first.wait_entry("attached", running)
        pods.lossy_bulk(connections=2)
        old = first.wait_entry("the load counted", lambda e: e.retransmits + e.synack_retransmits > 0)
        old_trace_uid = first.get()["metadata"]["uid"]
        first.delete()   # the trace, its DaemonSet and agent pods; its reports wait for the garbage collector
        left_behind = first.report()
        second = Trace(objects, core, name, **spec)
        new_trace_uid = second.get()["metadata"]["uid"]
        assert new_trace_uid != old_trace_uid

        def new_report():
            report = second.report()
            if report is None or _owner_uid(report) != new_trace_uid:
                return None
            entry = second.entry()
            return entry if running(entry) else None
        entry = wait_until(new_report, "the re-created trace's own report, running", timeout=180, interval=0.5)
        assert entry.retransmits + entry.synack_retransmits == 0, (
            f"the re-created trace resumed {entry.retransmits} retransmits of its predecessor "
            f"({old.retransmits}; its report {'was still there' if left_behind else 'was gone'} at re-creation)")
        assert not entry.top_flows
    finally:
        for t in (second, first):
            if t is not None:
                t.delete()


def test_sigterm_after_a_heartbeat_writes_the_final_report(operator, pods, traces, node_simulator, objects):
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    trace.wait_entry("attached", running)
    _wait_heartbeat_last(trace)
    entry = trace.entry()
    name = trace.report()["metadata"]["name"]
    # Every stored version of the report from now on: the DaemonSet restarts the agent, and the
    # restarted one writes too; the terminated agent's final write is one of these versions.
    versions: list[dict] = []
    watch = kubernetes.watch.Watch()

    def follow() -> None:
        try:
            for event in watch.stream(objects.list_namespaced_custom_object, GROUP, VERSION, SYSTEM_NS, REPORT_PLURAL,
                                      field_selector=f"metadata.name={name}", timeout_seconds=180):
                versions.append(event["object"])
        except urllib3.exceptions.HTTPError:
            pass   # the stream closed when stopped: what it saw is in `versions`
    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_until(lambda: versions, "the report's watch to start")   # the first event: the report as it is
    log_before = _agent_log(node_simulator, trace)
    sigterm_at = datetime.now(timezone.utc)
    os.kill(_agent_pid(node_simulator, trace), signal.SIGTERM)

    def final_line():
        # The terminated agent's log: up to the simulator's marker of the next start.
        terminated = _agent_log(node_simulator, trace)[len(log_before):].split("--- node simulator: start")[0]
        found = re.search(r"final report written for node \S+: lastReportTime (\S+)", terminated)
        return datetime.fromisoformat(found.group(1)) if found else None
    written_at = wait_until(final_line, "the terminated agent's final report", timeout=120, interval=0.2)
    assert written_at > sigterm_at
    stored = wait_until(lambda: next((v for v in versions if _report_time(v) == written_at), None),
                        "the final report among the stored versions", timeout=60, interval=0.2)
    watch.stop()
    final = NodeStatus.model_validate(stored["spec"])
    assert (final.retransmits, final.synack_retransmits) == (entry.retransmits, entry.synack_retransmits)


def _report_time(report: dict) -> datetime:
    return NodeStatus.model_validate(report["spec"]).last_report_time


def test_every_pods_count_resumes_exactly_after_a_restart_on_a_node_with_more_pods_than_top_flows(
        operator, reference, pods, traces, node_simulator):
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A}, topFlows=1)
    trace.wait_entry("attached", running)
    start = reference.read()

    def want() -> dict[str, int]:
        """The reference's retransmits (skb + SYN-ACK) since the start, by the pod sending them."""
        out: Counter = Counter()
        for (_, local_ip, *_), (r, s) in expected(reference.read(), set(pods.owners), start).items():
            out[pods.owners[local_ip]] += r + s
        return dict(out)

    def reported(e: NodeStatus) -> dict[str, int]:
        return {p.pod: p.retransmits for p in e.top_pods if p.namespace == pods.namespace}

    pods.lossy_bulk(connections=2)
    first = want()
    assert set(first) == {"server", "client"}, f"both pods should have retransmitted: {first}"
    before = trace.wait_entry("every pod's count, not only the top one", lambda e: reported(e) == first)
    assert len(before.top_flows) == 1

    # SIGTERM loses nothing: the restarted agent resumes every pod from the report.
    old_pid = _agent_pid(node_simulator, trace)
    os.kill(old_pid, signal.SIGTERM)
    def restarted_and_attached() -> bool:
        try:
            pid = next(iter(node_simulator.pids(SYSTEM_NS, trace.agent_pod()).values()), old_pid)
            return pid != old_pid and _agent_metrics(trace).get("rtrace_program_attached") == 1
        except (OSError, LookupError):   # the new agent not serving /metrics yet
            return False
    wait_until(restarted_and_attached, "the restarted agent's program attached", timeout=180, interval=0.5)
    pods.lossy_bulk(connections=2)
    both = want()
    assert all(both[pod] > n for pod, n in first.items()), f"the second load should have retransmitted: {both}"
    after = trace.wait_entry("every pod's resumed plus new count", lambda e: reported(e) == both, timeout=180)
    assert sum(both.values()) == after.retransmits + after.synack_retransmits
