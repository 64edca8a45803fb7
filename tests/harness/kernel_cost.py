"""Kernel time per event of the product's program next to a bare counter (bpf_stats).

    python -m tests.harness.kernel_cost [--filter none|cidr|port|local|all] [--seconds 6]

Loads a minimal program that only increments a per-CPU counter on tcp:tcp_retransmit_skb
(the floor for a perf-attached tracepoint) and the product's program, drives iperf3 -P 16
under 20% loss in a private namespace, and prints one JSON line: events/s and ns/event
for both (from /proc/self/fdinfo run_time_ns/run_cnt with kernel.bpf_stats_enabled=1),
and this process's CPU share while it drains samples every 0.5 s. Root only; a rough
measurement for development, the bench/ folder holds the formal one.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
from pathlib import Path

from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from tests.harness.loads import own_cidrs
from tests.harness.netns import LossNamespace

BARE = r"""
BPF_PERCPU_ARRAY(n, u64, 1);
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) { u32 z = 0; u64 *v = n.lookup(&z); if (v) (*v)++; return 0; }
"""


def fd_stats(fd: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":" in line)
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def measure(filter_kind: str, seconds: float) -> dict:
    from bcc import BPF

    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
    with LossNamespace(prefix="rtcost") as ns:
        config = {
            "none": KernelConfig(),
            "cidr": KernelConfig(remote_cidrs=own_cidrs(ns)),
            "port": KernelConfig(ports=frozenset({5201})),
            "local": KernelConfig(local_ips=frozenset(ns.v4 + ns.v6)),
            "all": KernelConfig(remote_cidrs=own_cidrs(ns), ports=frozenset({5201}),
                                local_ips=frozenset(ns.v4 + ns.v6), states=frozenset({"ESTABLISHED", "FIN_WAIT1"})),
        }[filter_kind]
        bare = BPF(text=BARE)
        program = RetransmitProgram.open(config)
        try:
            fds = {"bare": bare.funcs[b"tracepoint__tcp__tcp_retransmit_skb"].fd,
                   "product": program._bpf.funcs[b"tracepoint__tcp__tcp_retransmit_skb"].fd}
            ns._rules("meta l4proto tcp tcp flags & syn == 0 numgen random mod 100 < 20 drop")
            load = ns.python("tests.harness.traffic", "iperf", "--server-ip", ns.v4[1], "--client-ip", ns.v4[0],
                             "--port", "5201", "--connections", "16", "--seconds", str(seconds + 3),
                             stdout=subprocess.DEVNULL)
            time.sleep(2)
            before = {k: fd_stats(fd) for k, fd in fds.items()}
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            while time.monotonic() - t0 < seconds:
                time.sleep(0.5)
                program.drain_events()
            program.snapshot()
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            after = {k: fd_stats(fd) for k, fd in fds.items()}
            load.wait()
        finally:
            program.close()
            bare.cleanup()
    out: dict = {"filter": filter_kind, "ringbuf": program.uses_ringbuf}
    for name in fds:
        ns_total, count = after[name][0] - before[name][0], after[name][1] - before[name][1]
        out[name] = {"events_per_second": round(count / (t1 - t0)), "ns_per_event": round(ns_total / max(count, 1))}
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out["python_cpu_percent"] = round(100 * cpu / (t1 - t0), 2)
    out["ratio"] = round(out["product"]["ns_per_event"] / max(out["bare"]["ns_per_event"], 1), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.kernel_cost")
    parser.add_argument("--filter", choices=["none", "cidr", "port", "local", "all"], default="none")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print(json.dumps(measure(args.filter, args.seconds)))


if __name__ == "__main__":
    main()
