"""`kubectl retransmit` against the real control plane: run, show, watch, check, and every
error a user can meet with its exit status and one line.

Set-up as in test_e2e.py (the fixtures of tests/cluster/conftest.py): the operator embedded, agents
as processes of the node simulator, a lossy pod pair on node-a, the reference counter.
`kubectl retransmit` runs as the installed `kubectl-retransmit` executable, the way kubectl
finds it on PATH.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import kubernetes
import pytest

from retransmit_core.api import GROUP, PLURAL, VERSION
from retransmit_plugin.main import (
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_NO_CLUSTER,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
)
from tests.harness.controlplane import free_port, wait_until
from tests.harness.tracecluster import (
    NODE_A,
    NODE_B,
    expected,
    one_line,
    plugin,
    plugin_command,
    totals,
    trace_body,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def get_trace(objects, name: str):
    try:
        return objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise


def summary_of(objects, name: str) -> dict:
    """The trace's status.summary ({} while there is none, or no trace)."""
    return ((get_trace(objects, name) or {}).get("status") or {}).get("summary") or {}


def test_run_prints_the_result_equal_to_the_status_and_the_reference(control_plane, operator, reference, pods, objects):
    name = f"plugin-{uuid.uuid4().hex[:6]}"
    # A duration far beyond the load: a loaded machine may spend a minute compiling the
    # program before the traffic starts. Once the traffic is done the trace is shortened to
    # an elapsed duration, as a user would, and `run` ends with it.
    run = subprocess.Popen(plugin_command("run", "--name", name, "--node", NODE_A,
                                          "-n", pods.namespace, "--duration", "30m",
                                          "--report-interval", "1s", "--interval", "1", "--keep", "-o", "json"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=control_plane.env())
    try:
        # Traffic once the agent counts (its report Running).
        wait_until(lambda: summary_of(objects, name).get("nodesReporting") == 1,
                   f"trace {name} reporting on {NODE_A}", timeout=180)
        before = reference.read()
        pods.lossy_bulk(loss=10, connections=2, nbytes=512 << 10)
        pods.synack()
        want = expected(reference.read(), set(pods.server_ips + pods.client_ips), before)
        # Every count in the summary first: `run` prints the trace as it is when Completed.
        def summed() -> bool:
            summary = summary_of(objects, name)
            return (summary.get("retransmits"), summary.get("synackRetransmits")) == totals(want)
        wait_until(summed, f"trace {name}'s summary to hold the load's retransmits", timeout=120)
        objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": {"duration": "1s"}})
        out, err = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    printed = json.loads(out)
    stored = get_trace(objects, name)
    try:
        summary = printed["status"]["summary"]
        want_r, want_s = totals(want)
        assert want_r > 0 and want_s > 0, "the load made no retransmits: the test proves nothing"
        assert (summary["retransmits"], summary["synackRetransmits"]) == (want_r, want_s)
        # What `run` printed is the trace as stored when it completed (an agent's final flush
        # may still follow it, as in the summary of any completed trace).
        for field in ("phase", "startTime", "completionTime"):
            assert printed["status"][field] == stored["status"][field], field
        assert (stored["status"]["summary"]["retransmits"], stored["status"]["summary"]["synackRetransmits"]) == (want_r, want_s)
        assert printed["status"]["phase"] == "Completed"
        assert "reporting" in err and f"trace {name} created" in err     # progress lines while it ran
        # the table form of the same trace: both pods named, totals as in the status
        table = plugin(control_plane, "show", name)
        assert table.returncode == 0, table.stderr
        assert f"retransmits {want_r}" in table.stdout and "TOP FLOWS" in table.stdout
        assert f"({pods.namespace}/server)" in table.stdout and f"({pods.namespace}/client)" in table.stdout
        # show -o json round-trips the status
        wait_until(lambda: json.loads(plugin(control_plane, "show", name, "-o", "json").stdout)["status"]
                   == get_trace(objects, name)["status"], "show -o json to print the stored status", timeout=60)
        print(table.stdout)
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def test_run_without_keep_deletes_the_trace_and_watch_ends_when_a_trace_completes(control_plane, operator, objects):
    name = f"plugin-{uuid.uuid4().hex[:6]}"
    done = plugin(control_plane, "run", "--name", name, "--node", NODE_A, "--duration", "5s", "--interval", "1")
    assert done.returncode == 0, done.stderr
    assert "Completed" in done.stdout and get_trace(objects, name) is None
    assert f"trace {name} deleted" in done.stderr

    name = f"plugin-{uuid.uuid4().hex[:6]}"
    objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, trace_body(name, duration="8s",
                                                                               nodeSelector={"kubernetes.io/hostname": NODE_A}))
    try:
        watch = plugin(control_plane, "watch", name, "--interval", "1")
        assert watch.returncode == 0, watch.stderr
        assert f"{name}: Completed" in watch.stdout
        assert get_trace(objects, name)["status"]["phase"] == "Completed"
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def test_check_lists_each_nodes_kernel_and_fails_for_a_node_that_cannot_trace(control_plane, operator, agent_state):
    ok = plugin(control_plane, "check", "--node", NODE_A, "--interval", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    row = next(line for line in ok.stdout.splitlines() if line.startswith(NODE_A))
    assert " yes " in row and "exact per-flow counts" in row
    marker = agent_state / f"broken-{NODE_B}"
    marker.touch()
    try:
        bad = plugin(control_plane, "check", "--node", NODE_B, "--interval", "1")
    finally:
        marker.unlink()
    assert bad.returncode == EXIT_FAILED, bad.stdout + bad.stderr
    row = next(line for line in bad.stdout.splitlines() if line.startswith(NODE_B))
    assert " no " in row and "tracepoint tcp:tcp_retransmit_skb: missing" in row


def test_each_error_exits_with_its_status_and_one_line_naming_the_fix(control_plane, operator, tmp_path, objects):
    missing = plugin(control_plane, "show", "no-such-trace")
    assert missing.returncode == EXIT_NOT_FOUND and "kubectl get rtrace" in one_line(missing)

    bad = plugin(control_plane, "run", "--remote-cidr", "10.0.0.0/33")
    assert bad.returncode == EXIT_USAGE and "spec.filter.remoteCIDRs" in one_line(bad)
    unknown = plugin(control_plane, "show")
    assert unknown.returncode == EXIT_USAGE and "--help" in one_line(unknown)

    nowhere = tmp_path / "nowhere.kubeconfig"
    nowhere.write_text(Path(control_plane.kubeconfig).read_text().replace(control_plane.server,
                                                                          f"https://127.0.0.1:{free_port()}"))
    down = plugin(control_plane, "show", "x", kubeconfig=nowhere)
    assert down.returncode == EXIT_NO_CLUSTER and "API server is up" in one_line(down)
    absent = plugin(control_plane, "show", "x", kubeconfig=tmp_path / "absent.kubeconfig")
    assert absent.returncode == EXIT_NO_CLUSTER and "--kubeconfig" in one_line(absent)

    nobody = control_plane.kubeconfig_for_token(control_plane.service_account_token("default", "default"),
                                               tmp_path / "nobody.kubeconfig")
    denied = plugin(control_plane, "show", "x", kubeconfig=nobody)
    assert denied.returncode == EXIT_FORBIDDEN and "retransmittrace-editor" in one_line(denied)
