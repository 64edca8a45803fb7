"""Loads that make real retransmits in a LossNamespace, driven from the test process.

Each function applies its loss rule, runs tests.harness.traffic inside the namespace,
lifts the rule and waits until no socket can retransmit any more, so counters read
afterwards cover the whole load. They return the connections made.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from .netns import LossNamespace

# With GSO, one retransmitted skb (one tracepoint event) carries up to 64 KiB of payload,
# i.e. several MSS-sized segments, and RetransSegs counts segments. TCP always sets
# NETIF_F_GSO on its sockets (sk_setup_caps), so `ethtool -K lo gso off` shrinks but does
# not remove the difference. At MTU 1500 an skb holds at most ceil(65536 / 1400) segments,
# so RetransSegs lies between the retransmit events and this many times them.
MAX_SEGMENTS_PER_SKB = math.ceil(65536 / 1400)


def own_cidrs(ns: LossNamespace) -> tuple[str, ...]:
    """Host-route CIDRs of the namespace's own addresses: a filter that keeps only its flows."""
    return tuple(f"{a}/32" for a in ns.v4) + tuple(f"{a}/128" for a in ns.v6)


def own_addresses(ns: LossNamespace) -> set[str]:
    return set(ns.v4) | set(ns.v6)


def _finish(proc: subprocess.Popen, timeout: float) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"traffic driver failed ({proc.returncode}): {err}")
    return json.loads(out.strip().splitlines()[-1])


def joining(cgroup: Optional[Path]) -> Optional[Callable[[], None]]:
    """A preexec_fn that moves the child into cgroup v2 directory `cgroup` before it runs
    (so every socket it makes carries that cgroup); None for no cgroup."""
    if cgroup is None:
        return None
    procs = str(cgroup / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write("0")
    return join


def bulk(ns: LossNamespace, loss: int, family: str = "IPv4", port: int = 5001, connections: int = 4,
         nbytes: int = 2 << 20, duplex: bool = True, settle: bool = True, dual_stack: bool = False,
         cgroup: Optional[Path] = None) -> list[dict]:
    """Both directions send `nbytes` per connection under `loss`% random loss (SYNs exempt).

    dual_stack: the server is an IPv6 socket on [::] and IPv4 clients connect to it.
    cgroup: a cgroup v2 directory the driver runs in (its sockets' cgroup)."""
    client, server = ns.v4 if family == "IPv4" else ns.v6
    ns.random_loss(loss)
    proc = ns.python("tests.harness.traffic", "bulk", "--server-ip", server, "--client-ip", client,
                     "--port", str(port), "--connections", str(connections), "--bytes", str(nbytes),
                     *(["--duplex"] if duplex else []), *(["--dual-stack"] if dual_stack else []),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=joining(cgroup))
    try:
        flows = _finish(proc, timeout=300)
    finally:
        ns.clear_loss()
    if settle:
        ns.wait_quiet()
    return flows


def bulk_mix(ns: LossNamespace, loss: int, ports: tuple[int, int] = (5001, 5002), connections: int = 3,
             nbytes: int = 1 << 20) -> None:
    """IPv4 bulk on ports[0] and IPv6 bulk on ports[1] at the same time, both duplex."""
    ns.random_loss(loss)
    procs = []
    for (client, server), port in ((ns.v4, ports[0]), (ns.v6, ports[1])):
        procs.append(ns.python("tests.harness.traffic", "bulk", "--server-ip", server, "--client-ip", client,
                               "--port", str(port), "--connections", str(connections), "--bytes", str(nbytes),
                               "--duplex", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for proc in procs:
            _finish(proc, timeout=300)
    finally:
        ns.clear_loss()
    ns.wait_quiet()


def syn_drops(ns: LossNamespace, port: int = 5003, connections: int = 6, seconds: float = 3.5,
              family: str = "IPv4") -> list[dict]:
    """Every SYN to `port` dropped for `seconds`: clients retransmit SYNs (at ~1s, ~3s)."""
    server = ns.v4[1] if family == "IPv4" else ns.v6[1]
    ns.drop_syns(port)
    proc = ns.python("tests.harness.traffic", "syn", "--server-ip", server, "--port", str(port),
                     "--connections", str(connections), "--seconds", str(seconds),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        flows = _finish(proc, timeout=60)
    finally:
        ns.clear_loss()
    ns.wait_quiet()
    return flows


def synack_drops(ns: LossNamespace, port: int = 5004, connections: int = 6, seconds: float = 3.5,
                 family: str = "IPv4", dual_stack: bool = False) -> list[dict]:
    """The handshake's final ACK to `port` dropped for `seconds`: the server retransmits SYN-ACKs.

    dual_stack: the server is an IPv6 socket on [::] and IPv4 clients connect to it."""
    server = ns.v4[1] if family == "IPv4" else ns.v6[1]
    ns.drop_handshake_acks(port)
    proc = ns.python("tests.harness.traffic", "synack", "--server-ip", server, "--port", str(port),
                     "--connections", str(connections), *(["--dual-stack"] if dual_stack else []),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"synack driver did not get ready: {line!r} {proc.stderr.read()}")
        time.sleep(seconds)
    finally:
        ns.clear_loss()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    flows = _finish(proc, timeout=60)
    ns.wait_quiet()
    return flows
