"""Sockets named by their cgroup, read in the kernel: real processes placed in cgroups of the
host's cgroup v2 hierarchy (a kubepods-like pod cgroup and a system.slice-like unit, made
under the unified hierarchy and removed at teardown), real loss on their connections, counts
against the reference counter.

Both loads use the same two addresses of a private LossNamespace, as a hostNetwork pod and a
node process share the node's: only the socket's cgroup tells them apart.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from retransmit_agent.cgroups import CgroupNames, find_cgroup2
from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from retransmit_agent.kernelinfo import resolve_cgroup_offsets
from retransmit_agent.nodeentry import NodeFacts, node_entry
from retransmit_agent.socketowners import SocketOwners
from retransmit_core.podindex import PodIndex
from tests.harness import loads
from tests.harness.netns import LossNamespace, unique_suffix
from tests.harness.refcount import succeeded

pytestmark = pytest.mark.kernel

POD_PORT, UNIT_PORT = 5101, 5102
NODE = "node-k"


class OwnedCgroups:
    """A pod-like and a unit-like cgroup under the host's cgroup2 root, removed at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top = root / f"rtrace-test-{unique_suffix()}"
        self.uid = str(uuid.uuid4())
        self.pod = self.top / "kubepods" / "besteffort" / f"pod{self.uid}"
        self.container = self.pod / "main"
        self.unit = self.top / "system.slice" / "rtrace-probe.service"
        self.container.mkdir(parents=True)
        self.unit.mkdir(parents=True)

    @staticmethod
    def id_of(path: Path) -> int:
        return os.stat(path).st_ino

    def remove(self) -> None:
        for folder in sorted((p for p in self.top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [self.top]:
            for pid in (folder / "cgroup.procs").read_text().split():   # strays back to the root
                (self.root / "cgroup.procs").write_text(pid)
            folder.rmdir()


@pytest.fixture
def cgroups():
    root, problem = find_cgroup2()
    assert root is not None, f"these tests need the host's cgroup v2 hierarchy: {problem}"
    made = OwnedCgroups(root)
    try:
        yield made
    finally:
        made.remove()


def lossy_load_in(ns: LossNamespace, cgroup: Path, port: int, family: str = "IPv4") -> None:
    """A lossy duplex load whose sockets all carry `cgroup`."""
    loads.bulk(ns, loss=10, family=family, port=port, connections=3, nbytes=512 << 10, cgroup=cgroup)


def by_port(counts: Counter, own: set[str], port: int) -> dict[tuple, int]:
    """Reference retransmits (skb + SYN-ACK) per flow of the load on `port` (either end)."""
    out: Counter = Counter()
    for e, n in counts.items():
        if e.remote_ip in own and succeeded(e) and port in (e.local_port, e.remote_port):
            out[(e.family, e.local_ip, e.local_port, e.remote_ip, e.remote_port)] += n
    return dict(out)


def test_this_kernels_btf_gives_a_readable_cgroup_layout():
    """The running kernel's own BTF (the kernel layer's hosts have it) yields the offsets."""
    offsets, problem = resolve_cgroup_offsets("/sys/kernel/btf/vmlinux")
    assert problem == "" and offsets.kernfs_node_id > 0


def test_flows_carry_their_sockets_cgroup_and_the_agent_names_the_pod_and_the_unit(ns, reference, cgroups):
    own = loads.own_addresses(ns)
    before = reference.read()
    with RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        assert program.reads_cgroups, program.features.cgroup_problem
        lossy_load_in(ns, cgroups.container, POD_PORT)
        lossy_load_in(ns, cgroups.unit, UNIT_PORT, family="IPv6")
        counts = reference.read() - before
        snapshot = program.snapshot()
    pod_flows, unit_flows = by_port(counts, own, POD_PORT), by_port(counts, own, UNIT_PORT)
    assert sum(pod_flows.values()) > 20 and sum(unit_flows.values()) > 20

    # Every flow carries the cgroup its process was in when it made the socket.
    pod_id, unit_id = cgroups.id_of(cgroups.container), cgroups.id_of(cgroups.unit)
    mine = {f.key: f for f in snapshot.flow_counters if f.remote_ip in own}
    assert {k: f.total for k, f in mine.items()} == {**pod_flows, **unit_flows}
    assert {f.cgroup for k, f in mine.items() if k in pod_flows} == {pod_id}
    assert {f.cgroup for k, f in mine.items() if k in unit_flows} == {unit_id}
    # The per-owner counts split each address by cgroup, exactly.
    per_owner = {k: n for k, n in snapshot.by_local_owner.items() if k[0] in own}
    want = Counter()
    for (_f, local_ip, _lp, _rip, _rp), n in pod_flows.items():
        want[(local_ip, pod_id)] += n
    for (_f, local_ip, _lp, _rip, _rp), n in unit_flows.items():
        want[(local_ip, unit_id)] += n
    assert per_owner == dict(want)

    # The agent's step: the addresses are the node's (as for a hostNetwork pod), the cgroups
    # name a pod of this node and a unit.
    index = PodIndex(NODE, own)
    index.observe({"metadata": {"name": "ingress", "namespace": "edge", "uid": cgroups.uid},
                   "spec": {"nodeName": NODE, "hostNetwork": True},
                   "status": {"phase": "Running", "podIP": ns.v4[0], "hostIP": ns.v4[0]}})
    owners = SocketOwners(names=CgroupNames(cgroups.root))
    named = owners.named({f.cgroup for f in snapshot.flow_counters} | {cg for _ip, cg in snapshot.by_local_owner},
                         index.uid_table(), NODE)
    step = node_entry(snapshot, NodeFacts(node=NODE, socket_owners=owners.mode), top_flows=0, keep_events=0,
                      now=datetime.now(timezone.utc), owners=index.lookup_table(), cgroup_owners=named)
    flows = [f for f in step.entry.top_flows if f.remote.ip in own]
    assert {(f.local.pod, f.local.namespace, f.local.unit) for f in flows if f.local.port == POD_PORT
            or f.remote.port == POD_PORT} == {("ingress", "edge", None)}
    assert {(f.local.pod, f.local.node, f.local.unit) for f in flows if f.local.port == UNIT_PORT
            or f.remote.port == UNIT_PORT} == {(None, NODE, "rtrace-probe.service")}
    # Per-pod totals: exactly the pod's retransmits; the unit's are no pod's.
    assert {(p.namespace, p.pod): p.retransmits for p in step.entry.top_pods} == {
        ("edge", "ingress"): sum(pod_flows.values())}
    assert step.entry.socket_owners == "cgroup"


def test_the_cgroup_filter_counts_exactly_the_selected_cgroups_retransmits(ns, reference, cgroups):
    own = loads.own_addresses(ns)
    before = reference.read()
    # The namespace's addresses are node addresses: only sockets of the selected cgroup pass.
    with RetransmitProgram.open(KernelConfig(local_ips=frozenset())) as program:
        program.set_local_ips([], node_ips=own, cgroups=[cgroups.id_of(cgroups.pod), cgroups.id_of(cgroups.container)])
        lossy_load_in(ns, cgroups.container, POD_PORT)
        lossy_load_in(ns, cgroups.unit, UNIT_PORT)
        counts = reference.read() - before
        snapshot = program.snapshot()
    pod_flows, unit_flows = by_port(counts, own, POD_PORT), by_port(counts, own, UNIT_PORT)
    assert sum(pod_flows.values()) > 20 and sum(unit_flows.values()) > 20
    assert {f.key: f.total for f in snapshot.flow_counters} == pod_flows
    assert snapshot.retransmits + snapshot.synack_retransmits == sum(pod_flows.values())
