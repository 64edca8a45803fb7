"""The images, for real: build both (make image-build: podman from a base made from this
host's apt sources). The operator image: small, non-root, none of the agent's bcc, clang or
kernel headers, and it reconciles as an arbitrary uid. The agent image: its agent runs in a
privileged container with only the host mounts a DaemonSet gives it, against real
retransmits in a private network namespace, compared with a reference counter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.deploy.images import AGENT_IMAGE, OPERATOR_IMAGE, PODMAN, ULIMITS, build, inspect, paths_in
from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter, involving, per_flow

pytestmark = pytest.mark.deploy

# The target for the operator image (podman's size: the unpacked layers, in bytes).
OPERATOR_IMAGE_MAX_BYTES = 150_000_000
# Paths of the agent's toolchain that the operator image must not carry: bcc (its Python
# package and library), clang/LLVM, kernel headers.
AGENT_ONLY = re.compile(r"(^|/)(bcc|libbcc[^/]*|clang[^/]*|libclang[^/]*|llvm[^/]*|libLLVM[^/]*|kernel-headers"
                        r"|linux-headers-[^/]*)(/|$)")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Both images as the tree is now (layers are cached: seconds when nothing changed)."""
    build()
    return {"operator": OPERATOR_IMAGE, "agent": AGENT_IMAGE}


@pytest.fixture(scope="module")
def agent_image(images) -> str:
    return images["agent"]


@pytest.fixture(scope="module")
def operator_image(images) -> str:
    return images["operator"]


def podman_run(*args: str, name: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*PODMAN, "run", "--rm", "--name", name, *ULIMITS, *args], **kwargs)


def test_operator_image_is_small_and_has_no_bcc_clang_or_kernel_headers(images):
    sizes = {role: inspect(image)["Size"] for role, image in images.items()}
    for role, image in images.items():
        print(f"{role} image {image}: {sizes[role] / 1e6:.1f} MB")
    found = {role: sorted({m.group(0).strip("/") for p in paths_in(image) if (m := AGENT_ONLY.search(p))})
             for role, image in images.items()}
    # The agent image has them all (so the pattern finds them), the operator image none.
    assert {"bcc", "kernel-headers"} <= set(found["agent"]), found["agent"]
    assert any(name.startswith(("libclang", "libLLVM", "llvm")) for name in found["agent"]), found["agent"]
    assert found["operator"] == []
    assert sizes["operator"] < OPERATOR_IMAGE_MAX_BYTES, f"operator image {sizes['operator'] / 1e6:.1f} MB"


def test_operator_image_runs_the_operator_as_a_non_root_user(operator_image):
    config = inspect(operator_image)["Config"]
    assert config["User"] == "65532:65532"
    assert config["Cmd"] == ["retransmit-operator"]
    done = subprocess.run([*PODMAN, "run", "--rm", *ULIMITS, operator_image, "python", "-c",
                           "import os, shutil, importlib.util as u; print(os.getuid()); "
                           "print(shutil.which('retransmit-operator'), shutil.which('retransmit-agent')); "
                           "print([m for m in ('bcc', 'retransmit_agent', 'retransmit_operator') if u.find_spec(m)])"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["65532", "/opt/retransmit/venv/bin/retransmit-operator None",
                                        "['retransmit_operator']"]
    usage = subprocess.run([*PODMAN, "run", "--rm", *ULIMITS, operator_image, "retransmit-operator", "--help"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "usage: retransmit-operator" in usage.stdout, usage.stderr


def test_agent_image_carries_its_architectures_generic_headers(agent_image):
    config = inspect(agent_image)["Config"]
    assert config["Cmd"] == ["retransmit-agent"]
    arch = inspect(agent_image)["Architecture"]
    done = subprocess.run([*PODMAN, "run", "--rm", *ULIMITS, agent_image, "sh", "-c",
                           "command -v retransmit-agent; cat $RTRACE_KERNEL_HEADERS/DEBIAN-PACKAGE; "
                           "ls $RTRACE_KERNEL_HEADERS/arch"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wrapper, package, *arch_dirs = done.stdout.split()
    assert wrapper == "/usr/local/bin/retransmit-agent"
    assert package.startswith("linux-headers-") and package.endswith(f"-{arch}")
    assert arch_dirs == [{"amd64": "x86", "arm64": "arm64"}[arch]]


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
def test_agent_image_counts_real_retransmits_with_its_generic_kernel_headers(agent_image, mode):
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
            agent_image, "retransmit-agent", "local", "--duration", "300s", "--output", "json", "--top", "0",
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


def test_operator_image_reconciles_as_an_arbitrary_uid_without_a_passwd_entry(operator_image, control_plane, tmp_path):
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
        operator_image, name=name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        uid = subprocess.run([*PODMAN, "exec", name, "python", "-c", "import os; print(os.getuid())"],
                             capture_output=True, text=True, check=True)
        assert uid.stdout.strip() == "1000680000"
    finally:
        kubectl(control_plane, "delete", "rtrace", trace, "--ignore-not-found", check=False)
        subprocess.run([*PODMAN, "kill", "--signal", "TERM", name], capture_output=True)
        out, _ = operator.communicate(timeout=120)
        kubectl(control_plane, "delete", "namespace", ns, "--wait=false", check=False)
    assert "getpwuid" not in out, out
