"""A pod's segment counters as the agent reads them are its network namespace's own.

Pods are stood in for by network namespaces, each with a holder process of another user
(as a pause container), and lossy bulk traffic inside. The reader runs as the agent's
capabilities mode does (uid 0, no capability at all here: no CAP_SYS_PTRACE, so
/proc/PID/ns/net is closed to it), finds each namespace by the pod's addresses and reads its
counters through the holder's /proc/PID/net/snmp. What it reports is compared with the
namespace's own /proc/net/snmp: exactly, once the traffic is over.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from retransmit_agent.segments import read_tcp_segments
from retransmit_core.ratio import retransmit_ratio
from tests.harness import loads
from tests.harness.netns import ROOT, LossNamespace

pytestmark = pytest.mark.kernel

LOSS_PERCENT = 5
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
WITHOUT_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


class Reader:
    """tests.harness.podsegread without any capability: one read per call."""

    def __init__(self, since: datetime) -> None:
        self.proc = subprocess.Popen([*WITHOUT_CAPABILITIES, sys.executable, "-m", "tests.harness.podsegread",
                                      since.isoformat()], cwd=str(ROOT), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self, pods: list[dict]) -> dict[str, list[int]]:
        self.proc.stdin.write(json.dumps(pods) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the reader ended ({self.proc.poll()})"
        return json.loads(line)

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def pod(name: str, ns: LossNamespace, created: datetime, host_network: bool = False) -> dict:
    return {"uid": name, "name": name, "namespace": "shop", "node_name": "node-a", "labels": {},
            "host_network": host_network, "ips": sorted(loads.own_addresses(ns)), "host_ips": [],
            "terminal": False, "created": created.strftime("%Y-%m-%dT%H:%M:%SZ")}


def holder(ns: LossNamespace) -> subprocess.Popen:
    """A process of another user in the namespace, once it is in (`ip netns exec` runs first)."""
    proc = ns.popen(*NOBODY, "sleep", "infinity")
    deadline = time.monotonic() + 30
    while read_tcp_segments(f"/proc/{proc.pid}/net/snmp") == read_tcp_segments("/proc/net/snmp"):
        assert time.monotonic() < deadline, "the holder never entered the namespace"
        time.sleep(0.01)
    return proc


def snmp(ns: LossNamespace) -> list[int]:
    tcp = ns.snmp_tcp()
    return [tcp["OutSegs"], tcp["RetransSegs"]]


def test_each_pods_counters_are_its_namespaces_own_read_without_ptrace():
    since = datetime.now(timezone.utc)
    with LossNamespace() as old, Reader(since) as reader:
        holder(old)
        # The pod existed before counting began: it counts from the first read that finds it.
        older = pod("old", old, since - timedelta(minutes=5))
        assert reader.read([older]) == {"shop/old": [0, 0]}
        at_first_read = snmp(old)
        loads.bulk(old, loss=LOSS_PERCENT, connections=2, nbytes=2 << 20)
        with LossNamespace() as new:
            # Born after counting began: all of its counters count, whenever it is first found.
            newer = pod("new", new, since + timedelta(seconds=2))
            holder(new)
            loads.bulk(new, loss=LOSS_PERCENT, connections=2, nbytes=1 << 20)
            # A hostNetwork pod (the node's addresses) is never read: its counters are the node's.
            host = {**pod("host", old, since), "host_network": True}
            got = reader.read([older, newer, host])
            assert got == {"shop/old": [a - b for a, b in zip(snmp(old), at_first_read)], "shop/new": snmp(new)}
        out_segs, retrans_segs = got["shop/old"]
        assert out_segs > 2 * (2 << 20) // 1448 and retrans_segs > 0
        print(f"pod at {LOSS_PERCENT}% loss: {retrans_segs}/{out_segs} = {retransmit_ratio(retrans_segs, out_segs)}")
        # A gone pod keeps what it sent.
        assert reader.read([older])["shop/new"] == got["shop/new"]
