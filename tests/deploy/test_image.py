"""The image, for real: build it (make image-build: podman from a debootstrap base), run its
agent in a privileged container with only the host mounts a DaemonSet gives it, make real
retransmits in a private network namespace, and compare with a reference counter."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helm.render_manifests import ROOT
from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter, involving, per_flow

pytestmark = pytest.mark.deploy

IMAGE = os.environ.get("RTRACE_IMAGE", "localhost/retransmit-operator:dev")
# crun fails on this machine's hybrid cgroups; podman's default ulimits exceed its hard limit.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


@pytest.fixture(scope="module")
def image() -> str:
    """The image as the tree is now (layers are cached: seconds when nothing changed)."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "image-build", f"IMAGE={IMAGE}"], check=True,
                   stdout=subprocess.DEVNULL)
    return IMAGE


def podman_run(*args: str, name: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*PODMAN, "run", "--rm", "--name", name, *ULIMITS, *args], **kwargs)


def inspect(image: str) -> dict:
    out = subprocess.run(["podman", "image", "inspect", image], check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def test_image_runs_the_operator_as_a_non_root_user(image):
    config = inspect(image)["Config"]
    assert config["User"] == "65532:65532"
    assert config["Cmd"] == ["retransmit-operator"]
    done = subprocess.run([*PODMAN, "run", "--rm", *ULIMITS, image, "sh", "-c",
                           "id -u; command -v retransmit-operator; command -v retransmit-agent; retransmit-operator --help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "65532"
    assert lines[1:3] == ["/opt/retransmit/venv/bin/retransmit-operator", "/usr/local/bin/retransmit-agent"]
    assert "usage: retransmit-operator" in done.stdout


def podman_security(context: dict) -> list[str]:
    """podman flags for a container securityContext as the operator renders it for agents."""
    flags = ["--user", str(context.get("runAsUser", 0))]
    if context.get("privileged"):
        flags.append("--privileged")
    caps = context.get("capabilities") or {}
    flags += [f"--cap-drop={c}" for c in caps.get("drop", [])] + [f"--cap-add={c}" for c in caps.get("add", [])]
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    if context.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--tmpfs", "/tmp"]     # the DaemonSet mounts an emptyDir at /tmp
    return flags


@pytest.mark.parametrize("mode", ["privileged", "capabilities"])
def test_image_agent_counts_real_retransmits_with_its_generic_kernel_headers(image, mode):
    """The agent container with the securityContext the operator renders for `mode`, and
    no /lib/modules or /usr/src from the host (as on RHCOS): bcc must compile against the
    image's generic headers, and the counts must match the reference counter exactly."""
    from retransmit_operator.render import security_context

    name = f"rtrace-image-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with ReferenceCounter() as ref, LossNamespace(prefix="rtimg") as ns:
        ours = set(ns.v4)
        port = 20000 + os.getpid() % 20000
        agent = podman_run(
            *podman_security(security_context(mode)), "--network", "host",
            "-v", "/sys/kernel/debug:/sys/kernel/debug:ro", "-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro",
            image, "retransmit-agent", "local", "--duration", "300s", "--output", "json", "--top", "0",
            *[arg for ip in ours for arg in ("--remote-cidr", f"{ip}/32")],
            name=name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # The agent says when its program is attached (after bcc compiled it).
            line = agent.stderr.readline()
            assert "counting on tcp:tcp_retransmit_skb" in line, line + agent.stderr.read()
            ns.random_loss(10)
            traffic = ns.python("tests.harness.traffic", "bulk", "--server-ip", ns.v4[0], "--client-ip", ns.v4[1],
                                "--port", str(port), "--connections", "4", "--bytes", str(2 << 20), "--duplex",
                                stdout=subprocess.PIPE, text=True)
            assert traffic.wait(timeout=240) == 0
            ns.clear_loss()
            ns.wait_quiet()
            expected = per_flow(ref.read(), involving(ours))
        finally:
            subprocess.run([*PODMAN, "kill", "--signal", "TERM", name], capture_output=True)
        out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    report = json.loads(out)

    assert report["phase"] == "Running", report.get("message")
    want_total = sum(r for r, _s in expected.values())
    assert want_total > 0, "the loss rule made no retransmits: the test proves nothing"
    # Filtered in the kernel to our two addresses: the node total is exactly our flows'.
    assert report["retransmits"] == want_total
    got = {(f["family"], f["local"]["ip"], f["local"]["port"], f["remote"]["ip"], f["remote"]["port"]): f["retransmits"]
           for f in report["topFlows"]}
    assert got == {flow: r for flow, (r, _s) in expected.items() if r}
    print(f"image agent ({mode}): {report['retransmits']} retransmits over {len(got)} flows, reference {want_total}")


def test_image_operator_reconciles_as_an_arbitrary_uid_without_a_passwd_entry(image, control_plane, tmp_path):
    """containerd and CRI-O add no passwd entry for the image's user, and OpenShift's
    restricted-v2 SCC picks an arbitrary uid with gid 0: the operator must start and act
    as such a user (kopf's default identity called getpwuid() and crash-looped there).
    Read-only root filesystem as in the chart; the proof is a DaemonSet it rendered."""
    import kubernetes

    from retransmit_core.naming import daemonset_name
    from tests.deploy.kube import install_crd, kubectl, unique
    from tests.harness.controlplane import free_port

    install_crd(control_plane)
    ns, trace = unique("rtrace-uid"), unique("uid")
    kubectl(control_plane, "create", "namespace", ns)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(Path(control_plane.kubeconfig).read_text())
    kubeconfig.chmod(0o644)      # readable by the arbitrary uid
    health_port = free_port()
    name = f"rtrace-uid-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    operator = podman_run(
        "--passwd=false", "--user", "1000680000:0", "--read-only", "--tmpfs", "/tmp", "--network", "host",
        "--cap-drop=ALL", "--security-opt", "no-new-privileges",
        "-v", f"{kubeconfig}:/run/kubeconfig:ro", "-e", "KUBECONFIG=/run/kubeconfig",
        "-e", f"RTRACE_NAMESPACE={ns}", "-e", f"RTRACE_METRICS_PORT={health_port}",
        image, name=name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with control_plane.api_client() as api:
            apps = kubernetes.client.AppsV1Api(api)

            kubectl(control_plane, "apply", "-f", "-", input=(
                "apiVersion: retransmit.dev/v1alpha1\nkind: RetransmitTrace\n"
                f"metadata: {{name: {trace}}}\nspec: {{nodeSelector: {{rtrace.dev/none: none}}}}\n"))
            deadline = time.monotonic() + 240   # bounds a wait for a state that must come
            while True:
                # A crash (the bug: KeyError from getpwuid) fails at once with the container's output.
                assert operator.poll() is None, f"operator exited {operator.returncode}: {operator.stdout.read()}"
                try:
                    apps.read_namespaced_daemon_set(daemonset_name(trace), ns)
                    break
                except kubernetes.client.ApiException as e:
                    if e.status != 404:
                        raise
                assert time.monotonic() < deadline, "the operator running as uid 1000680000 made no DaemonSet"
                time.sleep(1)
        uid = subprocess.run([*PODMAN, "exec", name, "id", "-u"], capture_output=True, text=True, check=True)
        assert uid.stdout.strip() == "1000680000"
    finally:
        kubectl(control_plane, "delete", "rtrace", trace, "--ignore-not-found", check=False)
        subprocess.run([*PODMAN, "kill", "--signal", "TERM", name], capture_output=True)
        out, _ = operator.communicate(timeout=120)
        kubectl(control_plane, "delete", "namespace", ns, "--wait=false", check=False)
    assert "getpwuid" not in out, out
