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
- `ratio`: each flow's segment counters (data_segs_out, total_retrans, through the guest's own
  BTF) against its sender's TCP_INFO, within bounds during a lossy bulk transfer and equal on
  a dead path; and the namespace's OutSegs / RetransSegs read through /proc/PID/net/snmp (the
  agent's segments.py) against its own /proc/net/snmp and the program's retransmit events
  (tests/harness/ratiocheck.py, as tests/kernel/test_ratio.py compares on the host).
- `cgroups`: each new flow's socket cgroup through the guest's own BTF (6.1's
  sock_cgroup_data pointer, 5.10's older `val` word) for a load run in a pod-like cgroup, per
  (address, cgroup) counts against the reference; where unreadable, the reason.
- `drops`: a counted nftables drop rule under a bulk transfer, traced by the program with
  drops on: on a kernel whose skb:kfree_skb has `reason` (6.1), NETFILTER_DROP in total and
  per flow equals the rule's counter (tests/harness/dropcheck.py, as tests/kernel/test_drops.py
  on the host); without it (5.10), why drops are off, and that the program counts none.

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
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from retransmit_agent.kernel import KernelConfig, KernelSnapshot, RetransmitProgram
from retransmit_agent.preflight import TRACEPOINTS, find_tracefs
from retransmit_agent.segments import read_tcp_segments
from tests.harness import loads, ratiocheck
from tests.harness.causecheck import cause_mismatches, delta, one_segment_per_skb, tcp_ext
from tests.harness.dropcheck import drop_client_data, netfilter_drop_mismatches, nft_dropped, run_driver
from tests.harness.netns import LossNamespace
from tests.harness.refcount import ReferenceCounter, per_flow, succeeded

# Small loads: the guest runs under software emulation (no KVM), roughly 10x slower than the host.
LOSS = 10
CONNECTIONS = 2
NBYTES = 256 << 10
# The ratio's one connection: ~720 segments, ~40 retransmits at LOSS: seconds under
# emulation, so the program reads its counters many times during the transfer.
RATIO_BYTES = 1 << 20


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


def ratio_section(started: float) -> tuple[dict, bool]:
    """The flows' segment counters against the sender's TCP_INFO; the namespace's segment
    counters read through /proc/PID/net/snmp against its own and the program's events."""
    with LossNamespace(prefix="rtvmr") as ns, \
            RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
        sock = program.features.sock
        entry: dict = {"segs": bool(sock and sock.segs), "segs_problem": sock.segs_problem if sock else None,
                       "sock_problem": program.features.sock_problem, "features": program.features.describe()}
        # 1. the namespace's counters, through a process inside it, during a lossy duplex bulk
        with ratiocheck.namespace_snmp(ns) as path:
            start, before = read_tcp_segments(path), program.snapshot()
            loads.bulk(ns, loss=LOSS, port=5431, connections=CONNECTIONS, nbytes=NBYTES)
            during = read_tcp_segments(path).since(start)
            after = program.snapshot()
            through_proc, inside = read_tcp_segments(path), ratiocheck.namespace_segments(ns)
        events, missed = after.retransmits - before.retransmits, after.missed_events or 0
        min_out_segs = CONNECTIONS * NBYTES // 1448
        entry["namespace"] = {
            "through_proc": [through_proc.out_segs, through_proc.retrans_segs],
            "inside": [inside.out_segs, inside.retrans_segs],
            "during": [during.out_segs, during.retrans_segs], "events": events, "missed": missed,
            "min_out_segs": min_out_segs,
            "mismatches": ratiocheck.namespace_segment_mismatches(through_proc, inside, during, events, missed, min_out_segs)}
        mismatches = list(entry["namespace"]["mismatches"])
        if entry["segs"]:
            sender = ratiocheck.SegSender(ns, 5432)
            try:
                # 2. one connection's counters during a lossy bulk, within the read interval's bounds
                ns.random_loss(LOSS)
                end = sender.ask(f"bulk {RATIO_BYTES}")
                ns.clear_loss()
                flow = ratiocheck.sender_flow(program, sender.client)
                socket = flow.socket if flow else None
                entry["bulk"] = {
                    "flow": {"retransmits": flow.retransmits if flow else 0,
                             "total_retrans": socket.total_retrans if socket else None,
                             "data_segs_out": socket.data_segs_out if socket else None,
                             "ratio": flow.to_flow().retrans_ratio if flow else None},
                    "sender_end": {k: v for k, v in end.items() if k != "samples"},
                    "floor": ratiocheck.floor_counters(flow, end["samples"]) if flow else None,
                    "samples": len(end["samples"]),
                    "mismatches": ratiocheck.bulk_counter_mismatches(flow, end)}
                mismatches += entry["bulk"]["mismatches"]
                # 3. a dead path: retransmits on timeouts, each reading the counters: equal
                ns.drop_everything()
                queued = sender.ask("send 1")
                entry["dead_path"] = {"queued": queued, **ratiocheck.wait_for_equal_counters(program, sender, queued)}
            finally:
                ns.clear_loss()
                sender.close()
        else:
            mismatches.append(f"no segment counters per flow: {entry['segs_problem'] or entry['sock_problem']}")
    entry["mismatches"] = mismatches
    bulk = entry.get("bulk", {})
    print(f"vm_scenarios: ratio: flow {bulk.get('flow')} against its sender's {bulk.get('sender_end')}; "
          f"dead path {entry.get('dead_path', {}).get('flow')}; namespace {entry['namespace']['during']} "
          f"segments for {events} events: " + ("matched" if not mismatches else "MISMATCH " + "; ".join(mismatches)),
          flush=True)
    return entry, not mismatches


def drops_section(started: float) -> tuple[dict, bool]:
    """A counted nftables rule drops 10% of a bulk's data segments: on a kernel with drop
    reasons the program's NETFILTER_DROP equals its counter; on one without, it counts none
    (and says why). Both ends are traced: the client's retransmits count as before, and each
    drop counts at the server, the end the packet was inbound to."""
    with LossNamespace(prefix="rtvmd") as ns:
        client, server = ns.v4
        port = 5441
        drop_client_data(ns, client, server, port, percent=10)
        with RetransmitProgram.open(KernelConfig(local_ips=frozenset({client, server}))) as program:
            connections = run_driver(ns, "tests.harness.traffic", "bulk", "--server-ip", server, "--client-ip", client,
                                     "--port", str(port), "--connections", str(CONNECTIONS), "--bytes", str(NBYTES))
            snapshot = program.snapshot()
            probes = sorted(program.kernel_cost())
        dropped = nft_dropped(ns)
    drops = snapshot.drops
    entry = {"counts_drops": program.counts_drops, "problem": program.drop_support.problem, "probes": probes,
             "server": [server, port], "dropped_by_rule": dropped, "retransmits": snapshot.retransmits,
             "by_reason": drops.by_reason if drops else None, "missed": drops.missed if drops else None,
             "flows": sorted([f.family, f.local_ip, f.local_port, f.remote_ip, f.remote_port, f.inbound, f.outbound,
                              dict(f.by_reason)] for f in drops.flows) if drops else None}
    if program.counts_drops:
        entry["mismatches"] = netfilter_drop_mismatches(drops, dropped, connections, server, port, "IPv4")
    else:   # the program has no kfree_skb probe, so nothing to compare: it must count no drops
        entry["mismatches"] = [] if drops is None else [f"drops off ({entry['problem']}) but counted {drops}"]
    if dropped == 0 or snapshot.retransmits == 0:
        entry["mismatches"].append(f"the rule dropped {dropped} and the program counted {snapshot.retransmits} "
                                   "retransmits: the load proves nothing")
    print(f"vm_scenarios: drops ({'on' if program.counts_drops else 'off: ' + entry['problem']}): "
          f"{entry['by_reason']} against the rule's {dropped}, {snapshot.retransmits} retransmits: "
          + ("matched" if not entry["mismatches"] else "MISMATCH " + "; ".join(entry["mismatches"])), flush=True)
    return entry, not entry["mismatches"]


# What one boot runs, in order: (key in the result, section). Each section returns (its JSON
# entry, whether it matched); an exception fails that section alone, with its traceback.
# A new kernel feature to check on both kernels becomes a section here, with its assertions in
# tests/kernel/test_vm_kernels.py, so both kernels run it in the boots they already have.
def cgroups_section(started: float) -> tuple[dict, bool]:
    """Each new flow's socket cgroup, read through the guest's own BTF (6.1: sock_cgroup_data's
    `cgroup` pointer; 5.10: the older `val` word): a lossy load run by a process in a pod-like
    cgroup of the guest's cgroup v2 hierarchy (mounted here when the guest has none), its
    flows' cgroup ids and per-(address, cgroup) counts against the reference counter. Where
    the layout cannot be read, the program says why and counts as before."""
    import uuid

    from retransmit_agent.cgroups import find_cgroup2

    root, root_problem = find_cgroup2()
    mounted = None
    if root is None:
        mounted = Path(tempfile.mkdtemp(prefix="rtvm-cgroup2-"))
        subprocess.run(["mount", "-t", "cgroup2", "none", str(mounted)], check=True)
        root, _ = find_cgroup2([str(mounted)])
    entry: dict = {"root_problem": root_problem, "mounted": mounted is not None, "root": str(root) if root else None}
    top = root / f"rtvm-{uuid.uuid4().hex[:6]}" if root is not None else None
    try:
        container = None
        if top is not None:
            container = top / "kubepods" / "besteffort" / f"pod{uuid.uuid4()}" / "main"
            container.mkdir(parents=True)
        with LossNamespace(prefix="rtvmg") as ns, ReferenceCounter() as reference, \
                RetransmitProgram.open(KernelConfig(remote_cidrs=loads.own_cidrs(ns))) as program:
            offsets = program.features.cgroup
            entry["offsets"] = None if offsets is None else {
                "sock_cgroup": offsets.sock_cgroup, "cgroup_kn": offsets.cgroup_kn,
                "kernfs_node_id": offsets.kernfs_node_id, "val_layout": offsets.val_layout}
            entry["problem"] = program.features.cgroup_problem
            loads.bulk(ns, loss=LOSS, port=5501, connections=CONNECTIONS, nbytes=NBYTES, cgroup=container)
            counts = reference.read()
            snapshot = program.snapshot()
        own = loads.own_addresses(ns)
        want: Counter = Counter()
        for e, n in counts.items():
            if e.remote_ip in own and succeeded(e):
                want[e.local_ip] += n
        cgroup_id = os.stat(container).st_ino if container is not None else 0
        read = offsets is not None and container is not None
        entry.update(cgroup_id=cgroup_id, expected={ip: n for ip, n in want.items()},
                     flow_cgroups=sorted({f.cgroup for f in snapshot.flow_counters if f.remote_ip in own}),
                     by_owner=[[ip, cgroup, n] for (ip, cgroup), n in sorted(snapshot.by_local_owner.items())
                               if ip in own])
        expected_owners = sorted([ip, cgroup_id if read else 0, n] for ip, n in want.items())
        matched = sum(want.values()) > 0 and entry["by_owner"] == expected_owners and \
            entry["flow_cgroups"] == [cgroup_id if read else 0]
    finally:
        if top is not None:
            from tests.harness.nodesim.cgroups import remove_tree
            remove_tree(top, root)
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)
    print(f"vm_scenarios: cgroups {'read at ' + str(entry['offsets']) if entry['offsets'] else 'not read: ' + entry['problem']}"
          f"; flows carry {entry['flow_cgroups']} (the load's cgroup {entry['cgroup_id']}): "
          + ("matched" if matched else "MISMATCH"), flush=True)
    return entry, matched


SECTIONS: tuple[tuple[str, Callable[[float], tuple[dict, bool]]], ...] = (
    ("check", check_section),
    ("counting", counting_section),
    ("causes", causes_section),
    ("ratio", ratio_section),
    ("drops", drops_section),
    ("cgroups", cgroups_section),
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
