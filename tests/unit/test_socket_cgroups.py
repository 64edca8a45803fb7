"""Naming a socket's owner from its cgroup: the path parser (kubelet's cgroupfs and systemd
drivers, QoS classes, systemd units, unknown paths), the BTF layout the kernel program reads
the cgroup through (blobs built here in the documented BTF format), and the agent's rules for
which name wins."""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.btf import KIND_INT, KIND_PTR, KIND_STRUCT, KIND_UNION, Btf
from retransmit_agent.cgroups import CgroupNames, CgroupOwner, find_cgroup2, parse_cgroup_path, walk_cgroups
from retransmit_agent.check import socket_owners_line
from retransmit_agent.flows import FlowCounters
from retransmit_agent.kernel import KernelSnapshot
from retransmit_agent.kernelinfo import CgroupOffsets, cgroup_offsets, resolve_cgroup_offsets
from retransmit_agent.nodeentry import NodeFacts, node_entry, socket_owner
from retransmit_agent.podselection import PodSelection
from retransmit_agent.resume import Baseline
from retransmit_agent.socketowners import SocketOwners
from retransmit_core.podindex import Owner, PodIndex

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
UNDERSCORED = UID.replace("-", "_")


# ---------------------------------------------------------------- the path parser

@pytest.mark.parametrize("path", [
    f"/kubepods/besteffort/pod{UID}/4c1d2e3f",              # cgroupfs, BestEffort, a container
    f"/kubepods/burstable/pod{UID}/4c1d2e3f",               # Burstable
    f"/kubepods/pod{UID}/4c1d2e3f",                         # Guaranteed: no QoS directory
    f"/kubepods/burstable/pod{UID}",                        # the pod's own cgroup
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UNDERSCORED}.slice/cri-containerd-4c1d.scope",
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice/cri-containerd-4c1d.scope",
    f"/kubepods.slice/kubepods-pod{UNDERSCORED}.slice/crio-4c1d.scope",      # systemd, Guaranteed
    f"/rtrace-sim-1/kubepods/besteffort/pod{UID}/main",     # nested under another root (--cgroup-root)
    f"kubepods/besteffort/pod{UID.upper()}/main",           # relative, upper-case hex
])
def test_a_kubepods_path_names_the_pod_by_uid_with_either_driver_and_any_qos(path):
    assert parse_cgroup_path(path) == CgroupOwner(pod_uid=UID)


@pytest.mark.parametrize("path, unit", [
    ("/system.slice/kubelet.service", "kubelet.service"),
    ("/system.slice/containerd.service", "containerd.service"),
    ("/system.slice/containerd.service/sub", "containerd.service"),
    ("/user.slice/user-0.slice/session-3.scope", "session-3.scope"),
    ("/system.slice/docker-4c1d.scope", "docker-4c1d.scope"),
])
def test_a_path_outside_kubepods_names_the_nearest_systemd_unit(path, unit):
    assert parse_cgroup_path(path) == CgroupOwner(unit=unit)


@pytest.mark.parametrize("path", [
    "/", "", "/kubepods", "/kubepods/besteffort", "/kubepods.slice/kubepods-burstable.slice",
    "/system.slice", "/user.slice/user-0.slice", "/process_api/05a46a1e", f"/pod{UID}/main",
    "/kubepods/besteffort/podnot-a-uid/main",
])
def test_a_path_that_names_no_pod_and_no_unit_names_nothing(path):
    assert parse_cgroup_path(path) is None


def test_a_pod_cgroup_under_kubepods_wins_over_a_unit_name_in_it():
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice/cri-containerd-1.scope"
    assert parse_cgroup_path(path).unit is None


# ---------------------------------------------------------------- the hierarchy walk

def test_walking_a_tree_maps_each_directory_inode_to_its_path_and_names_pods_and_units(tmp_path):
    pod = tmp_path / "kubepods" / "besteffort" / f"pod{UID}"
    (pod / "main").mkdir(parents=True)
    (tmp_path / "system.slice" / "kubelet.service").mkdir(parents=True)
    paths = walk_cgroups(tmp_path)
    assert paths[os.stat(pod / "main").st_ino] == f"/kubepods/besteffort/pod{UID}/main"
    names = CgroupNames(tmp_path)
    names.refresh()
    assert names.owner(os.stat(tmp_path / "system.slice" / "kubelet.service").st_ino) == CgroupOwner(unit="kubelet.service")
    assert names.ids_of_pods([UID]) == {os.stat(pod).st_ino, os.stat(pod / "main").st_ino}
    # A directory made later is found by the next walk an unknown id asks for.
    (pod / "sidecar").mkdir()
    names.min_interval = 0
    names.refresh_if_unknown([os.stat(pod / "sidecar").st_ino])
    assert names.owner(os.stat(pod / "sidecar").st_ino) == CgroupOwner(pod_uid=UID)


def test_only_a_cgroup2_root_counts_as_the_hosts_hierarchy(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cgroup.controllers").write_text("")
    root, problem = find_cgroup2([str(tmp_path / "v1"), str(tmp_path / "sub"), str(tmp_path / "absent")])
    assert root is None
    assert "v1: no cgroup2" in problem and "not the host's root" in problem and "absent" in problem


# ---------------------------------------------------------------- the BTF layout choice

class BtfBlob:
    """A little-endian BTF blob (Documentation/bpf/btf.rst) built type by type."""

    def __init__(self) -> None:
        self.types: list[bytes] = []
        self.strings = b"\0"

    def _name(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def _add(self, record: bytes) -> int:
        self.types.append(record)
        return len(self.types)

    def int(self, name: str, bits: int) -> int:
        return self._add(struct.pack("<III", self._name(name), KIND_INT << 24, bits // 8) + struct.pack("<I", bits))

    def ptr(self, target: int) -> int:
        return self._add(struct.pack("<III", 0, KIND_PTR << 24, target))

    def composite(self, kind: int, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        """members: (name, type id, bit offset)."""
        head = struct.pack("<III", self._name(name), kind << 24 | len(members), size)
        return self._add(head + b"".join(struct.pack("<III", self._name(n), t, off) for n, t, off in members))

    def bytes(self) -> bytes:
        body = b"".join(self.types)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(self.strings))
        return header + body + self.strings


def kernel_btf(new_cgroup_pointer: bool, u64_kernfs_id: bool) -> Btf:
    """The types the program reads, in the 5.15+ or the older sock_cgroup_data layout, with
    kernfs_node.id a u64 (5.5+) or a union (before)."""
    b = BtfBlob()
    u8, u32, u64 = b.int("u8", 8), b.int("u32", 32), b.int("u64", 64)
    kernfs_id = u64 if u64_kernfs_id else b.composite(KIND_UNION, "kernfs_node_id", 8, [("ino", u32, 0), ("id", u64, 0)])
    kernfs = b.composite(KIND_STRUCT, "kernfs_node", 128, [("count", u32, 0), ("id", kernfs_id, 96 * 8)])
    cgroup = b.composite(KIND_STRUCT, "cgroup", 512, [("flags", u64, 0), ("kn", b.ptr(kernfs), 256 * 8)])
    if new_cgroup_pointer:
        data = b.composite(KIND_STRUCT, "sock_cgroup_data", 16, [("cgroup", b.ptr(cgroup), 0), ("classid", u32, 64)])
    else:
        bits = b.composite(KIND_STRUCT, "", 8, [("padding", u8, 8), ("classid", u32, 32)])
        data = b.composite(KIND_STRUCT, "sock_cgroup_data", 8, [
            ("", b.composite(KIND_UNION, "", 8, [("", bits, 0), ("val", u64, 0)]), 0)])
    b.composite(KIND_STRUCT, "sock", 1024, [("sk_flags", u64, 0), ("sk_cgrp_data", data, 600 * 8)])
    return Btf(b.bytes())


def test_a_5_15_kernel_reads_the_cgroup_pointer():
    assert cgroup_offsets(kernel_btf(True, True)) == (CgroupOffsets(600, 256, 96, val_layout=False), "")


def test_an_older_kernel_reads_the_val_word_and_checks_its_low_bits():
    offsets, problem = cgroup_offsets(kernel_btf(False, True))
    assert (offsets, problem) == (CgroupOffsets(600, 256, 96, val_layout=True), "")
    assert "-DSOCK_CGROUP_VAL" in offsets.switches() and "-DSOCK_CGROUP=600" in offsets.switches()
    assert "-DSOCK_CGROUP_VAL" not in CgroupOffsets(600, 256, 96).switches()


def test_a_kernel_before_5_5_falls_back_and_says_why():
    offsets, problem = cgroup_offsets(kernel_btf(True, False))
    assert offsets is None and "kernfs_node.id is not a u64" in problem and "5.5" in problem


def test_no_btf_falls_back_and_says_why(tmp_path):
    offsets, problem = resolve_cgroup_offsets(str(tmp_path / "vmlinux"))
    assert offsets is None and "vmlinux" in problem
    assert resolve_cgroup_offsets(None) == (None, "BTF disabled")


# ---------------------------------------------------------------- which name wins

NODE = "node-a"
POD_OWNER = Owner(pod="web", namespace="shop")


def test_a_pods_own_address_wins_then_the_cgroup_then_the_address_rules():
    owners = {"198.18.0.5": POD_OWNER, "198.18.9.1": Owner(node=NODE)}
    cgroups = {11: Owner(pod="ingress", namespace="edge"), 12: Owner(node=NODE, unit="kubelet.service"), 13: None}
    assert socket_owner(owners.get, cgroups, "198.18.0.5", 11) == POD_OWNER
    assert socket_owner(owners.get, cgroups, "198.18.9.1", 11) == Owner(pod="ingress", namespace="edge")
    assert socket_owner(owners.get, cgroups, "198.18.9.1", 12) == Owner(node=NODE, unit="kubelet.service")
    assert socket_owner(owners.get, cgroups, "198.18.9.1", 99) == Owner(node=NODE)   # names nothing known
    assert socket_owner(owners.get, cgroups, "198.18.9.1", 0) == Owner(node=NODE)    # no cgroup read
    # A pod the index does not know yet: named by address, its per-pod count waits for it.
    assert socket_owner(owners.get, cgroups, "198.18.9.1", 13) == Owner(node=NODE)
    assert socket_owner(owners.get, cgroups, "198.18.9.1", 13, waiting=True) is None


def pod(name: str, uid: str, host_network: bool, namespace: str = "edge") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"nodeName": NODE, "hostNetwork": host_network},
            "status": {"phase": "Running", "podIP": "198.18.9.1" if host_network else "198.18.0.7",
                       "hostIP": "198.18.9.1"}}


def test_socket_owners_name_pods_by_uid_units_by_node_and_select_host_network_pods_cgroups(tmp_path):
    other = "11111111-2222-3333-4444-555555555555"
    (tmp_path / "kubepods" / f"pod{UID}" / "main").mkdir(parents=True)
    (tmp_path / "kubepods" / f"pod{other}" / "main").mkdir(parents=True)
    (tmp_path / "system.slice" / "kubelet.service").mkdir(parents=True)
    owners = SocketOwners(names=CgroupNames(tmp_path))
    owners.names.refresh()
    index = PodIndex(NODE, ["198.18.9.1"])
    index.observe(pod("ingress", UID, host_network=True))
    index.observe(pod("web", other, host_network=False, namespace="shop"))
    ino = lambda *parts: os.stat(tmp_path.joinpath(*parts)).st_ino  # noqa: E731
    named = owners.named([ino("kubepods", f"pod{UID}", "main"), ino("system.slice", "kubelet.service"), 0],
                         index.uid_table(), NODE)
    assert named == {ino("kubepods", f"pod{UID}", "main"): Owner(pod="ingress", namespace="edge"),
                     ino("system.slice", "kubelet.service"): Owner(node=NODE, unit="kubelet.service")}
    # Only hostNetwork pods' cgroups go into the kernel's cgroup filter (the others have addresses).
    assert owners.selected_cgroups(index, PodSelection(frozenset({"edge", "shop"}))) == {
        ino("kubepods", f"pod{UID}"), ino("kubepods", f"pod{UID}", "main")}
    assert owners.selected_cgroups(index, PodSelection(frozenset({"shop"}))) == frozenset()
    assert SocketOwners(problem="none").selected_cgroups(index, PodSelection(frozenset({"edge"}))) is None


def test_the_check_says_how_sockets_are_named_and_why_not_by_cgroup():
    ok = socket_owners_line("/sys/fs/cgroup/unified", "")
    assert ok.status == "ok" and "hostNetwork pods as pods" in ok.detail
    degraded = socket_owners_line("", "no host cgroup2 hierarchy (/sys/fs/cgroup: no cgroup2)")
    assert degraded.status == "degraded" and degraded.detail.startswith("address: ")
    assert "no host cgroup2 hierarchy" in degraded.detail and "cgroup v2" in degraded.fix


# ---------------------------------------------------------------- the agent's step

def test_a_resumed_flow_keeps_the_name_its_cgroup_gave_and_a_new_pods_count_waits_for_its_pod():
    index = PodIndex(NODE, ["198.18.9.1"])
    index.observe(pod("ingress", UID, host_network=True))
    flow = FlowCounters(family="IPv4", local_ip="198.18.9.1", local_port=40000, remote_ip="203.0.113.9",
                        remote_port=443, retransmits=7, synack_retransmits=0, last_state="ESTABLISHED",
                        first_seen=T0, last_seen=T0, cgroup=11)
    kernel = KernelSnapshot(retransmits=7, synack_retransmits=0, lost_events=0, sampled_events=0, failed_attempts=0,
                            missed_events=0, by_state={"ESTABLISHED": 7}, flow_counters=[flow],
                            by_local_address={"198.18.9.1": 12}, by_local_owner={("198.18.9.1", 11): 7,
                                                                                 ("198.18.9.1", 12): 5})
    facts = NodeFacts(node=NODE, socket_owners="cgroup")
    # cgroup 12 names a pod the index does not know yet: its 5 wait, not counted as the node's.
    step = node_entry(kernel, facts, top_flows=0, keep_events=0, now=T0, owners=index.lookup_table(),
                      cgroup_owners={11: Owner(pod="ingress", namespace="edge"), 12: None})
    assert [(f.local.pod, f.local.namespace) for f in step.entry.top_flows] == [("ingress", "edge")]
    assert {(p.namespace, p.pod): p.retransmits for p in step.entry.top_pods} == {("edge", "ingress"): 7}
    assert step.entry.socket_owners == "cgroup"
    later = node_entry(kernel, facts, top_flows=0, keep_events=0, now=T0 + timedelta(seconds=10),
                       owners=index.lookup_table(), previous_pods=step.pod_totals,
                       cgroup_owners={11: Owner(pod="ingress", namespace="edge"), 12: Owner(pod="late", namespace="edge")})
    assert {(p.namespace, p.pod): p.retransmits for p in later.entry.top_pods} == {
        ("edge", "ingress"): 7, ("edge", "late"): 5}
    # A restarted agent: the flow is only in its report (no cgroup in the kernel any more) and
    # keeps the pod's name rather than turning into the node's address.
    resumed = node_entry(replace(kernel, flow_counters=[], by_local_owner={}, by_local_address={}), facts,
                         top_flows=0, keep_events=0, now=T0 + timedelta(seconds=20), owners=index.lookup_table(),
                         baseline=Baseline.from_entry(step.entry), cgroup_owners={})
    assert [(f.local.pod, f.local.namespace) for f in resumed.entry.top_flows] == [("ingress", "edge")]
