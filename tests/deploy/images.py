"""The project's two images as the deploy tests use them: their names (the Makefile's
OPERATOR_IMAGE and AGENT_IMAGE, passed as RTRACE_TEST_*), building them as the tree is now,
the chart values that run them on a node without a registry, and podman helpers."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid

from helm.render_manifests import ROOT

OPERATOR_IMAGE = os.environ.get("RTRACE_TEST_OPERATOR_IMAGE", "localhost/retransmit-operator:dev")
AGENT_IMAGE = os.environ.get("RTRACE_TEST_AGENT_IMAGE", "localhost/retransmit-agent:dev")

# crun fails on this machine's hybrid cgroups; podman's default ulimits exceed its hard limit.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def build(*make_targets: str) -> None:
    """`make image-build` (and `make_targets` first): layers are cached, so seconds when
    nothing changed."""
    subprocess.run(["make", "-s", "-C", str(ROOT), *make_targets, "image-build",
                    f"OPERATOR_IMAGE={OPERATOR_IMAGE}", f"AGENT_IMAGE={AGENT_IMAGE}"],
                   check=True, stdout=subprocess.DEVNULL)


def chart_values(pull_policy: str = "Never") -> list[str]:
    """helm --set flags for both images, as built here."""
    flags: list[str] = []
    for key, image in (("operator", OPERATOR_IMAGE), ("agent", AGENT_IMAGE)):
        repository, tag = image.rsplit(":", 1)
        flags += ["--set", f"{key}.image.repository={repository}", "--set", f"{key}.image.tag={tag}",
                  "--set", f"{key}.image.pullPolicy={pull_policy}"]
    return flags


def inspect(image: str) -> dict:
    out = subprocess.run(["podman", "image", "inspect", image], check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def paths_in(image: str) -> list[str]:
    """Every path of the image's filesystem (podman export of a container never started)."""
    name = f"rtrace-image-files-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run([*PODMAN, "create", "--name", name, image], check=True, capture_output=True)
    try:
        export = subprocess.Popen([*PODMAN, "export", name], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            paths = [member.name.lstrip("./") for member in tar]
        assert export.wait() == 0
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
    return paths
