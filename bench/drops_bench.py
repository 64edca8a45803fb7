"""Kernel cost of counting drops by reason (skb:kfree_skb), per hit and per counted drop.

    python -m bench.drops_bench [--windows 5] [--seconds 4] [--output bench/results/drops.json]

Three programs watch skb:kfree_skb side by side under each load: the agent's program with
drops on (its kfree_skb probe; only the server's address traced), a floor (one per-CPU
counter on the same tracepoint, bench.kernel_bench's floor moved there) and the agent's
program with drops off (spec.drops: false), which attaches nothing there: its added cost
per hit is none, and the bench checks that it has no such probe. Two loads, in a private
LossNamespace, each for `windows` windows of `seconds`:

  drop-heavy  bulk TCP transfers whose client data is dropped 20% on input by a counted
              nft rule: most hits are TCP drops of the traced flow (NETFILTER_DROP)
  drop-free   the same transfers without loss, plus UDP datagrams to a closed port: every
              hit is a drop the program must look at and leave (not TCP, NO_SOCKET)

Per window, each program's run_time_ns / run_cnt delta (kernel.bpf_stats_enabled); figures
are medians over the windows. ns per counted drop = the drop probe's run time over the
drops it counted (the per-reason totals).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.kernel_bench import floor_source
from bench.procstat import BpfStats
from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from tests.harness.netns import LossNamespace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROBE = "kfree_skb"
PORT = 5501
CLOSED_PORT = 5599

# The enum: as in bpf/retransmit.bpf.c, bcc's generic headers do not define the type of `reason`.
FLOOR_SOURCE = floor_source("skb", "kfree_skb", "enum skb_drop_reason { RTRACE_SKB_DROP_REASON_SIZE_ = 0x7fffffff };\n")

# Datagrams to a port nobody listens on, as fast as one process sends them, until killed.
UDP_FLOOD = ("import socket, sys\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "while True:\n"
             "    try:\n"
             "        s.sendto(b'x' * 64, (sys.argv[1], int(sys.argv[2])))\n"
             "    except OSError:\n"
             "        pass\n")


def prog_stats(bpf, probe: str = PROBE) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of one probe of a bcc BPF object."""
    for name, fn in bpf.funcs.items():
        if (name.decode() if isinstance(name, bytes) else name).endswith("__" + probe):
            fields = {}
            for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
            return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))
    raise KeyError(probe)


class Load:
    """Bulk transfers repeated in the namespace (and, drop-free, a UDP flood) until stopped."""

    def __init__(self, ns: LossNamespace, heavy: bool) -> None:
        self.ns, self.heavy = ns, heavy
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Load":
        client, server = self.ns.v4
        loop = (f"while true; do {sys.executable} -m tests.harness.traffic bulk --server-ip {server} "
                f"--client-ip {client} --port {PORT} --connections 2 --bytes {8 << 20} >/dev/null || exit 1; done")
        self.procs.append(self.ns.popen("sh", "-c", loop))
        if not self.heavy:
            self.procs.append(self.ns.popen(sys.executable, "-c", UDP_FLOOD, client, str(CLOSED_PORT)))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            subprocess.run(["pkill", "-P", str(proc.pid)], capture_output=True)   # the loop's children, by parent id
            proc.kill()
            proc.wait()


def measure(ns: LossNamespace, heavy: bool, windows: int, seconds: float) -> dict:
    from bcc import BPF

    client, server = ns.v4
    rule = (f"add rule inet {ns.table} input ip saddr {client} tcp dport {PORT} tcp flags & syn == 0 "
            f"numgen random mod 100 < 20 counter drop\n") if heavy else ""
    ns.nft(f"flush chain inet {ns.table} input\n" + rule)
    on = RetransmitProgram.open(KernelConfig(local_ips=frozenset({server})))
    off = RetransmitProgram.open(KernelConfig(local_ips=frozenset({server}), drops=False))
    floor = BPF(text=FLOOR_SOURCE)
    try:
        assert on.counts_drops and PROBE in on.instruction_counts()
        assert not off.counts_drops and PROBE not in off.instruction_counts()
        rows = []
        with Load(ns, heavy):
            time.sleep(1.0)   # the load's first connections are up
            for _ in range(windows):
                before = (on.kernel_cost()[PROBE], prog_stats(floor), on.snapshot().drops.total)
                time.sleep(seconds)
                after = (on.kernel_cost()[PROBE], prog_stats(floor), on.snapshot().drops.total)
                (t0, n0), (f0, m0), d0 = before
                (t1, n1), (f1, m1), d1 = after
                hits = n1 - n0
                rows.append({"hits_per_second": hits / seconds, "drops_counted": d1 - d0,
                             "ns_per_hit_drops_on": (t1 - t0) / hits if hits else None,
                             "ns_per_hit_floor": (f1 - f0) / (m1 - m0) if m1 > m0 else None,
                             "ns_per_counted_drop": (t1 - t0) / (d1 - d0) if d1 > d0 else None})
    finally:
        on.close()
        off.close()
        floor.cleanup()

    def median(key: str):
        values = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(values), 1) if values else None

    return {"windows": rows, "hits_per_second": median("hits_per_second"),
            "drops_counted_per_second": round(sum(r["drops_counted"] for r in rows) / (windows * seconds), 1),
            "ns_per_hit_drops_on": median("ns_per_hit_drops_on"), "ns_per_hit_floor": median("ns_per_hit_floor"),
            "ns_per_hit_drops_off": 0, "ns_per_counted_drop": median("ns_per_counted_drop")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--output", default=str(RESULTS / "drops.json"))
    args = parser.parse_args()
    result = {"kernel": os.uname().release, "windows": args.windows, "seconds": args.seconds,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(), "loads": {}}
    with BpfStats():
        for name, heavy in (("drop-heavy", True), ("drop-free", False)):
            with LossNamespace(prefix="rtdrops") as ns:
                result["loads"][name] = measure(ns, heavy, args.windows, args.seconds)
            summary = {k: v for k, v in result["loads"][name].items() if k != "windows"}
            print(name, json.dumps(summary), flush=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
