"""Guest side of the VM kernel layer: the agent against the reference counter on a Debian kernel.

Runs as root inside a VM (tests/harness/kernelvm.py: Debian 12's 6.1 or Debian 11's 5.10),
from the checkout's .venv:

    python -m tests.harness.vm_scenarios --out RWDIR/result.json

One boot runs every section in SECTIONS, each into its own key of the JSON result:

- `check`: `retransmit-agent check --output json`, as a person would run it: which paths
  the agent takes on this kernel (optional tracepoint fields, buffer, clock, causes, headers).
- `counting`: the agent's RetransmitProgram twice (the buffer the kernel probe picks, a ring
  buffer on 6.1 and 5.10, and a forced perf buffer) next to the independent ReferenceCounter,
  through real retransmits in one private loss namespace, one scenario after the other, each
  on its own server port: IPv4 and IPv6 bulk, dual-stack bulk (an IPv6 socket on `[::]` with
  IPv4 clients), SYN retransmits, SYN-ACK retransmits (plain and dual-stack). After each
  scenario it compares, per program, the scenario's flows and the totals gained since the
  previous scenario with the reference's as the wire shows them (ReferenceCounter.read: an
  IPv6 socket talking IPv4 is an IPv4 flow with plain addresses); the reference's view by
  socket (read_sockets) is kept too.
- `causes`: timeout / fast / probe through the guest's own BTF against its TcpExt counters.

`kernel` holds the release and the fields of the tracepoints' format files, read here
rather than by the agent. Writes expectations and observations as JSON; exits 0 only when
every section matched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def _kernel_facts() -> dict:
    tracefs = find_tracefs()
    fields = {event: _format_fields(tracefs / "events" / category / event / "format") for category, event in TRACEPOINTS}
    kfree_skb = tracefs / "events" / "skb" / "kfree_skb" / "format"   # drop reasons (5.17+) live here
    fields["kfree_skb"] = _format_fields(kfree_skb) if kfree_skb.is_file() else None
    return {"release": os.uname().release, "fields": fields}


def check_section(started: float) -> tuple[dict, bool]:
    """`retransmit-agent check --output json` as a person runs it, from the same venv."""
    agent = Path(sys.executable).parent / "retransmit-agent"
    proc = subprocess.run([str(agent), "check", "--output", "json"], capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    entry = {"returncode": proc.returncode, "report": report, "stderr": proc.stderr[-3000:]}
    matched = proc.returncode == 0 and bool(report and report["canCount"])
    mode = next((line["detail"] for line in (report or {}).get("checks", []) if line["name"] == "mode"), proc.stderr[-300:])
    print(f"vm_scenarios: check exited {proc.returncode}: {mode}", flush=True)
    return entry, matched


def counting_section(started: float) -> tuple[dict, bool]:
    entry: dict = {"programs": {}, "scenarios": {}}
    all_matched = True
    with ReferenceCounter() as reference, \
            RetransmitProgram.open(KernelConfig()) as probed, \
            RetransmitProgram.open(KernelConfig(), ringbuf=False) as forced_perf, \
            LossNamespace(prefix="rtvm") as ns:
        programs = {"ringbuf": probed, "perfbuf": forced_perf}
        for mode, program in programs.items():
            entry["programs"][mode] = {"uses_ringbuf": program.uses_ringbuf, "tracefs": str(program.tracefs),
                                       "features": program.features.describe(),
                                       "switches": program.features.layout.switches(), "drained_events": 0}
        attached = round(time.monotonic() - started, 1)
        print(f"vm_scenarios: programs attached at {attached} s (ring buffer probed: {probed.uses_ringbuf}; "
              f"{probed.features.describe()})", flush=True)
        before_ref = (0, 0)
        before = {mode: (0, 0) for mode in MODES}
        for scenario in SCENARIOS:
            connections = scenario.run(ns, scenario.port)
            raw = reference.read_sockets()   # as the sockets say (dual-stack: IPv6 family, v4-mapped)
            wire = reference.read()          # as on the wire (refcount.on_the_wire)
            keep = _on_port(scenario.port)
            expected = per_flow(wire, lambda e: keep(e) and succeeded(e))
            ref_totals = _reference_totals(wire)
            item = {
                "port": scenario.port, "family": scenario.family, "connections": connections,
                "expected": {
                    "flows": _flow_rows(expected), "by_family": _by_family(expected),
                    "retransmits": ref_totals[0] - before_ref[0],
                    "synack_retransmits": ref_totals[1] - before_ref[1],
                },
                "reference_raw": _flow_rows(per_flow(raw, lambda e: keep(e) and succeeded(e))),
                "programs": {}, "mismatches": [],
            }
            before_ref = ref_totals
            for mode, program in programs.items():
                snapshot = program.snapshot()
                drained = program.drain_events()
                entry["programs"][mode]["drained_events"] += len(drained)
                got = _snapshot_flows(snapshot, scenario.port)
                item["programs"][mode] = {
                    "flows": _flow_rows(got), "by_family": _by_family(got),
                    "retransmits": snapshot.retransmits - before[mode][0],
                    "synack_retransmits": snapshot.synack_retransmits - before[mode][1],
                    "lost_events": snapshot.lost_events, "sampled_events": snapshot.sampled_events,
                    "missed_events": snapshot.missed_events,
                }
                before[mode] = (snapshot.retransmits, snapshot.synack_retransmits)
                mine = item["programs"][mode]
                for what in ("flows", "by_family", "retransmits", "synack_retransmits"):
                    if mine[what] != item["expected"][what]:
                        item["mismatches"].append(f"{mode} {what}: {mine[what]} != reference {item['expected'][what]}")
            families = set(item["expected"]["by_family"])
            if families != {scenario.family}:
                item["mismatches"].append(f"reference flows have families {sorted(families)}, want {scenario.family}")
            if item["expected"]["retransmits"] + item["expected"]["synack_retransmits"] == 0:
                item["mismatches"].append("the scenario made no retransmits")
            item["matched"] = not item["mismatches"]
            item["at_seconds"] = round(time.monotonic() - started, 1)
            all_matched &= item["matched"]
            entry["scenarios"][scenario.name] = item
            print(f"vm_scenarios: {scenario.name} (at {item['at_seconds']} s): "
                  f"reference {item['expected']['retransmits']} retransmits, "
                  f"{item['expected']['synack_retransmits']} SYN-ACK, {len(expected)} flows: "
                  + ("matched" if item["matched"] else "MISMATCH " + "; ".join(item["mismatches"])), flush=True)
        # byState over the whole run; SYN-ACK retransmits have no state, the agent files them under SYN_RECV
        states: Counter = Counter()
        for e, n in reference.read().items():
            if succeeded(e):
                states["SYN_RECV" if e.synack else e.state] += n
        entry["expected_by_state"] = dict(states)
        for mode, program in programs.items():
            snapshot = program.snapshot()
            info = entry["programs"][mode]
            info.update(sampled_events=snapshot.sampled_events, lost_events=snapshot.lost_events,
                        by_state=snapshot.by_state)
            if snapshot.by_state != entry["expected_by_state"]:
                all_matched = False
                info["by_state_mismatch"] = f"{snapshot.by_state} != reference {entry['expected_by_state']}"
            # every counted event was handed to user space or counted as lost, and what
            # was handed over came through this mode's buffer
            if snapshot.sampled_events + snapshot.lost_events != snapshot.retransmits + snapshot.synack_retransmits \
                    or info["drained_events"] != snapshot.sampled_events or info["drained_events"] == 0:
                all_matched = False
                info["mismatch"] = (f"sampled {snapshot.sampled_events} + lost {snapshot.lost_events} vs counted "
                                    f"{snapshot.retransmits + snapshot.synack_retransmits}; drained {info['drained_events']}")
    return entry, all_matched


def causes_section(started: float) -> tuple[dict, bool]:
    """Random loss on a bulk transfer, one segment per skb: fast retransmits, through this kernel's own BTF."""
    with LossNamespace(prefix="rtvmc") as ns, \
            RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        one_segment_per_skb(ns)
        before = tcp_ext(ns)
        loads.bulk(ns, loss=3, port=5401, connections=2, nbytes=512 << 10)
        counters = delta(before, tcp_ext(ns))
        snapshot = program.snapshot()
        entry = {"sock_offsets": dict(program.features.sock.defines) if program.features.sock else None,
                 "sock_problem": program.features.sock_problem, "by_cause": snapshot.by_cause,
                 "counters": counters,
                 "mismatches": cause_mismatches(snapshot.by_cause, counters,
                                                snapshot.retransmits + snapshot.synack_retransmits)}
    print(f"vm_scenarios: causes {snapshot.by_cause} against TcpExt {counters}: "
          + ("matched" if not entry["mismatches"] else "MISMATCH " + "; ".join(entry["mismatches"])), flush=True)
    return entry, not entry["mismatches"] and entry["sock_offsets"] is not None


# What one boot runs, in order: (key in the result, section). Each section returns (its JSON
# entry, whether it matched); an exception fails that section alone, with its traceback.
# The extension point for issue 23's newer features: counting the per-flow loss ratio and the
# drops by reason (skb:kfree_skb `reason`, 5.17+: on 6.1; on 5.10 off, which `check` already
# states) against references become sections here, with their assertions in
# tests/kernel/test_vm_kernels.py, so both kernels run them in the boots they already have.
SECTIONS: tuple[tuple[str, Callable[[float], tuple[dict, bool]]], ...] = (
    ("check", check_section),
    ("counting", counting_section),
    ("causes", causes_section),
)


def run(out: Path) -> bool:
    started = time.monotonic()
    result: dict = {"kernel": _kernel_facts(), "sections": {}, "errors": {}, "seconds": {}, "matched": False}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, sort_keys=True))

    print(f"vm_scenarios: {result['kernel']['release']}: tcp_retransmit_skb fields "
          f"{result['kernel']['fields']['tcp_retransmit_skb']}", flush=True)
    for name, section in SECTIONS:
        begun = time.monotonic()
        try:
            result[name], result["sections"][name] = section(started)
        except Exception:
            result["errors"][name] = traceback.format_exc()
            result["sections"][name] = False
            print(f"vm_scenarios: {name} failed:\n{result['errors'][name]}", file=sys.stderr, flush=True)
        result["seconds"][name] = round(time.monotonic() - begun, 1)
        save()
    result["seconds"]["total"] = round(time.monotonic() - started, 1)
    result["matched"] = all(result["sections"].values())
    save()
    return result["matched"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.vm_scenarios")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    sys.exit(0 if run(args.out) else 1)


if __name__ == "__main__":
    main()
