"""On a second real kernel (Debian bookworm's 6.1, booted by virtme-ng) the agent counts exactly.

One boot for the whole module: tests/harness/vm_scenarios.py runs inside the VM, opens the
agent's kernel program with the ring buffer the probe picks and with a forced perf buffer,
next to the independent reference counter, makes real retransmits under nftables loss, and
writes expectations and observations as JSON into the VM's rwdir. These tests assert on
that JSON. `make kernel-vm` installs the kernel, qemu and virtme-ng; when the VM cannot
boot, every test here fails with the reason.
"""

from __future__ import annotations

import json
import ipaddress

import pytest

from tests.harness.kernelvm import run_in_vm

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(1500)]

MODES = ("ringbuf", "perfbuf")
SCENARIOS = {   # name -> the family of every flow, as on the wire
    "ipv4": "IPv4", "ipv6": "IPv6", "dualstack": "IPv4", "syn": "IPv4", "synack": "IPv4", "dualstack_synack": "IPv4",
}


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    """(exit status, vng output, result JSON) of one boot running every scenario."""
    rwdir = tmp_path_factory.mktemp("kernelvm")
    run = run_in_vm(".venv/bin/python -m tests.harness.vm_scenarios --out {rwdir}/result.json", rwdir, timeout=1200)
    # the guest's one line per scenario (counts and verdict): shown with -s or -rA
    print("\n".join(line for line in run.output.splitlines() if line.startswith("vm_scenarios:")))
    path = rwdir / "result.json"
    assert path.is_file(), f"the VM wrote no result (exit {run.returncode}); vng output:\n{run.output[-6000:]}"
    result = json.loads(path.read_text())
    assert not result.get("error"), f"the guest scenario failed:\n{result['error']}\nvng output:\n{run.output[-3000:]}"
    return run.returncode, run.output, result


def test_guest_runs_debian_6_1_not_the_host_kernel(vm):
    _, _, result = vm
    assert result["kernel"]["release"].startswith("6.1.")
    fields = result["kernel"]["fields"]
    # 6.1's layout: state and family, no err (that came in 6.17)
    assert {"state", "family"} <= set(fields["tcp_retransmit_skb"])
    assert "err" not in fields["tcp_retransmit_skb"]


def test_both_buffer_modes_delivered_samples(vm):
    _, _, result = vm
    programs = result["programs"]
    assert programs["ringbuf"]["uses_ringbuf"] is True, "6.1 has BPF ring buffers: the probe must find them"
    assert programs["perfbuf"]["uses_ringbuf"] is False
    for mode in MODES:
        info = programs[mode]
        assert info["drained_events"] == info["sampled_events"] > 0, mode
        assert "mismatch" not in info, info.get("mismatch")
        assert info["by_state"] == result["expected_by_state"], mode


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_matches_reference_per_flow_and_family(vm, name):
    _, _, result = vm
    scenario = result["scenarios"][name]
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
    _, _, result = vm
    scenario = result["scenarios"][name]
    assert scenario["expected"]["synack_retransmits"] > 0
    servers = {(c["server"][0], c["server"][1], c["client"][1]) for c in scenario["connections"]}
    synack_flows = {(row[1], row[2], row[4]) for row in scenario["expected"]["flows"] if row[6] > 0}
    assert synack_flows == servers


@pytest.mark.parametrize("name", ["dualstack", "dualstack_synack"])
def test_dual_stack_server_is_counted_as_ipv4_with_plain_addresses(vm, name):
    _, _, result = vm
    scenario = result["scenarios"][name]
    port = scenario["port"]
    # the tracepoint really saw an IPv6 socket on the server side (v4-mapped addresses) ...
    raw_server = [row for row in scenario["reference_raw"] if row[2] == port]
    assert raw_server, "the dual-stack server retransmitted nothing"
    assert all(row[0] == "IPv6" and ipaddress.IPv6Address(row[1]).ipv4_mapped for row in raw_server)
    # ... and the agent reports those flows as IPv4 with the plain IPv4 addresses
    server_ip = scenario["connections"][0]["server"][0]
    for mode in MODES:
        server_side = [row for row in scenario["programs"][mode]["flows"] if row[2] == port]
        assert len(server_side) == len(raw_server), mode
        assert all(row[0] == "IPv4" and row[1] == server_ip for row in server_side), (mode, server_side)


def test_vm_exit_status_says_everything_matched(vm):
    returncode, output, result = vm
    assert result["matched"], {k: v["mismatches"] for k, v in result["scenarios"].items() if v["mismatches"]}
    assert returncode == 0, output[-3000:]


def test_causes_come_from_the_guests_own_btf_and_agree_with_its_counters(vm):
    """6.1's tcp_sock has another layout than this host's kernel: the guest resolved its own
    offsets from its own /sys/kernel/btf/vmlinux, and random loss is fast retransmits there."""
    from retransmit_agent.kernelinfo import resolve_sock_offsets

    _, _, result = vm
    causes = result["causes"]
    assert causes["sock_offsets"] is not None, causes["sock_problem"]
    host, _problem = resolve_sock_offsets("/sys/kernel/btf/vmlinux")
    assert host is not None and causes["sock_offsets"] != dict(host.defines)
    assert causes["mismatches"] == []
    by_cause = causes["by_cause"]
    assert by_cause.get("fast", 0) > 0 and max(by_cause, key=by_cause.get) == "fast", by_cause
