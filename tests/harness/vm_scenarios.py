"""Guest side of the second-kernel layer: the agent's kernel program against the reference counter.

Runs as root inside the 6.1 VM (tests/harness/kernelvm.py), from the checkout's .venv:

    python -m tests.harness.vm_scenarios --out RWDIR/result.json

Opens the agent's RetransmitProgram twice (the buffer the kernel probe picks, a ring buffer
on 6.1, and a forced perf buffer) next to the independent ReferenceCounter, then makes real
retransmits in one private loss namespace, one scenario after the other, each on its own
server port: IPv4 and IPv6 bulk, dual-stack bulk (an IPv6 socket on `[::]` with IPv4
clients), SYN retransmits, SYN-ACK retransmits (plain and dual-stack). After each scenario
it compares, per program, the scenario's flows and the totals gained since the previous
scenario with the reference's as the wire shows them (ReferenceCounter.read: an IPv6
socket talking IPv4 is an IPv4 flow with plain addresses); the tracepoint's own view
(read_sockets) is kept in the result too. Writes everything, expectations and observations, as JSON;
exits 0 only when every comparison matched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from retransmit_agent.kernel import KernelConfig, KernelSnapshot, RetransmitProgram
from retransmit_agent.preflight import TRACEPOINTS, find_tracefs
from tests.harness import loads
from tests.harness.causecheck import cause_mismatches, delta, one_segment_per_skb, tcp_ext
from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter, per_flow, succeeded

# Small loads: the guest runs under software emulation (no KVM), roughly 10x slower than the host.
LOSS = 10
CONNECTIONS = 2
NBYTES = 256 << 10


@dataclass(frozen=True)
class Scenario:
    name: str
    port: int
    family: str                        # the family every flow must have, on the wire
    run: Callable[[LossNamespace, int], list]


SCENARIOS = (
    Scenario("ipv4", 5001, "IPv4",
             lambda ns, port: loads.bulk(ns, LOSS, "IPv4", port, CONNECTIONS, NBYTES)),
    Scenario("ipv6", 5002, "IPv6",
             lambda ns, port: loads.bulk(ns, LOSS, "IPv6", port, CONNECTIONS, NBYTES)),
    Scenario("dualstack", 5003, "IPv4",
             lambda ns, port: loads.bulk(ns, LOSS, "IPv4", port, CONNECTIONS, NBYTES, dual_stack=True)),
    Scenario("syn", 5004, "IPv4",
             lambda ns, port: loads.syn_drops(ns, port, connections=3, seconds=3.5)),
    Scenario("synack", 5005, "IPv4",
             lambda ns, port: loads.synack_drops(ns, port, connections=3, seconds=3.5)),
    Scenario("dualstack_synack", 5006, "IPv4",
             lambda ns, port: loads.synack_drops(ns, port, connections=3, seconds=3.5, dual_stack=True)),
)
MODES = ("ringbuf", "perfbuf")


def _flow_rows(flows: dict) -> list:
    """{(family, lip, lport, rip, rport): (retransmits, synacks)} as sorted JSON rows."""
    return sorted([*key, r, s] for key, (r, s) in flows.items())


def _by_family(flows: dict) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key, (r, s) in flows.items():
        entry = out.setdefault(key[0], [0, 0])
        entry[0] += r
        entry[1] += s
    return out


def _on_port(port: int) -> Callable:
    return lambda e: port in (e.local_port, e.remote_port)


def _snapshot_flows(snapshot: KernelSnapshot, port: int) -> dict:
    return {f.key: (f.retransmits, f.synack_retransmits) for f in snapshot.flow_counters
            if port in (f.local_port, f.remote_port)}


def _format_fields(path: Path) -> list[str]:
    """Field names declared in a tracepoint format file, read here rather than by the agent."""
    names = []
    for line in path.read_text().splitlines():
        declaration = line.strip().split(";", 1)[0]
        if declaration.startswith("field:"):
            names.append(declaration.split()[-1].split("[", 1)[0])
    return names


def _reference_totals(counts: Counter) -> tuple[int, int]:
    done = [(e, n) for e, n in counts.items() if succeeded(e)]
    return (sum(n for e, n in done if not e.synack), sum(n for e, n in done if e.synack))


def run(out: Path) -> bool:
    started = time.monotonic()
    result: dict = {"kernel": {"release": os.uname().release, "fields": {
        event: _format_fields(find_tracefs() / "events" / category / event / "format") for category, event in TRACEPOINTS}},
        "programs": {}, "scenarios": {}, "matched": False, "seconds": {}}
    all_matched = True

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, sort_keys=True))

    try:
        with ReferenceCounter() as reference, \
                RetransmitProgram.open(KernelConfig()) as probed, \
                RetransmitProgram.open(KernelConfig(), ringbuf=False) as forced_perf, \
                LossNamespace(prefix="rtvm") as ns:
            programs = {"ringbuf": probed, "perfbuf": forced_perf}
            for mode, program in programs.items():
                result["programs"][mode] = {"uses_ringbuf": program.uses_ringbuf, "tracefs": str(program.tracefs),
                                            "features": program.features.describe(), "drained_events": 0}
            result["seconds"]["attached"] = round(time.monotonic() - started, 1)
            print(f"vm_scenarios: {result['kernel']['release']}: programs attached after {result['seconds']['attached']} s "
                  f"(ring buffer probed: {probed.uses_ringbuf})", flush=True)
            before_ref = (0, 0)
            before = {mode: (0, 0) for mode in MODES}
            for scenario in SCENARIOS:
                connections = scenario.run(ns, scenario.port)
                raw = reference.read_sockets()   # as the tracepoint reports them
                wire = reference.read()          # as on the wire (refcount.on_the_wire)
                keep = _on_port(scenario.port)
                expected = per_flow(wire, lambda e: keep(e) and succeeded(e))
                ref_totals = _reference_totals(wire)
                entry = {
                    "port": scenario.port, "family": scenario.family, "connections": connections,
                    "expected": {
                        "flows": _flow_rows(expected), "by_family": _by_family(expected),
                        "retransmits": ref_totals[0] - before_ref[0],
                        "synack_retransmits": ref_totals[1] - before_ref[1],
                    },
                    # what the tracepoint said before the wire view (dual-stack: IPv6 family, v4-mapped)
                    "reference_raw": _flow_rows(per_flow(raw, lambda e: keep(e) and succeeded(e))),
                    "programs": {}, "mismatches": [],
                }
                before_ref = ref_totals
                for mode, program in programs.items():
                    snapshot = program.snapshot()
                    drained = program.drain_events()
                    result["programs"][mode]["drained_events"] += len(drained)
                    got = _snapshot_flows(snapshot, scenario.port)
                    entry["programs"][mode] = {
                        "flows": _flow_rows(got), "by_family": _by_family(got),
                        "retransmits": snapshot.retransmits - before[mode][0],
                        "synack_retransmits": snapshot.synack_retransmits - before[mode][1],
                        "lost_events": snapshot.lost_events, "sampled_events": snapshot.sampled_events,
                        "missed_events": snapshot.missed_events,
                    }
                    before[mode] = (snapshot.retransmits, snapshot.synack_retransmits)
                    mine = entry["programs"][mode]
                    for what in ("flows", "by_family", "retransmits", "synack_retransmits"):
                        if mine[what] != entry["expected"][what]:
                            entry["mismatches"].append(f"{mode} {what}: {mine[what]} != reference {entry['expected'][what]}")
                families = set(entry["expected"]["by_family"])
                if families != {scenario.family}:
                    entry["mismatches"].append(f"reference flows have families {sorted(families)}, want {scenario.family}")
                total = entry["expected"]["retransmits"] + entry["expected"]["synack_retransmits"]
                if total == 0:
                    entry["mismatches"].append("the scenario made no retransmits")
                entry["matched"] = not entry["mismatches"]
                result["seconds"][scenario.name] = round(time.monotonic() - started, 1)
                all_matched &= entry["matched"]
                result["scenarios"][scenario.name] = entry
                print(f"vm_scenarios: {scenario.name} (at {result['seconds'][scenario.name]} s): "
                      f"reference {entry['expected']['retransmits']} retransmits, "
                      f"{entry['expected']['synack_retransmits']} SYN-ACK, {len(expected)} flows: "
                      + ("matched" if entry["matched"] else "MISMATCH " + "; ".join(entry["mismatches"])), flush=True)
                save()
            # byState over the whole run; SYN-ACK retransmits have no state, the agent files them under SYN_RECV
            states: Counter = Counter()
            for e, n in reference.read().items():
                if succeeded(e):
                    states["SYN_RECV" if e.synack else e.state] += n
            result["expected_by_state"] = dict(states)
            for mode, program in programs.items():
                snapshot = program.snapshot()
                info = result["programs"][mode]
                info.update(sampled_events=snapshot.sampled_events, lost_events=snapshot.lost_events,
                            by_state=snapshot.by_state)
                if snapshot.by_state != result["expected_by_state"]:
                    all_matched = False
                    info["by_state_mismatch"] = f"{snapshot.by_state} != reference {result['expected_by_state']}"
                # every counted event was handed to user space or counted as lost, and what
                # was handed over came through this mode's buffer
                if snapshot.sampled_events + snapshot.lost_events != snapshot.retransmits + snapshot.synack_retransmits \
                        or info["drained_events"] != snapshot.sampled_events or info["drained_events"] == 0:
                    all_matched = False
                    info["mismatch"] = (f"sampled {snapshot.sampled_events} + lost {snapshot.lost_events} vs counted "
                                        f"{snapshot.retransmits + snapshot.synack_retransmits}; drained {info['drained_events']}")
        # Causes through this kernel's own BTF: random loss on a bulk transfer, one segment per skb
        with LossNamespace(prefix="rtvmc") as ns, \
                RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
            one_segment_per_skb(ns)
            before = tcp_ext(ns)
            loads.bulk(ns, loss=3, port=5401, connections=2, nbytes=512 << 10)
            counters = delta(before, tcp_ext(ns))
            snapshot = program.snapshot()
            causes = {"sock_offsets": dict(program.features.sock.defines) if program.features.sock else None,
                      "sock_problem": program.features.sock_problem, "by_cause": snapshot.by_cause,
                      "counters": counters,
                      "mismatches": cause_mismatches(snapshot.by_cause, counters,
                                                     snapshot.retransmits + snapshot.synack_retransmits)}
            result["causes"] = causes
            all_matched = all_matched and not causes["mismatches"] and causes["sock_offsets"] is not None
            print(f"vm_scenarios: causes {snapshot.by_cause} against TcpExt {counters}: "
                  + ("matched" if not causes["mismatches"] else "MISMATCH " + "; ".join(causes["mismatches"])), flush=True)
    except Exception:
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
        all_matched = False
    result["matched"] = all_matched
    save()
    return all_matched


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.vm_scenarios")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    sys.exit(0 if run(args.out) else 1)


if __name__ == "__main__":
    main()
