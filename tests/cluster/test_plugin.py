"""`kubectl retransmit` against the real control plane: run, show (-w, every -o form), watch,
delete, check, completion through kubectl, and every error a user can meet with its exit
status and one line.

Set-up as in test_e2e.py (the fixtures of tests/cluster/conftest.py): the operator embedded, agents
as processes of the node simulator, a lossy pod pair on node-a, the reference counter.
`kubectl retransmit` runs as the installed `kubectl-retransmit` executable, the way kubectl
finds it on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import kubernetes
import pytest
import yaml

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
    PLUGIN,
    PLUGIN_COMPLETE,
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


def end_and_collect(plugin_run: subprocess.Popen, objects, name: str, timeout: float) -> tuple[str, str]:
    """Shorten the running trace to an elapsed duration, as a user would, and the output of
    the plugin that follows it to its end (killed if it does not end in time)."""
    try:
        objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": {"duration": "1s"}})
        return plugin_run.communicate(timeout=timeout)
    finally:
        if plugin_run.poll() is None:
            plugin_run.kill()


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
        out, err = end_and_collect(run, objects, name, timeout=400)
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
        assert stored["spec"]["namespaces"] == [pods.namespace]          # -n: the pods' namespace
        print(table.stdout)
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def test_run_without_keep_deletes_the_trace_and_show_w_and_watch_end_when_a_trace_completes(
        control_plane, operator, objects):
    name = f"plugin-{uuid.uuid4().hex[:6]}"
    done = plugin(control_plane, "run", "--name", name, "--node", NODE_A, "--duration", "5s", "--interval", "1")
    assert done.returncode == 0, done.stderr
    assert "Completed" in done.stdout and get_trace(objects, name) is None
    assert f"trace {name} deleted" in done.stderr
    # neither -n nor -A: the pods of the kubeconfig context's namespace, as kubectl get pods
    assert f"trace {name} created for pods in default;" in done.stderr

    name = f"plugin-{uuid.uuid4().hex[:6]}"
    objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, trace_body(name,
                                                                               nodeSelector={"kubernetes.io/hostname": NODE_A}))
    try:
        # show -w prints the trace again whenever it changes, until it completes: seen once
        # before the trace is given an end, then to its completion.
        watched = subprocess.Popen(plugin_command("show", name, "-w", "--interval", "1",
                                                  "-o", 'jsonpath={.status.phase}{"\\n"}'),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=control_plane.env())
        first = watched.stdout.readline()
        out, err = end_and_collect(watched, objects, name, timeout=300)
        assert watched.returncode == 0, err
        phases = [first.rstrip("\n")] + out.splitlines()
        assert phases[0] != "Completed" and phases[-1] == "Completed" and "Completed" not in phases[:-1], phases
        watch = plugin(control_plane, "watch", name, "--interval", "1")
        assert watch.returncode == 0, watch.stderr
        assert f"{name}: Completed" in watch.stdout
        assert get_trace(objects, name)["status"]["phase"] == "Completed"
    finally:
        deleted = plugin(control_plane, "delete", name)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f'retransmittrace.retransmit.dev "{name}" deleted'
    wait_until(lambda: get_trace(objects, name) is None, f"trace {name} gone after delete", timeout=60)


def test_global_flags_after_the_subcommand_and_each_output_form(control_plane, operator, objects, tmp_path):
    """KUBECONFIG points nowhere: only --kubeconfig/--context typed after the subcommand find
    the cluster."""
    where = ("--kubeconfig", str(control_plane.kubeconfig), "--context", "rtrace")
    absent = tmp_path / "absent.kubeconfig"
    name = f"plugin-{uuid.uuid4().hex[:6]}"
    done = plugin(control_plane, "run", "--name", name, "--node", NODE_A, "--duration", "3s", "--interval", "1",
                  "--keep", "-o", "name", "-n", "shop", *where, kubeconfig=absent)
    assert done.returncode == 0, done.stderr
    try:
        assert done.stdout == f"retransmittrace.retransmit.dev/{name}\n"
        assert f"trace {name} created for pods in shop;" in done.stderr
        stored = get_trace(objects, name)
        assert stored["spec"]["namespaces"] == ["shop"] and stored["metadata"]["managedFields"]
        for form, read in (("json", json.loads), ("yaml", yaml.safe_load)):
            shown = plugin(control_plane, "show", name, "-o", form, *where, kubeconfig=absent)
            assert shown.returncode == 0, shown.stderr
            printed = read(shown.stdout)
            assert "managedFields" not in printed["metadata"], form
            assert (printed["metadata"]["uid"], printed["spec"]) == (stored["metadata"]["uid"], stored["spec"]), form
        picked = plugin(control_plane, "show", name, "-o", "jsonpath={.status.phase} {.spec.namespaces[0]}", *where,
                        kubeconfig=absent)
        assert (picked.returncode, picked.stdout) == (0, "Completed shop"), picked.stderr
        for form in ("table", "wide"):
            shown = plugin(control_plane, "show", name, "-o", form, *where, kubeconfig=absent)
            assert shown.returncode == 0 and shown.stdout.startswith(f"{name}: Completed"), shown.stderr
        named = plugin(control_plane, "show", name, "-o", "name", *where, kubeconfig=absent)
        assert named.stdout == done.stdout
    finally:
        deleted = plugin(control_plane, "delete", name, *where, kubeconfig=absent)
        assert deleted.returncode == 0, deleted.stderr

    # -A before the subcommand: every namespace (no spec.namespaces)
    name = f"plugin-{uuid.uuid4().hex[:6]}"
    done = plugin(control_plane, "-A", "run", "--name", name, "--node", NODE_A, "--duration", "1s",
                  "--interval", "1", "--keep", "-o", "name")
    assert done.returncode == 0, done.stderr
    try:
        assert f"trace {name} created for pods in all namespaces;" in done.stderr
        assert not get_trace(objects, name)["spec"].get("namespaces")
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def kubectl() -> str:
    """kubectl 1.34 as `make tools` installs it (tests/harness/fetch_tools.py)."""
    cache = Path(os.environ.get("RTRACE_CACHE", Path.home() / ".cache/retransmit-operator"))
    found = shutil.which("kubectl") or str(cache / "bin/kubectl")
    assert Path(found).exists(), f"no kubectl at {found}: run make tools"
    return found


def test_kubectl_completes_trace_names_from_the_api_server_and_nothing_without_it(
        control_plane, installed, objects, tmp_path):
    name = f"complete-{uuid.uuid4().hex[:6]}"
    objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, trace_body(
        name, duration="1h", nodeSelector={"kubernetes.io/hostname": "no-such-node"}))
    try:
        direct = subprocess.run([PLUGIN_COMPLETE, "show", name[:-2]], env=control_plane.env(),
                                capture_output=True, text=True, timeout=60)
        assert (direct.returncode, direct.stdout.splitlines()) == (0, [name, ":4"]), direct.stderr
        # kubectl 1.26+ finds kubectl-retransmit and kubectl_complete-retransmit on PATH
        env = {**control_plane.env(), "PATH": f"{Path(PLUGIN).parent}:{os.environ['PATH']}"}
        via = subprocess.run([kubectl(), "__complete", "retransmit", "delete", name[:-2]], env=env,
                             capture_output=True, text=True, timeout=60)
        assert via.returncode == 0 and via.stdout.splitlines() == [name, ":4"], via.stdout + via.stderr
        commands = subprocess.run([kubectl(), "__complete", "retransmit", "sh"], env=env,
                                  capture_output=True, text=True, timeout=60)
        assert commands.stdout.splitlines() == ["show", ":4"], commands.stdout + commands.stderr
    finally:
        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    nowhere = tmp_path / "nowhere.kubeconfig"
    nowhere.write_text(Path(control_plane.kubeconfig).read_text().replace(control_plane.server,
                                                                          f"https://127.0.0.1:{free_port()}"))
    silent = subprocess.run([PLUGIN_COMPLETE, "--kubeconfig", str(nowhere), "show", ""], env=control_plane.env(),
                            capture_output=True, text=True, timeout=60)
    assert (silent.returncode, silent.stdout, silent.stderr) == (0, ":4\n", "")


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
