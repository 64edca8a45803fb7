"""What a real node (tests/harness/realnode.py) may change on this host, recorded before it
starts so teardown can undo it, and compared before/after by the tests.

kubelet and containerd 1.6 write some of these whatever their configuration says: kubelet
sets kernel sysctls (vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops,
kernel.keys.root_max*), creates /var/lib/kubelet and /var/log/containers and the kubepods
cgroups under every cgroup v1 hierarchy; containerd creates /run/containerd, /var/lib/cni
and /opt/containerd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

# What kubelet sets (restored at teardown).
KUBELET_SYSCTLS = (
    "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
)
# Compared, never restored: the CNI bridge plugin turns forwarding on when it is the gateway
# (it is not here), and other work on this host may change them meanwhile.
SYSCTLS = KUBELET_SYSCTLS + ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
HOST_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/containerd",
              "/var/lib/containerd", "/var/lib/cni", "/opt/containerd", "/run/kubernetes")
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBEPODS = "kubepods"
# Names the CNI bridge plugin gives the host ends of pod links.
CNI_LINK = re.compile(r"^veth[0-9a-f]{8}$")


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    out = {}
    for name in SYSCTLS:
        try:
            out[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            pass
    return out


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value + "\n")


def kubepods_cgroups() -> list[str]:
    """Every kubepods cgroup directory (any depth), per hierarchy."""
    found = []
    # cgroup v1: one hierarchy per folder of /sys/fs/cgroup; v2: /sys/fs/cgroup is the root.
    tops = [CGROUP_ROOT / KUBEPODS] + [h / KUBEPODS for h in (sorted(CGROUP_ROOT.iterdir()) if CGROUP_ROOT.is_dir() else [])]
    for top in tops:
        if top.is_dir():
            found += [str(Path(d)) for d, _dirs, _files in os.walk(top)]
    return sorted(set(found))


def links(pattern: re.Pattern) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [m.group(1).split("@")[0] for m in re.finditer(r"^\d+: ([^:]+):", out, re.M)]
    return sorted(n for n in names if pattern.match(n))


def mounts_under(prefixes: tuple[str, ...]) -> list[str]:
    """Mount points (this process's mount namespace: the host's) under any of `prefixes`."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
                found.append(point)
    return sorted(found)


def processes_matching(words: tuple[str, ...]) -> list[str]:
    """`pid cmdline` of processes whose command line contains any of `words`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd and any(w in cmd for w in words):
            found.append(f"{entry.name} {cmd[:200]}")
    return sorted(found)


def pids_in_kubepods() -> list[int]:
    pids: set[int] = set()
    for d in kubepods_cgroups():
        try:
            pids.update(int(p) for p in Path(d, "cgroup.procs").read_text().split())
        except OSError:
            pass
    return sorted(pids)


@dataclass
class HostState:
    """The host as far as a real node touches it."""

    sysctls: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)          # which HOST_PATHS exist
    cgroups: list[str] = field(default_factory=list)        # kubepods cgroup dirs
    links: list[str] = field(default_factory=list)          # bridge + CNI veths
    mounts: list[str] = field(default_factory=list)         # host mounts under the node's paths
    processes: list[str] = field(default_factory=list)      # containerd, shims, kubelet, pods
    netns: list[str] = field(default_factory=list)          # `ip netns` names containerd would use

    @classmethod
    def capture(cls, state_dir: Path, bridge_pattern: re.Pattern) -> "HostState":
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return cls(
            sysctls=read_sysctls(),
            paths=sorted(p for p in HOST_PATHS if os.path.lexists(p)),
            cgroups=kubepods_cgroups(),
            links=links(re.compile(f"{bridge_pattern.pattern}|{CNI_LINK.pattern}")),
            mounts=mounts_under((str(state_dir), *HOST_PATHS)),
            processes=processes_matching((str(state_dir), "containerd-shim", "/kubelet ")) +
            [f"{pid} (in a kubepods cgroup)" for pid in pids_in_kubepods()],
            netns=sorted(n.split()[0] for n in netns.splitlines() if n.startswith("cni-")),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "HostState":
        return cls(**json.loads(path.read_text()))

    def differences(self, other: "HostState") -> dict[str, tuple]:
        """Fields that differ: name -> (self's, other's)."""
        a, b = asdict(self), asdict(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def restore(before: HostState, log=print) -> None:
    """Undo what a real node left on the host, relative to `before`: kubelet's sysctls back, kubepods
    cgroups it made removed (deepest first; they must be empty by then), host paths it made
    deleted. Processes and links are the caller's (by pid and by name)."""
    now = read_sysctls()
    for name, value in before.sysctls.items():
        if name in KUBELET_SYSCTLS and now.get(name) != value:
            log(f"restoring {name}: {now.get(name)} -> {value}")
            write_sysctl(name, value)
    keep = set(before.cgroups)
    for d in sorted(kubepods_cgroups(), key=lambda p: p.count("/"), reverse=True):
        if d not in keep:
            try:
                os.rmdir(d)
            except OSError as e:
                log(f"cannot remove cgroup {d}: {e}")
    for p in HOST_PATHS:
        if p not in before.paths and os.path.lexists(p):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
