"""Turning what bcc, clang and the verifier print into one line a person can act on."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator

from .preflight import KernelProblem, PrivilegeProblem, effective_capabilities


@contextlib.contextmanager
def stderr_captured() -> Iterator[list[str]]:
    """Collect what C code (clang, libbpf) prints on fd 2 while compiling and loading."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def plain(text: str) -> str:
    """bcc's messages without Python's bytes reprs: "program b'x'" -> "program x"."""
    return re.sub(r"\bb(['\"])(.*?)\1", r"\2", text)


def bcc_failure(exc: Exception, output: list[str]) -> KernelProblem:
    text = [plain(line.strip()) for line in output if line.strip()]
    why = plain(str(exc))
    denied = [line for line in text if any(word in line.lower() for word in
                                           ("operation not permitted", "permission denied", "eperm"))]
    if denied:
        # bcc creates maps while "compiling": a seccomp filter or missing capabilities fail
        # there, and blaming the headers would send the user the wrong way.
        # The kernel's own answer is the probe that counts: capabilities the kernel knows
        # and the process holds may still not be enough (a seccomp profile, an LSM, a
        # kernel that wants more for this program type).
        return PrivilegeProblem(
            f"the kernel denied BPF ({denied[0]}): run the agent privileged, or with CAP_BPF, "
            "CAP_PERFMON and CAP_SYS_RESOURCE and seccomp Unconfined", effective_capabilities()
        )
    release = os.uname().release
    if "compile" in why.lower():
        errors = [line for line in text if "error:" in line]
        detail = (errors or text or [why])[0]
        if "no member named" in detail:
            # The program asked for a tracepoint field this kernel lacks: our bug, not the headers.
            return KernelProblem(
                f"the BPF program does not fit this kernel's tracepoint layout ({detail}) on Linux "
                f"{release}: report it with /sys/kernel/tracing/events/tcp/*/format to the project")
        return KernelProblem(
            f"bcc could not compile the BPF program ({detail}): the kernel headers under "
            f"/lib/modules/{release}/build do not fit bcc; install the headers of the running kernel"
        )
    errors = [line for line in text if any(word in line.lower() for word in
                                           ("error", "denied", "not permitted", "invalid", "cannot"))]
    detail = (errors or text or [why])[-1]
    return KernelProblem(
        f"Linux {release} rejected the BPF program ({why}; {detail}): run as root on a kernel with "
        "CONFIG_BPF_SYSCALL and CONFIG_BPF_EVENTS, and check `dmesg` and the kernel lockdown mode"
    )
