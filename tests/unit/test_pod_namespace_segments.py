"""Per-pod segment counters: finding a pod's network namespace by its addresses, when its
count starts, and what a replaced namespace adds (retransmit_agent.podsegments).

The reader runs here on a /proc-shaped tree: pids are folders, and two pids in one network
namespace share their net/snmp by a hard link, so its inode names the namespace as the
kernel's does (tests/kernel/test_pod_ratio.py reads the real /proc)."""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from retransmit_agent.podsegments import (
    ZERO,
    PodNamespace,
    PodSegmentReader,
    created_after,
    found_namespace,
    match_namespaces,
)
from retransmit_agent.segments import TcpSegments
from retransmit_core.podindex import PodFacts

START = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
BEFORE = "2026-01-01T11:59:00Z"
AFTER = "2026-01-01T12:00:05Z"


def test_a_namespace_is_a_pods_when_it_holds_every_one_of_its_addresses_and_no_other_pod_fits_it():
    addresses = {1: frozenset({"198.18.0.5", "fd00::5", "127.0.0.1"}), 2: frozenset({"198.18.0.6"}),
                 3: frozenset({"198.18.0.7", "fd00::7"}), 4: frozenset({"198.18.0.7", "fd00::7"}),
                 5: frozenset({"198.18.0.8", "198.18.0.9"})}
    pods = {("a", "web"): ("198.18.0.5", "fd00::5"),
            ("a", "half"): ("198.18.0.6", "fd00::6"),   # its IPv6 address is in no namespace
            ("a", "twice"): ("198.18.0.7", "fd00::7"),  # two namespaces hold its addresses
            ("a", "one"): ("198.18.0.8",), ("a", "other"): ("198.18.0.9",),   # one namespace fits both
            ("a", "none"): ()}
    assert match_namespaces(pods, addresses) == {("a", "web"): 1}


def test_a_pod_counts_from_its_first_read_unless_its_namespace_was_born_during_the_count():
    now = TcpSegments(5000, 40)
    old = found_namespace(None, None, 11, 100, now, born_after_start=False)
    assert old.start == now and old.total(TcpSegments(5600, 46)) == TcpSegments(600, 6)
    new = found_namespace(None, None, 12, 101, now, born_after_start=True)
    assert new.start == ZERO and new.total(now) == now      # a new namespace's counters began at 0
    # Found again in the same namespace (another of its processes): the start stays.
    again = found_namespace(old, TcpSegments(600, 6), 11, 150, TcpSegments(5600, 46), born_after_start=False)
    assert again == PodNamespace(netns=11, pid=150, start=now) and again.total(TcpSegments(5700, 47)) == TcpSegments(700, 7)
    # A new namespace under a pod already followed: born during the count, added to the old one's.
    moved = found_namespace(old, TcpSegments(700, 7), 13, 200, TcpSegments(30, 1), born_after_start=False)
    assert moved.start == ZERO and moved.total(TcpSegments(30, 1)) == TcpSegments(730, 8)


def test_creation_after_the_start_is_read_from_the_pods_timestamp_and_unknown_is_never_after():
    assert created_after(AFTER, START) and not created_after(BEFORE, START)
    assert not created_after("2026-01-01T12:00:00Z", START)    # the same second: maybe before
    assert not created_after(None, START) and not created_after("yesterday", START)


class FakeProc:
    """A /proc-shaped tree: network namespaces are net/ folders, processes link to one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spaces = root / "_spaces"
        self.spaces.mkdir()

    def namespace(self, name: str, addresses: tuple[str, ...], out_segs: int = 0, retrans_segs: int = 0) -> None:
        net = self.spaces / name
        net.mkdir()
        leaves = "".join(f"     |-- {ip}\n        /32 host LOCAL\n" for ip in addresses if ":" not in ip)
        (net / "fib_trie").write_text(f"Main:\n  +-- 0.0.0.0/0 3 0 5\n{leaves}")
        (net / "if_inet6").write_text("".join(f"{ipaddress.IPv6Address(ip).exploded.replace(':', '')} 02 40 00 80 eth0\n"
                                              for ip in addresses if ":" in ip))
        self.count(name, out_segs, retrans_segs)

    def count(self, name: str, out_segs: int, retrans_segs: int) -> None:
        # Rewritten in place: the inode (the namespace's name) stays.
        with open(self.spaces / name / "snmp", "r+" if (self.spaces / name / "snmp").exists() else "w") as f:
            f.truncate(0)
            f.write("Tcp: RtoAlgorithm OutSegs RetransSegs\n"
                    f"Tcp: 1 {out_segs} {retrans_segs}\n")

    def process(self, pid: str, namespace: str) -> None:
        net = self.root / pid / "net"
        net.mkdir(parents=True)
        for name in ("snmp", "fib_trie", "if_inet6"):
            os.link(self.spaces / namespace / name, net / name)

    def end(self, pid: str) -> None:
        for f in (self.root / pid / "net").iterdir():
            f.unlink()
        (self.root / pid / "net").rmdir()
        (self.root / pid).rmdir()


def pod(name: str, ips: tuple[str, ...], created: str = BEFORE, host_network: bool = False) -> PodFacts:
    return PodFacts(uid=name, name=name, namespace="shop", node_name="node-a", labels={}, host_network=host_network,
                    ips=ips, host_ips=("10.0.0.1",), terminal=False, created=created)


def test_the_reader_follows_each_pods_namespace_through_one_of_its_processes(tmp_path):
    proc = FakeProc(tmp_path)
    proc.namespace("node", ("10.0.0.1", "127.0.0.1"), out_segs=9_000_000, retrans_segs=9000)
    proc.process("self", "node")
    proc.process("1", "node")
    proc.namespace("web", ("198.18.0.5", "fd00::5"), out_segs=1000, retrans_segs=10)
    proc.process("200", "web")
    proc.process("201", "web")
    proc.namespace("db", ("198.18.0.6", "fd00::6"), out_segs=300, retrans_segs=3)
    proc.process("300", "db")
    web, db = pod("web", ("198.18.0.5", "fd00::5")), pod("db", ("198.18.0.6", "fd00::6"), created=AFTER)
    host = pod("agent", ("10.0.0.1",), host_network=True)
    reader = PodSegmentReader(START, proc=tmp_path)

    # web existed before counting began: it counts from this read; db's namespace is newer
    # than the count, all of its segments count; the hostNetwork pod has none (the node's are not its).
    assert reader.read([web, db, host]) == {("shop", "web"): ZERO, ("shop", "db"): TcpSegments(300, 3)}
    assert reader.scans == 1

    proc.count("web", 1500, 40)
    proc.count("db", 800, 5)
    assert reader.read([web, db, host]) == {("shop", "web"): TcpSegments(500, 30), ("shop", "db"): TcpSegments(800, 5)}
    assert reader.scans == 1        # both pids still live in their namespaces: no scan

    # The process read ends: another one of the namespace is found, the count goes on.
    followed = reader._followed[("shop", "web")].pid
    proc.end(str(followed))
    proc.count("web", 1600, 41)
    assert reader.read([web, db])[("shop", "web")] == TcpSegments(600, 31)
    assert reader.scans == 2

    # The pod's sandbox is re-created: a new namespace, counting from 0, adds to the old one's.
    for pid in ("200", "201"):
        if (tmp_path / pid).exists():
            proc.end(pid)
    proc.namespace("web2", ("198.18.0.5", "fd00::5"), out_segs=70, retrans_segs=7)
    proc.process("202", "web2")
    assert reader.read([web, db])[("shop", "web")] == TcpSegments(670, 38)

    # A pod that is gone keeps what it sent; one without a process yet has nothing.
    proc.end("300")
    late = pod("late", ("198.18.0.9", "fd00::9"), created=AFTER)
    assert reader.read([web, late]) == {("shop", "web"): TcpSegments(670, 38), ("shop", "db"): TcpSegments(800, 5)}


def test_a_reader_without_the_hosts_proc_finds_nothing(tmp_path):
    reader = PodSegmentReader(START - timedelta(minutes=1), proc=tmp_path / "missing")
    assert reader.read([pod("web", ("198.18.0.5",))]) == {}
