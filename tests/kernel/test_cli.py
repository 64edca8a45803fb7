"""`retransmit-agent local` as a user runs it: the real command in a subprocess.

Bad input exits non-zero with one line naming the problem and the fix (2: usage, 1: the
host cannot trace); `--output json` prints the node report with the kernel's exact counts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from retransmit_core.api import NodeStatus, RecentEvent
from tests.harness import loads
from tests.harness.refcount import per_flow, succeeded

pytestmark = pytest.mark.kernel

AGENT = str(Path(sys.executable).parent / "retransmit-agent")


def run_agent(*args: str, prefix: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, AGENT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fake_tracefs(tmp_path):
    """A tracefs-like folder whose tcp events lack tcp_retransmit_skb (a node without it)."""
    (tmp_path / "events" / "tcp" / "tcp_probe").mkdir(parents=True)
    return tmp_path


BAD_INPUT = [
    # (case, args, exit status, words the single line must contain)
    ("duration", ["--duration", "banana"], 2, ["--duration", "banana", "30s"]),
    ("cidr", ["--remote-cidr", "10.0.0.0/33"], 2, ["--remote-cidr", "10.0.0.0/33", "10.0.0.0/8"]),
    ("state", ["--state", "ESTABLISHD"], 2, ["--state", "ESTABLISHD", "ESTABLISHED"]),
    ("family", ["--family", "IPv5"], 2, ["--family", "IPv5", "IPv4 or IPv6"]),
    ("port", ["--port", "70000"], 2, ["--port", "70000", "1 to 65535"]),
    ("top", ["--top", "many"], 2, ["--top", "many"]),
    ("interval", ["--interval", "0s"], 2, ["--interval", "0s"]),
    ("output", ["--output", "yaml"], 2, ["--output", "yaml", "table", "json"]),
    ("unknown option", ["--colour"], 2, ["--colour", "--help"]),
    ("no tracefs", ["--tracefs", "/nonexistent-tracefs"], 1, ["no tracefs", "/nonexistent-tracefs", "mount -t tracefs"]),
]


@pytest.mark.parametrize("case,args,status,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_with_one_line_naming_problem_and_fix(case, args, status, words):
    done = run_agent("local", "--duration", "1s", *args)
    assert done.returncode == status
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0]
    assert done.stdout == ""


def test_missing_tracepoint_is_reported_before_compiling(fake_tracefs):
    done = run_agent("local", "--duration", "1s", "--tracefs", str(fake_tracefs))
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "tcp:tcp_retransmit_skb is missing" in line and str(fake_tracefs) in line


def test_missing_bpf_privileges_are_reported_with_the_fix():
    """What a non-root user lacks is the capabilities (the check is on CAP_SYS_ADMIN or
    CAP_BPF+CAP_PERFMON), so drop them all and stay uid 0: another uid could not even read a
    checkout in a 0700 folder such as `mktemp -d`, and would fail before the agent runs."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop privileges"
    done = run_agent("local", "--duration", "1s",
                     prefix=(setpriv, "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"))
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "not permitted to load BPF programs" in line and "run as root" in line


def test_duration_ends_the_run_with_status_zero_and_a_report():
    done = run_agent("local", "--duration", "1s", "--output", "json", "--remote-cidr", "198.18.255.255/32")
    assert done.returncode == 0, done.stderr
    report = NodeStatus.model_validate(json.loads(done.stdout))
    assert report.retransmits == 0 and report.top_flows == []


def test_json_output_is_the_exact_node_report(ns, reference):
    mine = loads.own_addresses(ns)
    cidrs = [arg for c in loads.own_cidrs(ns) for arg in ("--remote-cidr", c)]
    agent = subprocess.Popen([AGENT, "local", "--output", "json", "--events", "--top", "0", *cidrs],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = agent.stderr.readline()
        assert "counting on tcp:tcp_retransmit_skb" in ready, ready + agent.stderr.read()
        started = datetime.now(timezone.utc)
        loads.bulk(ns, loss=10, family="IPv4", connections=2, nbytes=1 << 20)
        loads.synack_drops(ns, connections=2, seconds=1.5)
        counts = reference.read()
        ended = datetime.now(timezone.utc)
        agent.send_signal(signal.SIGINT)   # ends the run early; the report is still printed
        out, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err
    lines = out.strip().splitlines()
    events = [RecentEvent.model_validate(json.loads(line)) for line in lines[:-1]]
    report = NodeStatus.model_validate(json.loads(lines[-1]))

    expected = per_flow(counts, lambda e: (e.local_ip in mine or e.remote_ip in mine) and succeeded(e))
    got = {(f.family, f.local.ip, f.local.port, f.remote.ip, f.remote.port): (f.retransmits, f.synack_retransmits)
           for f in report.top_flows}
    assert got == expected
    assert report.flows == len(expected)
    assert report.retransmits == sum(r for r, _ in expected.values()) > 0
    assert report.synack_retransmits == sum(s for _, s in expected.values()) > 0
    assert sum(report.by_state.values()) == report.retransmits + report.synack_retransmits
    # every sample either streamed or counted lost
    assert len(events) + report.lost_events == report.retransmits + report.synack_retransmits
    assert all(e.local.ip in mine for e in events)
    # kernel timestamps converted to wall-clock UTC inside the run's window
    slack = timedelta(seconds=1)
    for flow in report.top_flows:
        assert started - slack <= flow.first_seen <= flow.last_seen <= ended + slack
    assert report.phase == "Running" and report.kernel and report.agent_version


def check_lines(done: subprocess.CompletedProcess) -> dict[str, dict]:
    return {line["name"]: line for line in json.loads(done.stdout)["checks"]}


def test_check_on_this_host_says_it_can_count_and_in_which_mode():
    done = run_agent("check", "--output", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["canCount"] is True
    lines = check_lines(done)
    assert lines["kernel"]["detail"] == f"Linux {os.uname().release}"
    assert "state yes" in lines["tracepoint tcp:tcp_retransmit_skb"]["detail"]
    assert lines["BPF permission"]["status"] == "ok"
    assert lines["mode"]["status"] == "ok" and "by TCP state" in lines["mode"]["detail"]
    table = run_agent("check")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == len(lines)


def test_check_without_bpf_privileges_fails_naming_the_fix():
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop privileges"
    done = run_agent("check", "--output", "json",
                     prefix=(setpriv, "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"))
    assert done.returncode == 1
    lines = check_lines(done)
    assert lines["BPF permission"]["status"] == "fail" and "privileged" in lines["BPF permission"]["fix"]
    assert lines["mode"]["status"] == "fail"


def test_check_on_a_missing_tracefs_fails_naming_the_mount(tmp_path):
    done = run_agent("check", "--tracefs", str(tmp_path))
    assert done.returncode == 1
    assert any(line.startswith("FAIL") and "tracefs" in line and "mount -t tracefs" in line
               for line in done.stdout.splitlines())


def test_check_on_a_4_15_layout_reports_unknown_states():
    """In a private mount namespace whose format files lack `family` and `state`."""
    script = ("from pathlib import Path; import tempfile, subprocess, sys; "
              "from tests.harness.oldlayout import mask_formats; "
              "mask_formats(('family', 'state'), Path(tempfile.mkdtemp())); "
              f"sys.exit(subprocess.run([{AGENT!r}, 'check', '--output', 'json']).returncode)")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                          cwd=str(Path(__file__).resolve().parents[2]), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = check_lines(done)
    assert "state no" in lines["tracepoint tcp:tcp_retransmit_skb"]["detail"]
    assert lines["TCP states"]["status"] == "degraded"
    assert "state UNKNOWN" in lines["mode"]["detail"]
