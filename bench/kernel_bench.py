"""Node-side figures, all from one run with every program attached to the same load:
kernel cost per event (ours, the floor, the per-event baseline), exactness against the
reference counter, the agent's CPU and memory against the baseline's, at several rates.

Attached at once, on tcp:tcp_retransmit_skb:
- the agent: `retransmit-agent local --output json --top 0` as a subprocess, default
  configuration (no filter, 100 samples/s): kernel cost, CPU, memory, start-up;
- the same agent with `--port P`, which keeps only the bench's flows, so retransmits
  elsewhere on the host (other tests) cannot make the exactness comparison inexact;
- the same agent with `--btf` pointing at a missing file: no socket reads, causes unknown
  (what retransmit causes cost in the kernel);
- the floor: a program that only increments one per-CPU counter (this process);
- the reference counter: tests.harness.refcount (this process);
- the baseline: bench.baseline, tcpretrans-style, as a subprocess.
Load: tests.harness.traffic iperf (iperf3 -P streams) between the two addresses of a
private LossNamespace (lo, GSO/TSO off) under nftables random loss, SYNs exempt, server
port P. Each phase is measured over a window that starts after a warm-up and ends before
iperf stops.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench import procstat
from tests.harness.netns import TABLE, LossNamespace
from tests.harness.refcount import ReferenceCounter, per_flow, succeeded

ROOT = Path(__file__).resolve().parents[1]
AGENT = Path(sys.executable).parent / "retransmit-agent"

def floor_source(category: str, event: str, prelude: str = "") -> str:
    """The floor on a tracepoint: a program that only counts its hits in one per-CPU counter."""
    return prelude + f"""
BPF_PERCPU_ARRAY(hits, u64, 1);
TRACEPOINT_PROBE({category}, {event})
{{
    u32 zero = 0;
    u64 *n = hits.lookup(&zero);
    if (n)
        (*n)++;
    return 0;
}}
"""


FLOOR_SOURCE = floor_source("tcp", "tcp_retransmit_skb")


@dataclass(frozen=True)
class Phase:
    """One load level: `loss` percent random loss, `streams` iperf3 streams, a window of `seconds`."""

    loss: float
    streams: int
    seconds: float
    warmup: float = 3.0


# Rates on this 2-core VM with every program attached: 0.3%/1 stream ~1k/s, 1%/1 ~3k/s,
# 3%/4 ~6-9k/s, 8%/8 ~12-18k/s, 20%/16 ~22-30k/s.
SWEEP = (Phase(0.3, 1, 12), Phase(1, 1, 12), Phase(3, 4, 12), Phase(8, 8, 12))
MAIN = Phase(20, 16, 30)


def apply_loss(ns: LossNamespace, percent: float) -> None:
    """Random loss on the namespace; whole percents through the harness, fractions in 1/10000."""
    if percent == int(percent):
        ns.random_loss(int(percent))
        return
    # The harness rule (tests.harness.netns.LossNamespace.random_loss) at a finer grain.
    ns.nft(f"flush chain inet {TABLE} input\n"
           f"add rule inet {TABLE} input meta l4proto tcp tcp flags & syn == 0 "
           f"numgen random mod 10000 < {round(percent * 100)} drop\n")


def attach_seconds(samples: int = 3) -> list[float]:
    """Start-up of `retransmit-agent local` on its own: process start to its "counting on" line."""
    times = []
    for _ in range(samples):
        agent = Watched([str(AGENT), "local", "--output", "json", "--duration", "0.2s"], stdout=subprocess.DEVNULL)
        times.append(agent.wait_line("counting on"))
        agent.proc.wait(timeout=60)
        agent.kill()
    return times


class Watched:
    """A subprocess whose stderr is read line by line (so it never blocks on a full pipe)."""

    def __init__(self, argv: list[str], stdout=subprocess.DEVNULL) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, needle: str, timeout: float = 120.0) -> float:
        """Seconds from process start until a stderr line containing `needle`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline()
                if not line and self.proc.poll() is not None:
                    break
                self.lines.append(line.rstrip())
                if needle in line:
                    return time.monotonic() - self.started
            elif self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.proc.args[:3]} never printed {needle!r}: {self.lines[-10:]}")

    def stop(self, timeout: float = 60.0) -> tuple[str, str]:
        """SIGTERM, then everything it printed afterwards (stdout, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return out or "", "\n".join(self.lines) + "\n" + (err or "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def task_cpu_ns(pid: int) -> int:
    """CPU time of all threads of `pid` in ns (schedstat: exact, not tick-sampled)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Reading:
    at: float
    agent_ns: int
    agent_ticks: int
    filtered_ns: int
    baseline_ns: int
    baseline_ticks: int
    progs: dict[str, list[procstat.ProgStats]]
    port_events: int


def _port_events(ref: ReferenceCounter, port: int) -> int:
    return sum(n for e, n in ref.read().items() if port in (e.local_port, e.remote_port) and succeeded(e))


def run(port: Optional[int] = None, sweep=SWEEP, main=MAIN, log=print) -> dict:
    """Run the node-side measurements; returns figures (see bench/README.md for the keys)."""
    port = port or random.randrange(20000, 30000)
    results: dict = {"port": port}
    floor = ref = agent = filtered = nocause = baseline = None
    results["agent_attach_samples_s"] = attach_seconds()
    log(f"agent start-up alone: {', '.join(f'{t:.2f}' for t in results['agent_attach_samples_s'])} s")
    with procstat.BpfStats(), LossNamespace(prefix="rtb") as ns:
        try:
            from bcc import BPF

            ref = ReferenceCounter().start()
            floor = BPF(text=FLOOR_SOURCE)
            me = os.getpid()
            own_fds = {
                "floor": [f.fd for f in floor.funcs.values()],
                "reference": [f.fd for f in ref._bpf.funcs.values()],
            }
            baseline = Watched([sys.executable, "-m", "bench.baseline"])
            baseline.wait_line("attached")
            log(f"baseline attached (pid {baseline.pid})")
            filtered = Watched([str(AGENT), "local", "--output", "json", "--top", "0", "--port", str(port)],
                               stdout=subprocess.PIPE)
            filtered.wait_line("counting on")
            nocause = Watched([str(AGENT), "local", "--output", "json", "--top", "0", "--btf", "/nonexistent/vmlinux"])
            nocause.wait_line("counting on")
            agent = Watched([str(AGENT), "local", "--output", "json", "--top", "0"], stdout=subprocess.PIPE)
            results["agent_attach_samples_s"].append(agent.wait_line("counting on"))
            results["agent_attach_s"] = procstat.percentile(results["agent_attach_samples_s"], 50)
            log(f"agents attached; start-up {results['agent_attach_samples_s'][-1]:.2f} s "
                f"(pids {agent.pid}, {filtered.pid})")
            results["agent_rss_startup_mb"] = procstat.memory_kb(agent.pid, "VmHWM") / 1024
            procstat.reset_peak_memory(agent.pid)

            def reading() -> Reading:
                return Reading(
                    at=time.monotonic(),
                    agent_ns=task_cpu_ns(agent.pid), agent_ticks=procstat.cpu_ticks(agent.pid),
                    filtered_ns=task_cpu_ns(filtered.pid),
                    baseline_ns=task_cpu_ns(baseline.pid), baseline_ticks=procstat.cpu_ticks(baseline.pid),
                    progs={
                        "agent": procstat.prog_stats(agent.pid),
                        "filtered": procstat.prog_stats(filtered.pid),
                        "nocause": procstat.prog_stats(nocause.pid),
                        "baseline": procstat.prog_stats(baseline.pid),
                        **{name: procstat.prog_stats(me, fds) for name, fds in own_fds.items()},
                    },
                    port_events=_port_events(ref, port),
                )

            points = []
            for phase in (*sweep, main):
                apply_loss(ns, phase.loss)
                iperf = ns.python("tests.harness.traffic", "iperf", "--server-ip", ns.v4[1], "--client-ip", ns.v4[0],
                                  "--port", str(port), "--connections", str(phase.streams),
                                  "--seconds", f"{phase.warmup + phase.seconds + 1:g}",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(phase.warmup)
                start = reading()
                time.sleep(phase.seconds)
                end = reading()
                iperf.wait(timeout=120)
                ns.clear_loss()
                ns.wait_quiet()
                point = summarize(phase, start, end)
                points.append(point)
                log(f"loss {phase.loss}% x{phase.streams}: {point['events_per_second']:.0f} events/s, "
                    f"agent {point['agent_cpu_percent']:.3f}% vs baseline {point['baseline_cpu_percent']:.1f}%, "
                    f"kernel {point['kernel_ns_per_event']:.0f} ns vs floor {point['kernel_ns_per_event_floor']:.0f} ns")

            results["agent_rss_counting_mb"] = procstat.memory_kb(agent.pid, "VmHWM") / 1024
            report = json.loads(filtered.stop()[0])
            unfiltered_report = json.loads(agent.stop()[0])
            results["agent_rss_mb"] = max(results["agent_rss_startup_mb"], results["agent_rss_counting_mb"])
            _, base_err = baseline.stop()
            base_counts = json.loads([l for l in base_err.splitlines() if l.startswith("{")][-1])
            counts = ref.read()
        finally:
            for p in (agent, filtered, nocause, baseline):
                if p is not None:
                    p.kill()
            if floor is not None:
                floor.cleanup()
            if ref is not None:
                ref.stop()

    ours = lambda e: port in (e.local_port, e.remote_port) and succeeded(e)  # noqa: E731
    ref_flows = per_flow(counts, ours)
    ref_total = sum(a + b for a, b in ref_flows.values())
    agent_total = report["retransmits"] + report["synackRetransmits"]
    agent_flows = report_flows(report)
    unfiltered_flows = {k: v for k, v in report_flows(unfiltered_report).items() if port in (k[2], k[4])}
    main_point = points[-1]
    results.update({
        "events_per_second": main_point["events_per_second"],
        "events_total": ref_total,
        "agent_events_total": agent_total,
        "count_error": agent_total - ref_total,
        "flow_mismatches": sum(1 for k in set(ref_flows) | set(agent_flows) if ref_flows.get(k) != agent_flows.get(k)),
        "flows_compared": len(set(ref_flows) | set(agent_flows)),
        "flow_mismatches_unfiltered": sum(1 for k in set(ref_flows) | set(unfiltered_flows)
                                          if ref_flows.get(k) != unfiltered_flows.get(k)),
        "agent_lost_events": report["lostEvents"],
        "baseline_events": base_counts["events"],
        "baseline_lost_events": base_counts["lost"],
        "kernel_ns_per_event": main_point["kernel_ns_per_event"],
        "kernel_ns_per_event_floor": main_point["kernel_ns_per_event_floor"],
        "kernel_ns_per_event_port_filter": main_point["kernel_ns_per_event_port_filter"],
        "kernel_ns_per_event_causes_off": main_point["kernel_ns_per_event_causes_off"],
        "agent_port_filter_cpu_percent": main_point["agent_port_filter_cpu_percent"],
        "kernel_ns_per_event_baseline": main_point["kernel_ns_per_event_baseline"],
        "kernel_ns_per_event_reference": main_point["kernel_ns_per_event_reference"],
        "agent_cpu_percent": main_point["agent_cpu_percent"],
        "agent_cpu_percent_stat": main_point["agent_cpu_percent_stat"],
        "baseline_cpu_percent": main_point["baseline_cpu_percent"],
        "baseline_cpu_percent_stat": main_point["baseline_cpu_percent_stat"],
        "window_s": main.seconds,
        "sweep": points,
    })
    return results


def report_flows(report: dict) -> dict[tuple, tuple[int, int]]:
    """flow key (as tests.harness.refcount.per_flow has it) -> (retransmits, synack) of a node report."""
    return {(f["family"], f["local"]["ip"], f["local"]["port"], f["remote"]["ip"], f["remote"]["port"]):
            (f["retransmits"], f["synackRetransmits"]) for f in report["topFlows"]}


def summarize(phase: Phase, start: Reading, end: Reading) -> dict:
    """One sweep point from two readings."""
    seconds = end.at - start.at

    def kernel(name: str) -> float:
        ns, _runs = procstat.ns_per_run(start.progs[name], end.progs[name])
        return ns

    _, host_events = procstat.ns_per_run(start.progs["floor"], end.progs["floor"])

    def pct(ns: int) -> float:
        return 100.0 * ns / 1e9 / seconds

    return {
        "loss_percent": phase.loss,
        "streams": phase.streams,
        "window_s": round(seconds, 3),
        "events_per_second": (end.port_events - start.port_events) / seconds,
        "host_events_per_second": host_events / seconds,   # every hit, other tests' too
        "agent_cpu_percent": pct(end.agent_ns - start.agent_ns),
        "agent_cpu_percent_stat": procstat.cpu_percent(end.agent_ticks - start.agent_ticks, seconds),
        "baseline_cpu_percent": pct(end.baseline_ns - start.baseline_ns),
        "baseline_cpu_percent_stat": procstat.cpu_percent(end.baseline_ticks - start.baseline_ticks, seconds),
        "kernel_ns_per_event": kernel("agent"),
        "kernel_ns_per_event_port_filter": kernel("filtered"),
        "kernel_ns_per_event_causes_off": kernel("nocause"),
        "agent_port_filter_cpu_percent": pct(end.filtered_ns - start.filtered_ns),
        "kernel_ns_per_event_floor": kernel("floor"),
        "kernel_ns_per_event_baseline": kernel("baseline"),
        "kernel_ns_per_event_reference": kernel("reference"),
    }


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    figures = run(sweep=(Phase(0.3, 1, 5),) if quick else SWEEP, main=Phase(20, 16, 8) if quick else MAIN)
    print(json.dumps(figures, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
