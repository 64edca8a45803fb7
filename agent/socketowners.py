"""How this node tells who owns a local socket: by its cgroup (cgroup v2 + BTF), else by address.

    owners = SocketOwners.find()                 # the host's cgroup2 root, or why there is none
    program = RetransmitProgram.open(config, cgroups=owners.available)
    owners.settle(program)                       # the program may not read cgroups (no BTF layout)
    owners.mode                                  # "cgroup" or "address" (NodeStatus.socketOwners)
    owners.named(ids, index.uid_table(), node)   # {cgroup id: Owner, or None for a pod not known yet}
    owners.selected_cgroups(index, selection)    # hostNetwork pods' cgroups for the kernel filter

With cgroups, a hostNetwork pod's socket is named as that pod (its cgroup's path carries the
pod's UID), a node process's by its systemd unit; without, both are the node (address rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from retransmit_core.podindex import Owner, PodIndex

from .cgroups import CgroupNames, find_cgroup2
from .podselection import PodSelection

CGROUP, ADDRESS = "cgroup", "address"   # NodeStatus.socketOwners


@dataclass
class SocketOwners:
    """The node's way of naming sockets; `names` None means address rules (`problem` says why)."""

    names: Optional[CgroupNames] = None
    problem: str = ""

    @classmethod
    def find(cls, candidates: Optional[Iterable[str]] = None) -> "SocketOwners":
        root, problem = find_cgroup2(*([candidates] if candidates is not None else []))
        if root is None:
            return cls(problem=problem)
        names = CgroupNames(root)
        names.refresh()
        return cls(names=names)

    @property
    def available(self) -> bool:
        return self.names is not None

    @property
    def mode(self) -> str:
        return CGROUP if self.names is not None else ADDRESS

    @property
    def root(self) -> Optional[Path]:
        return self.names.root if self.names is not None else None

    def settle(self, program: Any) -> None:
        """Address rules when the program does not read sockets' cgroups (no BTF, or a layout
        it cannot read: features.cgroup_problem says which)."""
        if self.names is not None and not program.reads_cgroups:
            self.names = None
            self.problem = f"the kernel program reads no socket cgroups ({program.features.cgroup_problem})"

    def named(self, ids: Iterable[int], pods_by_uid: Mapping[str, Owner], node: str) -> dict[int, Optional[Owner]]:
        """The owner of each cgroup id in `ids` that names one: a pod of `pods_by_uid` (None
        when its UID names a pod not in it yet), a unit of `node`. Ids naming nothing (the root
        cgroup, a bare slice, unknown) are left out: address rules apply to them."""
        if self.names is None:
            return {}
        ids = {i for i in ids if i}
        self.names.refresh_if_unknown(ids)
        out: dict[int, Optional[Owner]] = {}
        for cgroup in ids:
            owner = self.names.owner(cgroup)
            if owner is None:
                continue
            if owner.pod_uid:
                out[cgroup] = pods_by_uid.get(owner.pod_uid)
            elif owner.unit:
                out[cgroup] = Owner(node=node, unit=owner.unit)
        return out

    def selected_cgroups(self, index: PodIndex, selection: PodSelection) -> Optional[frozenset[int]]:
        """The cgroup ids of the selected hostNetwork pods (their pod and container cgroups, as
        the hierarchy holds them now); None without cgroups (address rules: such pods are
        never selected)."""
        if self.names is None:
            return None
        uids = [pod.uid for pod in index.pods if pod.host_network and selection.matches(pod)]
        if uids:
            self.names.refresh()   # their containers may be new
        return self.names.ids_of_pods(uids)
