"""On Debian's own kernels, booted by virtme-ng, the agent counts exactly: 12's 6.1 and 11's 5.10.

One boot per kernel for the whole module (the `vm` fixture is parametrized by kernel, and
pytest runs every test of one kernel before booting the next): tests/harness/vm_scenarios.py
runs inside, and its SECTIONS write expectations and observations as JSON into the VM's
rwdir. `check`: what `retransmit-agent check` says about the kernel. `counting`: the agent's
program with the ring buffer the probe picks and with a forced perf buffer, next to the
independent reference counter, through real retransmits under nftables loss. `causes`:
timeout / fast / probe from the guest's own BTF. These tests assert on that JSON. 5.10 is
the real old layout: its tracepoints have no `family` (the fields after `dport` sit two
bytes earlier) and skb:kfree_skb has no drop `reason`.

`ratio`: each flow's segment counters (data_segs_out, total_retrans) against its sender's
TCP_INFO, and the namespace's segment counters read through /proc/PID/net/snmp against its
own. `drops`: drops by reason against a counted nftables rule on 6.1; on 5.10 (no `reason`
in skb:kfree_skb) off, counting nothing, with `check` saying why. `make kernel-vm` provides
the kernels, qemu and virtme-ng; when a VM cannot boot, that kernel's tests fail with the reason.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

import pytest

from retransmit_core.ratio import retransmit_ratio
from tests.harness.dropcheck import NETFILTER_DROP, within_misses
from tests.harness.kernelvm import KERNELS, run_in_vm
from tests.harness.loads import MAX_SEGMENTS_PER_SKB

# Each kernel's first test also boots it: ~4-8 minutes on 2 loaded cores under emulation.
pytestmark = [pytest.mark.kernel, pytest.mark.timeout(2400)]

MODES = ("ringbuf", "perfbuf")
SCENARIOS = {   # name -> the family of every flow, as on the wire
    "ipv4": "IPv4", "ipv6": "IPv6", "dualstack": "IPv4", "syn": "IPv4", "synack": "IPv4", "dualstack_synack": "IPv4",
}


@dataclass(frozen=True)
class Kernel:
    """What a kernel is known to offer, from Debian's own builds (and its format files)."""

    release_prefix: str
    family: bool            # tcp_retransmit_skb / tcp_retransmit_synack have `family` (5.12+)
    drop_reason: bool       # skb:kfree_skb has `reason` (5.17+)
    headers: str            # how `check` describes the headers bcc compiles against


KNOWN = {
    "6.1": Kernel("6.1.", family=True, drop_reason=True, headers="(matching)"),
    # no 5.10 headers exist here: bcc compiles against 6.1's (make kernel-vm links them)
    "5.10": Kernel("5.10.", family=False, drop_reason=False, headers="(generic, from 6.1."),
}
assert set(KNOWN) == set(KERNELS)


@pytest.fixture(scope="module", params=KERNELS, ids=[f"debian-{k}" for k in KERNELS])
def vm(request, tmp_path_factory):
    """(kernel, exit status, vng output, result JSON) of one boot running every section."""
    kernel = request.param
    rwdir = tmp_path_factory.mktemp(f"kernelvm-{kernel}")
    run = run_in_vm(".venv/bin/python -m tests.harness.vm_scenarios --out {rwdir}/result.json", rwdir,
                    kernel=kernel, timeout=2100)
    # the guest's one line per section and scenario (counts and verdict): shown with -s or -rA
    print(f"\n{run.release}: boot, sections and power-off took {run.seconds} s")
    print("\n".join(line for line in run.output.splitlines() if line.startswith("vm_scenarios:")))
    path = rwdir / "result.json"
    assert path.is_file(), f"the {kernel} VM wrote no result (exit {run.returncode}); vng output:\n{run.output[-6000:]}"
    result = json.loads(path.read_text())
    assert result["kernel"]["release"] == run.release
    return kernel, run.returncode, run.output, result


def section(vm, name: str) -> dict:
    """The result of one section; a section that raised fails the test with its traceback."""
    _, _, output, result = vm
    assert name not in result["errors"], f"section {name} raised:\n{result['errors'][name]}\nvng output:\n{output[-3000:]}"
    return result[name]


def test_guest_runs_the_debian_kernel_with_its_own_tracepoint_layout(vm):
    kernel, _, _, result = vm
    known = KNOWN[kernel]
    assert result["kernel"]["release"].startswith(known.release_prefix)
    fields = result["kernel"]["fields"]
    for tracepoint in ("tcp_retransmit_skb", "tcp_retransmit_synack"):
        assert ("family" in fields[tracepoint]) is known.family, (tracepoint, fields[tracepoint])
    assert "state" in fields["tcp_retransmit_skb"]
    assert "err" not in fields["tcp_retransmit_skb"]   # that came in 6.17
    assert fields["kfree_skb"] is not None and ("reason" in fields["kfree_skb"]) is known.drop_reason


def test_check_says_which_paths_the_agent_takes(vm):
    kernel, _, _, _ = vm
    known = KNOWN[kernel]
    check = section(vm, "check")
    assert check["returncode"] == 0, check["stderr"]
    assert check["report"]["canCount"] is True
    lines = {line["name"]: line for line in check["report"]["checks"]}
    family = "yes" if known.family else "no"
    assert lines["tracepoint tcp:tcp_retransmit_skb"]["detail"] == \
        f"present; optional fields: state yes (5.0+), family {family} (5.12+), err no (6.17+)"
    assert lines["kernel"]["detail"].startswith(f"Linux {known.release_prefix}")
    assert lines["ring buffer"]["status"] == "ok"          # 5.8+
    assert lines["bpf_jiffies64"]["status"] == "ok"        # 5.5+
    assert lines["missed events"]["status"] == "degraded"  # recursion_misses: 6.7+
    assert lines["retransmit causes"]["status"] == "ok"    # BTF on both
    assert lines["kernel headers"]["status"] == "ok" and known.headers in lines["kernel headers"]["detail"]
    # drop reasons need skb:kfree_skb's `reason` (5.17+): counted on 6.1, off on 5.10 with the reason stated
    if known.drop_reason:
        assert lines["drop reasons"]["status"] == "ok", lines["drop reasons"]
    else:
        assert lines["drop reasons"]["status"] == "degraded"
        assert lines["drop reasons"]["detail"].startswith("off: skb:kfree_skb has no `reason` field (added in Linux 5.17)")
    assert lines["mode"]["detail"] == ("exact per-flow counts (IPv4, IPv6, dual-stack as IPv4); by TCP state; "
                                       "causes from BTF; no failed attempts (kernel does not report them); ring buffer")


def test_program_compiled_for_this_kernels_layout(vm):
    kernel, _, _, _ = vm
    family = "yes" if KNOWN[kernel].family else "no"
    programs = section(vm, "counting")["programs"]
    for mode in MODES:
        assert programs[mode]["switches"] == ["HAVE_SKB_STATE"], mode
        assert programs[mode]["features"].startswith(f"tracepoint fields: state yes, family {family}, err no; "), mode


def test_both_buffer_modes_delivered_samples(vm):
    counting = section(vm, "counting")
    programs = counting["programs"]
    assert programs["ringbuf"]["uses_ringbuf"] is True, "6.1 and 5.10 have BPF ring buffers: the probe must find them"
    assert programs["perfbuf"]["uses_ringbuf"] is False
    for mode in MODES:
        info = programs[mode]
        assert info["drained_events"] == info["sampled_events"] > 0, mode
        assert "mismatch" not in info, info.get("mismatch")
        assert info["by_state"] == counting["expected_by_state"], mode


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_matches_reference_per_flow_and_family(vm, name):
    scenario = section(vm, "counting")["scenarios"][name]
    expected = scenario["expected"]
    assert expected["retransmits"] + expected["synack_retransmits"] > 0, f"{name} made no retransmits"
    assert set(expected["by_family"]) == {SCENARIOS[name]}
    for mode in MODES:
        got = scenario["programs"][mode]
        assert got["flows"] == expected["flows"], f"{mode}: per-flow counts differ from the reference"
        assert got["by_family"] == expected["by_family"], mode
        assert got["retransmits"] == expected["retransmits"], mode
        assert got["synack_retransmits"] == expected["synack_retransmits"], mode
    assert scenario["matched"], scenario["mismatches"]


@pytest.mark.parametrize("name", ["synack", "dualstack_synack"])
def test_synack_scenarios_retransmit_synacks_on_the_server(vm, name):
    scenario = section(vm, "counting")["scenarios"][name]
    assert scenario["expected"]["synack_retransmits"] > 0
    servers = {(c["server"][0], c["server"][1], c["client"][1]) for c in scenario["connections"]}
    synack_flows = {(row[1], row[2], row[4]) for row in scenario["expected"]["flows"] if row[6] > 0}
    assert synack_flows == servers


@pytest.mark.parametrize("name", ["dualstack", "dualstack_synack"])
def test_dual_stack_server_is_counted_as_ipv4_with_plain_addresses(vm, name):
    scenario = section(vm, "counting")["scenarios"][name]
    port = scenario["port"]
    # the server really was an IPv6 socket (v4-mapped addresses; on 5.10 the reference reads
    # the family from the socket, the tracepoints having none) ...
    raw_server = [row for row in scenario["reference_raw"] if row[2] == port]
    assert raw_server, "the dual-stack server retransmitted nothing"
    assert all(row[0] == "IPv6" and ipaddress.IPv6Address(row[1]).ipv4_mapped for row in raw_server)
    # ... and the agent reports those flows as IPv4 with the plain IPv4 addresses
    server_ip = scenario["connections"][0]["server"][0]
    for mode in MODES:
        server_side = [row for row in scenario["programs"][mode]["flows"] if row[2] == port]
        assert len(server_side) == len(raw_server), mode
        assert all(row[0] == "IPv4" and row[1] == server_ip for row in server_side), (mode, server_side)


def test_causes_come_from_the_guests_own_btf_and_agree_with_its_counters(vm):
    """The guest's tcp_sock has another layout than this host's kernel: it resolved its own
    offsets from its own /sys/kernel/btf/vmlinux, and random loss is fast retransmits there."""
    from retransmit_agent.kernelinfo import resolve_sock_offsets

    causes = section(vm, "causes")
    assert causes["sock_offsets"] is not None, causes["sock_problem"]
    host, _problem = resolve_sock_offsets("/sys/kernel/btf/vmlinux")
    assert host is not None and causes["sock_offsets"] != dict(host.defines)
    assert causes["mismatches"] == []
    by_cause = causes["by_cause"]
    assert by_cause.get("fast", 0) > 0 and max(by_cause, key=by_cause.get) == "fast", by_cause


def check_lines(vm) -> dict[str, dict]:
    return {line["name"]: line for line in section(vm, "check")["report"]["checks"]}


def test_flow_segment_counters_are_the_connections_own(vm):
    """data_segs_out (4.6+) and total_retrans at the guest's own BTF offsets, against the
    sender's TCP_INFO: within the read interval's bounds during a lossy bulk, equal on a dead path."""
    ratio = section(vm, "ratio")
    assert ratio["segs"] is True, (ratio["segs_problem"], ratio["sock_problem"])
    assert check_lines(vm)["retransmit causes"]["detail"].endswith(
        ", and its connection's segments sent and retransmitted")
    bulk = ratio["bulk"]
    flow, end, floor = bulk["flow"], bulk["sender_end"], bulk["floor"]
    assert flow["retransmits"] > 0
    assert 0 < flow["total_retrans"] <= end["total_retrans"], (flow, end)
    assert 0 < flow["data_segs_out"] <= end["data_segs_out"], (flow, end)
    assert floor["total_retrans"] <= flow["total_retrans"] and floor["data_segs_out"] <= flow["data_segs_out"], (floor, flow)
    assert flow["ratio"] == retransmit_ratio(flow["total_retrans"], flow["data_segs_out"]) > 0
    assert bulk["mismatches"] == []
    dead = ratio["dead_path"]
    assert dead["sender"]["total_retrans"] > dead["queued"]["total_retrans"]
    assert dead["flow"] == [dead["sender"]["total_retrans"], dead["sender"]["data_segs_out"]]


def test_namespace_segment_counters_read_through_proc_are_its_own(vm):
    namespace = section(vm, "ratio")["namespace"]
    assert namespace["through_proc"] == namespace["inside"]
    out_segs, retrans_segs = namespace["during"]
    events, missed = namespace["events"], namespace["missed"]
    assert out_segs > namespace["min_out_segs"] > 0
    assert 0 < events <= retrans_segs <= (events + missed) * MAX_SEGMENTS_PER_SKB, namespace
    assert namespace["mismatches"] == []


def test_drops_counted_by_reason_with_the_reason_field_else_off_and_check_says_why(vm):
    kernel, _, _, _ = vm
    drops = section(vm, "drops")
    # the load made drops (the rule's counter) and the client's retransmits were counted, on both
    assert drops["dropped_by_rule"] > 0 and drops["retransmits"] > 0, drops
    assert "tcp_retransmit_skb" in drops["probes"]
    line = check_lines(vm)["drop reasons"]
    if KNOWN[kernel].drop_reason:
        assert drops["counts_drops"] is True and drops["problem"] == "", drops["problem"]
        assert "kfree_skb" in drops["probes"]
        dropped, missed = drops["dropped_by_rule"], drops["missed"]
        assert within_misses(drops["by_reason"].get(NETFILTER_DROP, 0), dropped, missed), drops["by_reason"]
        server, port = drops["server"]
        netfilter = [row for row in drops["flows"] if NETFILTER_DROP in row[7]]
        assert netfilter and all(row[:3] == ["IPv4", server, port] and row[6] == 0 for row in netfilter), netfilter
        assert within_misses(sum(row[7][NETFILTER_DROP] for row in netfilter), dropped, missed)
        assert drops["mismatches"] == []
        assert line["status"] == "ok", line
    else:
        why = "skb:kfree_skb has no `reason` field (added in Linux 5.17)"
        assert drops["counts_drops"] is False and drops["problem"] == why
        assert "kfree_skb" not in drops["probes"]
        assert drops["by_reason"] is None and drops["flows"] is None
        assert (line["status"], line["detail"]) == ("degraded", f"off: {why}; retransmits counted as before")


# sock_cgroup_data's layout: the `cgroup` pointer since 5.15, the older `val` word before.
CGROUP_VAL_LAYOUT = {"6.1": False, "5.10": True}


def test_each_flow_carries_its_sockets_cgroup_through_the_guests_own_btf(vm):
    """Both layouts read, or the reason why not stated: the flows of a load run in a pod-like
    cgroup carry that cgroup's id, and per-(address, cgroup) counts equal the reference."""
    kernel, _, _, _ = vm
    cgroups = section(vm, "cgroups")
    assert cgroups["offsets"] is not None, f"the {kernel} guest read no socket cgroups: {cgroups['problem']}"
    assert cgroups["offsets"]["val_layout"] is CGROUP_VAL_LAYOUT[kernel], cgroups["offsets"]
    assert cgroups["cgroup_id"] > 0 and cgroups["flow_cgroups"] == [cgroups["cgroup_id"]], cgroups
    assert sum(cgroups["expected"].values()) > 0
    assert cgroups["by_owner"] == sorted([ip, cgroups["cgroup_id"], n] for ip, n in cgroups["expected"].items())
    # `check` ran before the section mounted anything: it names sockets by cgroup where the guest
    # had cgroup v2, else by address with the reason.
    line = check_lines(vm)["socket owners"]
    if cgroups["mounted"]:
        assert line["status"] == "degraded" and line["detail"].startswith("address: ") and \
            "no host cgroup2 hierarchy" in line["detail"], line
    else:
        assert line["status"] == "ok", line


def test_vm_exit_status_says_every_section_matched(vm):
    _, returncode, output, result = vm
    assert result["errors"] == {}, result["errors"]
    assert result["matched"] and all(result["sections"].values()), result["sections"]
    assert returncode == 0, output[-3000:]
