"""Who a socket's cgroup belongs to: a pod (by UID) or a systemd unit of the node.

The kernel program stores each new flow's socket cgroup v2 id (kernfs_node.id, which on
64-bit kernels since 5.5 is the inode number of the cgroup's directory in any cgroup2 mount
of the host). The agent finds the directory by walking the host's cgroup2 hierarchy
(mounted read-only into its pod) and names it from its path:

- kubelet's cgroupfs driver: `.../kubepods/<qos>/pod<uid>/<container>` (QoS besteffort or
  burstable; a Guaranteed pod sits right under kubepods: `kubepods/pod<uid>/...`);
- kubelet's systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid
  with _ for ->.slice/cri-containerd-<id>.scope` (Guaranteed: `kubepods-pod<uid>.slice`);
- anything else under a systemd unit: the nearest `.service` (or `.scope`) on the path, e.g.
  `system.slice/kubelet.service` -> kubelet.service.

`parse_cgroup_path` is pure; `CgroupNames` does the walking (I/O) and remembers ids.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from retransmit_core.contract import HOST_CGROUP_MOUNT

# Where the agent looks for the host's cgroup2 hierarchy: the DaemonSet's read-only mount of
# the host's /sys/fs/cgroup (its unified/ directory on hybrid hosts), else the agent's own
# view when it shares the host's (a host process, `retransmit-agent local`).
CGROUP2_CANDIDATES = (HOST_CGROUP_MOUNT, f"{HOST_CGROUP_MOUNT}/unified", "/sys/fs/cgroup", "/sys/fs/cgroup/unified")
ROOT_CGROUP_ID = 1      # the root cgroup's kernfs id: a mount whose top has it is the whole hierarchy

_UID = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"
_CGROUPFS_POD = re.compile(rf"^pod({_UID})$")
_SYSTEMD_POD = re.compile(rf"^kubepods(?:-(?:besteffort|burstable|guaranteed))?-pod({_UID})\.slice$")
_UNIT = re.compile(r"^[^/]+\.(?:service|scope)$")


@dataclass(frozen=True)
class CgroupOwner:
    """A cgroup's owner: a pod's UID, or a systemd unit's name (one of them)."""

    pod_uid: Optional[str] = None
    unit: Optional[str] = None


def parse_cgroup_path(path: str) -> Optional[CgroupOwner]:
    """The owner named by a cgroup's path (relative to the cgroup2 root, with or without a
    leading /), None when it names neither a pod nor a unit (the root, a bare slice).

    A path under kubepods is a pod's whenever a segment carries its UID (a pod's cgroup and
    its containers'), else no one's (kubepods itself, a QoS class); units only outside it."""
    parts = [p for p in path.split("/") if p]
    in_kubepods = False
    for part in parts:
        if part in ("kubepods", "kubepods.slice") or part.startswith("kubepods-"):
            in_kubepods = True
        match = _CGROUPFS_POD.match(part) if in_kubepods else None
        match = match or _SYSTEMD_POD.match(part)
        if match:
            return CgroupOwner(pod_uid=match.group(1).replace("_", "-").lower())
    if in_kubepods:
        return None
    units = [part for part in parts if _UNIT.match(part)]
    return CgroupOwner(unit=units[-1]) if units else None


def find_cgroup2(candidates: Iterable[str] = CGROUP2_CANDIDATES) -> tuple[Optional[Path], str]:
    """(the host's cgroup2 root, "") or (None, why not). A candidate qualifies when it is a
    cgroup2 directory (it has cgroup.controllers) whose inode is the root cgroup's id: a
    container's own cgroup namespace view, or a v1 hierarchy, does not."""
    seen = []
    for text in candidates:
        path = Path(text)
        try:
            if not (path / "cgroup.controllers").is_file():
                seen.append(f"{text}: no cgroup2")
                continue
            inode = os.stat(path).st_ino
        except OSError as e:
            seen.append(f"{text}: {e.strerror or e}")
            continue
        if inode == ROOT_CGROUP_ID:
            return path, ""
        seen.append(f"{text}: a cgroup2 subtree (inode {inode}), not the host's root")
    return None, "no host cgroup2 hierarchy (" + "; ".join(seen) + ")"


def walk_cgroups(root: Path, limit: int = 200_000) -> dict[int, str]:
    """{cgroup id (directory inode): path relative to `root`} for every cgroup below `root`."""
    found: dict[int, str] = {}
    stack = [(root, "")]
    while stack and len(found) < limit:
        folder, relative = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = f"{relative}/{entry.name}"
                        try:
                            found[entry.inode()] = child
                        except OSError:
                            continue
                        stack.append((Path(entry.path), child))
        except OSError:
            continue   # removed while walking
    return found


class CgroupNames:
    """cgroup id -> CgroupOwner for one host's cgroup2 hierarchy. An id not seen yet makes the
    next `refresh_if_unknown` walk the hierarchy again (at most every `min_interval` seconds);
    ids stay known after their directory is gone (kernfs ids are not reused while the host
    runs), so a flow of a finished container keeps its name."""

    def __init__(self, root: Path, min_interval: float = 1.0) -> None:
        self.root = root
        self.min_interval = min_interval
        self._paths: dict[int, str] = {}
        self._walked_at: Optional[float] = None

    def refresh(self) -> None:
        self._paths.update(walk_cgroups(self.root))
        try:
            self._paths[os.stat(self.root).st_ino] = "/"   # the root cgroup: names nothing, but known
        except OSError:
            pass
        self._walked_at = time.monotonic()

    def refresh_if_unknown(self, ids: Iterable[int]) -> None:
        """Walk again when one of `ids` (0 = unknown: ignored) is not known and the last walk
        is older than min_interval."""
        if any(i and i not in self._paths for i in ids):
            if self._walked_at is None or time.monotonic() - self._walked_at >= self.min_interval:
                self.refresh()

    def path(self, cgroup: int) -> Optional[str]:
        return self._paths.get(cgroup)

    def owner(self, cgroup: int) -> Optional[CgroupOwner]:
        path = self._paths.get(cgroup)
        return parse_cgroup_path(path) if path is not None else None

    def ids_of_pods(self, uids: Iterable[str]) -> frozenset[int]:
        """Every known cgroup of these pods (their pod cgroups and all their containers')."""
        wanted = {u.lower() for u in uids}
        if not wanted:
            return frozenset()
        return frozenset(i for i, path in self._paths.items()
                         if (o := parse_cgroup_path(path)) is not None and o.pod_uid in wanted)
