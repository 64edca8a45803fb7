"""The bench's plot: agent and baseline CPU, and kernel ns per event, against the event rate;
aggregation lag p99 against the node count, per-node reports next to the single shared object."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results: dict, path: Path) -> Path:
    sweep = sorted(results["node"]["sweep"], key=lambda p: p["events_per_second"])
    rate = [p["events_per_second"] for p in sweep]
    fig, (cpu, kern, lag) = plt.subplots(1, 3, figsize=(18, 4.8))

    cpu.plot(rate, [p["baseline_cpu_percent"] for p in sweep], "o-", color="tab:red",
             label="per-event baseline (tcpretrans-style)")
    cpu.plot(rate, [p["agent_cpu_percent"] for p in sweep], "o-", color="tab:blue", label="retransmit-agent")
    cpu.axhline(1.0, color="tab:blue", linestyle=":", linewidth=1, label="target: agent <= 1% of a core")
    cpu.set_yscale("log")
    cpu.set_xlabel("retransmit events per second")
    cpu.set_ylabel("user-space CPU, % of one core (log)")
    cpu.set_title("User-space overhead")
    cpu.grid(True, which="both", alpha=0.3)
    cpu.legend(fontsize=8)

    for key, label, color in (("kernel_ns_per_event_baseline", "per-event baseline", "tab:red"),
                              ("kernel_ns_per_event", "retransmit-agent program", "tab:blue"),
                              ("kernel_ns_per_event_floor", "floor: one counter", "tab:gray")):
        kern.plot(rate, [p[key] for p in sweep], "o-", color=color, label=label)
    floor = [2 * p["kernel_ns_per_event_floor"] for p in sweep]
    kern.plot(rate, floor, ":", color="tab:gray", linewidth=1, label="target: 2x floor")
    kern.set_yscale("log")
    kern.set_xlabel("retransmit events per second")
    kern.set_ylabel("kernel ns per event (bpf_stats, log)")
    kern.set_title("Kernel cost per tracepoint hit")
    kern.grid(True, which="both", alpha=0.3)
    kern.legend(fontsize=8)

    for key, label, color in ((results.get("aggregation_lag_p99_s_by_nodes") or {}, "per-node reports", "tab:blue"),
                              ((results.get("single_object_previous") or {}).get("aggregation_lag_p99_s_by_nodes") or {},
                               "one shared trace object (before)", "tab:red")):
        points = sorted((int(n), v) for n, v in key.items() if v is not None)
        if points:
            lag.plot([n for n, _ in points], [v for _, v in points], "o-", color=color, label=label)
    lag.axhline(5.0, color="tab:gray", linestyle=":", linewidth=1, label="target: p99 <= 5 s")
    lag.set_xscale("log")
    lag.set_yscale("log")
    lag.set_xlabel("simulated nodes on one trace")
    lag.set_ylabel("aggregation lag p99, s (log)")
    lag.set_title("Node write to trace summary")
    lag.grid(True, which="both", alpha=0.3)
    lag.legend(fontsize=8)

    meta = results.get("meta", {})
    fig.suptitle(f"retransmit-operator bench, {meta.get('kernel', '')}, {meta.get('cpus', '?')} CPUs, "
                 f"{meta.get('date', '')}, {meta.get('git_commit', '')[:10]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
