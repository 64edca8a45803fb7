"""`retransmit-agent check`: can this node count retransmits, and in which mode?

One line per requirement, each failing or degraded line with its fix. `gather_facts()` does
the probing (I/O); `evaluate(facts)` is pure and decides. Exit status 0 when the agent can
count, 1 when it cannot. The cluster agent puts the same lines into its node's report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from .kernelinfo import VMLINUX_BTF as BTF_PATH
from .kernelinfo import (
    BPF_FUNC_JIFFIES64,
    OPTIONAL_FIELDS,
    SKB,
    SYNACK,
    TracepointLayout,
    helper_supported,
    misses_counted,
    resolve_cgroup_offsets,
    resolve_sock_offsets,
    read_layout,
    ringbuf_supported,
)
from .cgroups import find_cgroup2
from .drops import REASON_SINCE, probe_drops
from .preflight import (
    TRACEFS_CANDIDATES,
    UNPRIVILEGED,
    effective_capabilities,
    security_mode,
)

Status = Literal["ok", "degraded", "fail"]


@dataclass(frozen=True)
class CheckLine:
    """One requirement: its status, what was found, and (unless ok) what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def render(self) -> str:
        text = f"{self.status.upper():8} {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix else text


@dataclass(frozen=True)
class HostFacts:
    """What gather_facts() found; every field is plain data so evaluate() stays pure."""

    release: str
    tracefs: Optional[str]                  # mounted tracefs with events/, or None
    tracefs_how: str                        # "tracefs", "debugfs (tracing/ inside)", ...
    tracepoints: dict[str, bool]            # tracepoint name -> format file present
    layout: Optional[TracepointLayout]      # None when the format files are unreadable
    btf_problem: str                        # "" when the socket offsets resolved from BTF
    ringbuf: Optional[bool]                 # None: could not tell (no permission, no bcc)
    jiffies64: Optional[bool]
    capabilities: int
    headers: Optional[str]                  # where bcc finds headers, or None
    bcc_version: Optional[str]              # None: python module bcc missing
    bcc_has_ringbuf_api: bool = True
    misses_counted: bool = True             # see kernelinfo.misses_counted
    drops_problem: str = "not probed"       # "" when drops are counted by reason (drops.probe_drops)
    segs_problem: str = ""                  # "" when BTF has the flows' segment counters too
    cgroup_root: str = ""                   # the host's cgroup2 hierarchy, "" when none
    cgroup_problem: str = "not probed"      # "" when sockets are named by cgroup (cgroup_root and BTF)


def _mount_kind(path: str, mountinfo: str) -> str:
    """The filesystem type of the mount that holds `path` (longest mount point prefix)."""
    best, kind = "", "not mounted"
    for line in mountinfo.splitlines():
        parts = line.split(" - ", 1)
        if len(parts) != 2:
            continue
        point = parts[0].split()[4]
        fstype = parts[1].split()[0]
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return f"{kind} at {best}" if best else kind


def _headers(release: str) -> Optional[str]:
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return f"BCC_KERNEL_SOURCE={os.environ['BCC_KERNEL_SOURCE']}"
    build = Path(f"/lib/modules/{release}/build")
    if (build / "include").is_dir():
        try:
            text = (build / "include" / "generated" / "utsrelease.h").read_text()
            version = text.split('"')[1]
        except (OSError, IndexError):
            version = "unknown"
        kind = "matching" if version == release else f"generic, from {version}: enough, the program reads only tracepoint fields"
        return f"{build.resolve()} ({kind})"
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return "/sys/kernel/kheaders.tar.xz (kheaders module)"
    return None


def gather_facts(tracefs: Optional[str] = None) -> HostFacts:
    """Probe this host (read-only, apart from loading and freeing tiny BPF objects)."""
    release = os.uname().release
    candidates = (tracefs,) if tracefs else TRACEFS_CANDIDATES
    found = next((c for c in candidates if (Path(c) / "events").is_dir()), None)
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        mountinfo = ""
    how = _mount_kind(found or candidates[0], mountinfo)
    tracepoints = {tp: bool(found) and (Path(found) / "events" / "tcp" / tp / "format").is_file()
                   for tp in (SKB, SYNACK)}
    layout = None
    if all(tracepoints.values()):
        try:
            layout = read_layout(Path(found))
        except OSError:
            layout = None
    try:
        import bcc
        from bcc import BPF

        bcc_version: Optional[str] = getattr(bcc, "__version__", "unknown")
        has_rb_api = hasattr(BPF, "ring_buffer_consume")
    except ImportError:
        bcc_version, has_rb_api = None, False
    caps = effective_capabilities()
    ringbuf = None
    if bcc_version is not None:
        try:
            ringbuf = ringbuf_supported()
        except OSError:
            ringbuf = None
    offsets, btf_problem = resolve_sock_offsets(BTF_PATH)
    root, cgroup_problem = find_cgroup2()
    if root is not None:
        cgroup_problem = resolve_cgroup_offsets(BTF_PATH)[1]
    return HostFacts(
        release=release, tracefs=found, tracefs_how=how, tracepoints=tracepoints, layout=layout,
        btf_problem=btf_problem, segs_problem=offsets.segs_problem if offsets else "", ringbuf=ringbuf, jiffies64=helper_supported(BPF_FUNC_JIFFIES64),
        capabilities=caps, headers=_headers(release), bcc_version=bcc_version, bcc_has_ringbuf_api=has_rb_api,
        misses_counted=misses_counted(release),
        drops_problem=probe_drops(Path(found), BTF_PATH).problem if found else "no tracefs",
        cgroup_root=str(root or ""), cgroup_problem=cgroup_problem,
    )


def evaluate(facts: HostFacts) -> list[CheckLine]:
    """The check lines for `facts`, in the order a person reads them."""
    lines = [CheckLine("kernel", "ok", f"Linux {facts.release}")]
    if facts.tracefs:
        lines.append(CheckLine("tracefs", "ok", f"{facts.tracefs} ({facts.tracefs_how})"))
    else:
        lines.append(CheckLine(
            "tracefs", "fail", f"no events/ under {' or '.join(TRACEFS_CANDIDATES)} ({facts.tracefs_how})",
            "mount it: 'mount -t tracefs tracefs /sys/kernel/tracing' on the host; in a pod, mount the host's "
            "/sys/kernel/tracing and /sys/kernel/debug as hostPath volumes (an OpenShift debug container's "
            "/sys/kernel/debug is empty: use the agent's DaemonSet)"))
    for tp in (SKB, SYNACK):
        if not facts.tracepoints.get(tp):
            lines.append(CheckLine(f"tracepoint tcp:{tp}", "fail", "missing",
                                   "use Linux 4.16 or later built with CONFIG_TRACEPOINTS"))
            continue
        fields = facts.layout.skb if (facts.layout and tp == SKB) else (facts.layout.synack if facts.layout else set())
        if tp == SKB:
            optional = ", ".join(f"{name} {'yes' if name in fields else 'no'} ({since}+)"
                                 for name, (since, _switch) in OPTIONAL_FIELDS.items())
            lines.append(CheckLine(f"tracepoint tcp:{tp}", "ok", f"present; optional fields: {optional}"))
        else:
            lines.append(CheckLine(f"tracepoint tcp:{tp}", "ok", "present"))
    if facts.layout is not None:
        missing = facts.layout.missing()
        if missing:
            lines.append(CheckLine("tracepoint fields", "fail", f"missing {', '.join(missing)}",
                                   "report this kernel's /sys/kernel/tracing/events/tcp/*/format to the project"))
        if not facts.layout.has("state"):
            lines.append(CheckLine("TCP states", "degraded", "no `state` field (Linux < 5.0): retransmits are "
                                   "counted under UNKNOWN and a states filter is refused", "a 5.0+ kernel reports states"))
    caps_ok = security_mode(facts.capabilities) != UNPRIVILEGED
    if caps_ok:
        lines.append(CheckLine("BPF permission", "ok", f"capabilities 0x{facts.capabilities:x} (CAP_SYS_ADMIN or CAP_BPF+CAP_PERFMON)"))
    else:
        lines.append(CheckLine("BPF permission", "fail", f"uid {os.geteuid()}, capabilities 0x{facts.capabilities:x}",
                               "run as root, or in a pod with securityContext.privileged: true "
                               "(or CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE and seccomp Unconfined)"))
    if facts.ringbuf:
        lines.append(CheckLine("ring buffer", "ok", "BPF ring buffer (Linux 5.8+ or a backport)"))
    elif facts.ringbuf is False:
        why = "bcc has no ring buffer API (bcc < 0.16)" if not facts.bcc_has_ringbuf_api else "the kernel has none (before 5.8)"
        lines.append(CheckLine("ring buffer", "degraded", f"{why}: samples go through a perf buffer (counts unchanged)"))
    else:
        lines.append(CheckLine("ring buffer", "degraded", "could not probe (no permission or no bcc): a perf buffer is used"))
    if facts.jiffies64:
        lines.append(CheckLine("bpf_jiffies64", "ok", "present: repeated retransmits of a flow skip the clock"))
    else:
        state = "absent (before 5.5)" if facts.jiffies64 is False else "could not probe"
        lines.append(CheckLine("bpf_jiffies64", "degraded", f"{state}: the clock is read for every event (counts unchanged)"))
    if facts.misses_counted:
        lines.append(CheckLine("missed events", "ok", "the kernel counts tracepoint hits it skipped (recursion_misses)"))
    else:
        lines.append(CheckLine("missed events", "degraded", "the kernel does not count tracepoint hits it skipped "
                               "(before 6.7): missedEvents is reported as unknown"))
    if not facts.btf_problem:
        lines.append(CheckLine("retransmit causes", "ok", f"socket offsets resolved from {BTF_PATH}: "
                               "timeout / fast / probe per retransmit, srtt and cwnd per flow"
                               + (f"; no retransmit ratio per flow ({facts.segs_problem})" if facts.segs_problem
                                  else ", and its connection's segments sent and retransmitted")))
    else:
        lines.append(CheckLine("retransmit causes", "degraded", f"unknown ({facts.btf_problem}); counts unchanged",
                               "a kernel with BTF (CONFIG_DEBUG_INFO_BTF: RHEL 8.2+, RHCOS, Ubuntu 20.10+, Debian 11+, "
                               "Amazon Linux 2 5.10, COS, Bottlerocket) and /sys/kernel/btf mounted into the agent"))
    lines.append(drops_line(facts.drops_problem))
    lines.append(socket_owners_line(facts.cgroup_root, facts.cgroup_problem))
    if facts.headers:
        lines.append(CheckLine("kernel headers", "ok", facts.headers))
    else:
        lines.append(CheckLine("kernel headers", "fail", f"none for {facts.release}",
                               f"install linux-headers-{facts.release} (Debian/Ubuntu) or kernel-devel (RHEL), "
                               "'modprobe kheaders', or set BCC_KERNEL_SOURCE (the image carries generic headers)"))
    if facts.bcc_version:
        lines.append(CheckLine("bcc", "ok", f"python module bcc {facts.bcc_version}"))
    else:
        lines.append(CheckLine("bcc", "fail", "python module bcc is missing",
                               "install python3-bpfcc (Debian/Ubuntu) or python3-bcc (RHEL)"))
    lines.append(mode_line(facts, ok=not any(line.status == "fail" for line in lines)))
    return lines


def drops_line(problem: str) -> CheckLine:
    """Whether the agent counts the traced flows' dropped TCP packets by reason (beside the
    retransmits; spec.drops: false turns them off per trace)."""
    if not problem:
        return CheckLine("drop reasons", "ok", "skb:kfree_skb has `reason` and BTF gives sk_buff's offsets: "
                         "TCP drops of the traced flows counted per flow and reason")
    return CheckLine("drop reasons", "degraded", f"off: {problem}; retransmits counted as before",
                     f"Linux {REASON_SINCE}+ (its skb:kfree_skb has `reason`) with BTF tells which box dropped "
                     "a retransmitting flow's packets")


SOCKET_OWNERS = "socket owners"


def socket_owners_line(root: str, problem: str) -> CheckLine:
    """How the agent tells who owns a local socket (NodeStatus.socketOwners): by its cgroup, or
    by its address alone, and why."""
    if not problem:
        return CheckLine(SOCKET_OWNERS, "ok", f"cgroup: from each socket's cgroup v2 id, read in the kernel once per "
                         f"new flow, named from {root}: hostNetwork pods as pods, node processes by systemd unit")
    return CheckLine(SOCKET_OWNERS, "degraded", f"address: by local address only ({problem}); hostNetwork pods and "
                     "node processes count as the node, and namespaces/podSelector cannot select hostNetwork pods",
                     "mount the host's cgroup v2 hierarchy (/sys/fs/cgroup, or its unified/ on hybrid hosts) into "
                     "the agent, on a kernel with BTF (Linux 5.5+)")


def mode_line(facts: HostFacts, ok: bool) -> CheckLine:
    if not ok:
        return CheckLine("mode", "fail", "the agent cannot count on this node", "fix the lines marked FAIL")
    has = facts.layout.has if facts.layout else (lambda _name: False)
    parts = ["exact per-flow counts (IPv4, IPv6, dual-stack as IPv4)",
             "by TCP state" if has("state") else "state UNKNOWN",
             "causes from BTF" if not facts.btf_problem else "causes unknown",
             "failed attempts reported" if has("err") else "no failed attempts (kernel does not report them)",
             "ring buffer" if facts.ringbuf else "perf buffer"]
    return CheckLine("mode", "ok", "; ".join(parts))


def can_count(lines: list[CheckLine]) -> bool:
    return not any(line.status == "fail" for line in lines)
