"""`python -m tests.harness.demo_local` (make demo): real retransmits, counted live by the local agent.

Creates a private network namespace whose loopback loses 5% of TCP segments, runs iperf3
in it (plus a few connections whose SYNs are dropped), and shows `retransmit-agent local`'s
live table for about 20 seconds, filtered to the namespace's own addresses. Cleans up after.
Needs root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness.loads import own_cidrs
from tests.harness.netns import LossNamespace

SECONDS = 20
LOSS = 5
IPERF_PORT, SYN_PORT = 5201, 5299


def main() -> int:
    if os.geteuid() != 0:
        print("demo_local: run as root (it creates a network namespace and loads a BPF program)", file=sys.stderr)
        return 1
    agent = str(Path(sys.executable).parent / "retransmit-agent")
    with LossNamespace(prefix="rtdemo") as ns:
        client, server = ns.v4
        ns._rules(f"meta l4proto tcp tcp flags & syn == 0 numgen random mod 100 < {LOSS} drop",
                  f"tcp dport {SYN_PORT} tcp flags & (syn | ack) == syn drop")
        cidrs = [arg for c in own_cidrs(ns) for arg in ("--remote-cidr", c)]
        command = [agent, "local", "--duration", f"{SECONDS}s", "--interval", "2s", "--top", "12", *cidrs]
        print(f"namespace {ns.name}: {LOSS}% loss on lo, iperf3 {client} -> {server}:{IPERF_PORT}, "
              f"SYNs to port {SYN_PORT} dropped", file=sys.stderr)
        print("$ " + " ".join(command), file=sys.stderr)
        shown = subprocess.Popen(command)
        ns.python("tests.harness.traffic", "iperf", "--server-ip", server, "--client-ip", client,
                  "--port", str(IPERF_PORT), "--connections", "4", "--seconds", str(SECONDS - 6),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ns.python("tests.harness.traffic", "syn", "--server-ip", server, "--port", str(SYN_PORT),
                  "--connections", "3", "--seconds", str(SECONDS - 6),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return shown.wait()
        except KeyboardInterrupt:
            return shown.wait()


if __name__ == "__main__":
    sys.exit(main())
