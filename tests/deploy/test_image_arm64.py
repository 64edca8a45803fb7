"""The arm64 agent image, built and run on this amd64 host under qemu-user emulation
(`make image-agent-arm64`; Debian's qemu-user-static registers aarch64 with binfmt_misc).
Marked `emulated`, not `deploy`: the build takes tens of minutes on 2 cores, so `make test`
leaves it out. What emulation can show: the image is arm64 throughout (its programs, bcc's
library, the headers' arch/ folder), bcc imports and the agent's CLI starts. What it cannot:
counting retransmits. bcc's clang compiles the program under emulation, but qemu-user (7.2)
does not pass the bpf() system call through (ENOSYS at the first map): loading and counting
need an arm64 kernel."""

from __future__ import annotations

import os
import subprocess

import pytest

from helm.render_manifests import ROOT
from tests.deploy.images import AGENT_IMAGE, PODMAN, ULIMITS, inspect

pytestmark = pytest.mark.emulated

ARM64_IMAGE = os.environ.get("RTRACE_TEST_AGENT_IMAGE_ARM64", AGENT_IMAGE + "-arm64")
EM_AARCH64 = 183        # ELF e_machine of AArch64


@pytest.fixture(scope="module")
def image() -> str:
    """The arm64 agent image as the tree is now (layers cached: seconds when nothing changed)."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "image-build-agent", "IMAGE_ARCH=arm64",
                    f"AGENT_IMAGE={ARM64_IMAGE}"], check=True, stdout=subprocess.DEVNULL)
    return ARM64_IMAGE


def run_arm64(image: str, script: str) -> str:
    done = subprocess.run([*PODMAN, "run", "--rm", "--arch", "arm64", *ULIMITS, image, "sh", "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_arm64_agent_image_is_arm64_with_arm64_headers(image):
    assert inspect(image)["Architecture"] == "arm64"
    lines = run_arm64(image, "uname -m; cat $RTRACE_KERNEL_HEADERS/DEBIAN-PACKAGE; ls $RTRACE_KERNEL_HEADERS/arch; "
                             "python3 -c 'import bcc, glob, struct, sys; "
                             "print(*(struct.unpack_from(\"<H\", open(p, \"rb\").read(20), 18)[0] "
                             "for p in (sys.executable, *glob.glob(\"/usr/lib/*/libbcc.so.0\"))))'").split()
    machine, package, arch_dir, python_elf, libbcc_elf = lines
    assert machine == "aarch64"
    assert package.startswith("linux-headers-") and package.endswith("-arm64")
    assert arch_dir == "arm64"
    assert (int(python_elf), int(libbcc_elf)) == (EM_AARCH64, EM_AARCH64)


def test_arm64_agent_image_starts_its_agent(image):
    out = run_arm64(image, "retransmit-agent --help")
    assert "usage: retransmit-agent" in out
