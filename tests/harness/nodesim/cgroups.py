"""The node simulator's pod cgroups, as kubelet's cgroupfs driver lays them out, in the host's
cgroup v2 hierarchy (its unified/ directory on hybrid hosts):

    <cgroup2>/rtrace-nodesim-<id>/<node>/kubepods/<qos>/pod<uid>/<container>

Each container's process joins its directory before it runs (a shell prefix writes its pid to
cgroup.procs, then execs the command), so its sockets carry the pod's cgroup as a real node's
would; `exec_prefix` does the same for a process a test runs "in" a container (kubectl exec).
Everything is removed when the pod ends and when the simulator stops. No cgroup v2 on the
host: no cgroups, the pods run as before.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Optional

from retransmit_agent.cgroups import find_cgroup2

HOST_CGROUP2 = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def qos_class(pod: dict) -> str:
    """The pod's QoS class as kubelet derives it from its containers' resources."""
    containers = pod["spec"].get("containers") or []
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all((r.get("limits") or {}).get(k) and (r.get("requests") or r.get("limits") or {}).get(k)
                     == (r.get("limits") or {}).get(k) for r in resources for k in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"


def remove_tree(top: Path, root: Path) -> None:
    """rmdir `top` and every cgroup below it, deepest first; processes still in one (strays)
    move to `root` first."""
    if not top.is_dir():
        return
    folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]
    for folder in folders:
        with contextlib.suppress(OSError):
            for pid in (folder / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            folder.rmdir()


class SimCgroups:
    """One simulator's cgroups (None from create() when the host has no cgroup v2)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top = root / f"rtrace-nodesim-{uuid.uuid4().hex[:8]}"
        self.top.mkdir()

    @classmethod
    def create(cls) -> Optional["SimCgroups"]:
        root, _problem = find_cgroup2(HOST_CGROUP2)
        return cls(root) if root is not None else None

    def pod_dir(self, node: str, pod: dict) -> Path:
        qos = qos_class(pod)
        kubepods = self.top / node / "kubepods"
        parent = kubepods if qos == "Guaranteed" else kubepods / qos.lower()
        return parent / f"pod{pod['metadata']['uid']}"

    def container_dir(self, node: str, pod: dict, container: str) -> Path:
        folder = self.pod_dir(node, pod) / container
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def exec_prefix(folder: Path) -> list[str]:
        """argv prefix: join `folder`'s cgroup, then exec the rest."""
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(folder / "cgroup.procs")]

    def remove_pod(self, node: str, pod: dict) -> None:
        remove_tree(self.pod_dir(node, pod), self.root)

    def remove(self) -> None:
        remove_tree(self.top, self.root)
