"""Checks made before compiling the kernel program, each failing with one actionable line.

tracefs mounted, both tracepoints present, privileges to load BPF, kernel headers for bcc.
What the kernel offers beyond that (fields, helpers, buffers) is probed in kernelinfo.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEPOINTS = (("tcp", "tcp_retransmit_skb"), ("tcp", "tcp_retransmit_synack"))

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"


class KernelProblem(Exception):
    """The node cannot trace. str(problem) is one line: what is wrong and how to fix it."""


def find_tracefs(explicit: Optional[str] = None) -> Path:
    """The tracefs mount to use: `explicit` when given, else the first mounted candidate."""
    if explicit:
        path = Path(explicit)
        if not (path / "events").is_dir():
            raise KernelProblem(
                f"no tracefs at {path} (no events/ directory): mount it with "
                f"'mount -t tracefs tracefs {path}' or pass the path of a mounted tracefs"
            )
        return path
    for candidate in TRACEFS_CANDIDATES:
        if (Path(candidate) / "events").is_dir():
            return Path(candidate)
    raise KernelProblem(
        "tracefs is not mounted (neither /sys/kernel/tracing nor /sys/kernel/debug/tracing has events/): "
        "run 'mount -t tracefs tracefs /sys/kernel/tracing' on the host; in a pod, mount the host's "
        "/sys/kernel/tracing (or /sys/kernel/debug) as a hostPath volume"
    )


def require_tracepoints(tracefs: Path) -> None:
    """Both tcp tracepoints exist under `tracefs` (they appeared in Linux 4.15/4.16)."""
    for category, event in TRACEPOINTS:
        if not (tracefs / "events" / category / event / "format").is_file():
            raise KernelProblem(
                f"tracepoint {category}:{event} is missing ({tracefs}/events/{category}/{event} "
                f"does not exist): this kernel cannot be traced; use Linux 4.16 or later built "
                f"with CONFIG_TRACEPOINTS"
            )


def effective_capabilities() -> int:
    """CapEff of this process as a bit mask (0 when /proc is unreadable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


# What an agent's capabilities let it do, named after the operator's security modes
# (RTRACE_AGENT_SECURITY_MODE, operator/render.py) so rtrace_agent_info{mode} shows whether a
# rollout to the capabilities mode took effect on every node.
PRIVILEGED = "privileged"        # CAP_SYS_ADMIN: a privileged container, or root on a host
CAPABILITIES = "capabilities"    # CAP_BPF + CAP_PERFMON without CAP_SYS_ADMIN (Linux 5.8+)
UNPRIVILEGED = "unprivileged"    # neither: cannot load the program
SECURITY_MODES = (PRIVILEGED, CAPABILITIES, UNPRIVILEGED)


def security_mode(caps: int) -> str:
    """The security mode a CapEff bit mask amounts to. Loading a tracing BPF program needs
    CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON."""
    has = lambda cap: bool(caps & (1 << cap))  # noqa: E731
    if has(CAP_SYS_ADMIN):
        return PRIVILEGED
    if has(CAP_BPF) and has(CAP_PERFMON):
        return CAPABILITIES
    return UNPRIVILEGED


def last_capability() -> Optional[int]:
    """The highest capability this kernel knows (/proc/sys/kernel/cap_last_cap): below
    CAP_BPF (39) on kernels before 5.8, whatever their version string says (backports)."""
    try:
        return int(Path(CAP_LAST_CAP).read_text().strip())
    except (OSError, ValueError):
        return None


class PrivilegeProblem(KernelProblem):
    """The node may not load BPF with this process's privileges. `needs_privileged`: a
    privileged agent may (this one lacks CAP_SYS_ADMIN, which a privileged container has);
    the operator's auto security mode then runs one on this node (operator/privilege.py)."""

    def __init__(self, message: str, capabilities: int) -> None:
        super().__init__(message)
        self.needs_privileged = not capabilities & (1 << CAP_SYS_ADMIN)


def missing_privileges(caps: int, last_cap: Optional[int]) -> Optional[str]:
    """Why `caps` (a CapEff mask) may not load a tracing BPF program, or None when they may:
    CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON (Linux 5.8+, when the kernel knows them)."""
    if security_mode(caps) != UNPRIVILEGED:
        return None
    has = lambda cap: bool(caps & (1 << cap))  # noqa: E731
    if last_cap is not None and last_cap < CAP_BPF:
        return (f"this kernel has no CAP_BPF or CAP_PERFMON (cap_last_cap is {last_cap}: they came with Linux 5.8), "
                "and this process has no CAP_SYS_ADMIN")
    lacking = [name for cap, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not has(cap)]
    return f"this process has neither CAP_SYS_ADMIN nor {' and '.join(lacking)} (effective capabilities {caps:#x})"


def require_privileges() -> None:
    """Loading a tracing BPF program needs CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON."""
    caps = effective_capabilities()
    why = missing_privileges(caps, last_capability())
    if why is None:
        return
    raise PrivilegeProblem(
        f"not permitted to load BPF programs (uid {os.geteuid()}): {why}: run as root (sudo) or, in a pod, "
        "privileged (the chart's agent.securityMode auto does that on such nodes by itself)", caps)


def require_kernel_headers(release: Optional[str] = None) -> None:
    """bcc compiles against /lib/modules/<release>/build, kheaders, or $BCC_KERNEL_SOURCE."""
    release = release or os.uname().release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if Path(f"/lib/modules/{release}/build/include").is_dir():
        return
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return
    raise KernelProblem(
        f"no kernel headers for {release} (/lib/modules/{release}/build is missing): install "
        f"linux-headers-{release} (Debian/Ubuntu) or kernel-devel (RHEL), or load the kheaders "
        "module (modprobe kheaders); `make setup` links generic headers on this machine"
    )
