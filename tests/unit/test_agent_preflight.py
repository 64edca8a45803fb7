"""Pre-compile checks: finding tracefs, the tracepoints and their fields; one-line fixes."""

from __future__ import annotations

import os
import shutil

import pytest

from retransmit_agent.kernelconfig import KernelConfig, compile_flags
from retransmit_agent.kernelinfo import KernelFeatures, read_layout
from retransmit_agent.preflight import KernelProblem, find_tracefs, require_tracepoints

pytestmark = pytest.mark.unit

FORMAT_6_18 = """name: tcp_retransmit_skb
ID: 2281
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;

print fmt: "skbaddr=%p"
"""


def make_tracefs(root, events=("tcp_retransmit_skb", "tcp_retransmit_synack"), fmt=FORMAT_6_18):
    for event in events:
        folder = root / "events" / "tcp" / event
        folder.mkdir(parents=True)
        (folder / "format").write_text(fmt)
    return root


def test_explicit_tracefs_without_events_names_the_mount_command(tmp_path):
    with pytest.raises(KernelProblem) as problem:
        find_tracefs(str(tmp_path))
    assert f"mount -t tracefs tracefs {tmp_path}" in str(problem.value)
    assert "\n" not in str(problem.value)


def test_explicit_tracefs_is_used_when_it_has_events(tmp_path):
    make_tracefs(tmp_path)
    assert find_tracefs(str(tmp_path)) == tmp_path


def test_missing_tracepoint_names_it(tmp_path):
    make_tracefs(tmp_path, events=("tcp_retransmit_skb",))
    with pytest.raises(KernelProblem, match="tcp:tcp_retransmit_synack is missing"):
        require_tracepoints(tmp_path)


def test_present_tracepoints_pass(tmp_path):
    require_tracepoints(make_tracefs(tmp_path))


def test_fields_parsed_from_the_format_file(tmp_path):
    make_tracefs(tmp_path)
    fields = read_layout(tmp_path).skb
    assert {"skbaddr", "state", "sport", "saddr_v6", "err", "common_type"} == fields


def test_compile_flags_carry_the_compile_time_configuration(tmp_path):
    layout = read_layout(make_tracefs(tmp_path))
    flags = compile_flags(KernelConfig(flow_capacity=99, ring_pages=8, filter_capacity=7, owner_capacity=5), tmp_path,
                          KernelFeatures(layout, jiffies64=True, ringbuf=True))
    assert flags[:9] == [f"-I{tmp_path}", "-DFLOW_CAPACITY=99", "-DRINGBUF_PAGES=8", "-DFILTER_CAPACITY=7",
                         "-DOWNER_CAPACITY=5", "-DHAVE_SKB_STATE", "-DHAVE_SKB_ERR", "-DHAVE_JIFFIES64", "-DUSE_RINGBUF"]
    # the constants shared with Python, from their one definition
    assert {"-DAF_INET6_=10", "-DKIND_SYNACK=1", "-DTCP_SYN_RECV_=3", "-DCAUSE_TIMEOUT=1",
            "-DFAMILY_IPV6=2"} <= set(flags)
    plain = compile_flags(KernelConfig(), tmp_path, KernelFeatures(layout, jiffies64=False, ringbuf=False))
    assert not {"-DUSE_RINGBUF", "-DHAVE_JIFFIES64"} & set(plain)


# ---------------------------------------------------------------- privileges (the auto mode's probe)

CAP_MASK = {name: 1 << bit for name, bit in (("SYS_ADMIN", 21), ("PERFMON", 38), ("BPF", 39))}


@pytest.mark.parametrize("caps, last_cap, expected", [
    ({"SYS_ADMIN"}, 40, None),
    ({"SYS_ADMIN"}, 37, None),                    # a privileged agent on a kernel before 5.8
    ({"BPF", "PERFMON"}, 40, None),
    ({"BPF"}, 40, "neither CAP_SYS_ADMIN nor CAP_PERFMON (effective capabilities 0x8000000000)"),
    (set(), 40, "neither CAP_SYS_ADMIN nor CAP_BPF and CAP_PERFMON"),
    (set(), 37, "this kernel has no CAP_BPF or CAP_PERFMON (cap_last_cap is 37: they came with Linux 5.8)"),
])
def test_missing_privileges_names_what_the_kernel_or_the_process_lacks(caps, last_cap, expected):
    from retransmit_agent.preflight import missing_privileges

    why = missing_privileges(sum(CAP_MASK[c] for c in caps), last_cap)
    if expected is None:
        assert why is None
    else:
        assert expected in why


def test_a_privilege_problem_asks_for_privileged_only_without_sys_admin():
    from retransmit_agent.preflight import PrivilegeProblem

    assert PrivilegeProblem("x", CAP_MASK["BPF"]).needs_privileged is True
    assert PrivilegeProblem("x", CAP_MASK["SYS_ADMIN"] | CAP_MASK["BPF"]).needs_privileged is False


def test_the_kernel_denying_bpf_asks_for_privileged_when_this_process_is_not():
    from retransmit_agent.bccerrors import bcc_failure
    from retransmit_agent.preflight import PrivilegeProblem, effective_capabilities

    problem = bcc_failure(Exception("Failed to load BPF program b'tcp_retransmit_skb'"),
                          ["bpf: Failed to load program: Operation not permitted"])
    assert isinstance(problem, PrivilegeProblem)
    # This test runs as root with CAP_SYS_ADMIN: more privilege would not help here.
    assert effective_capabilities() & CAP_MASK["SYS_ADMIN"] and problem.needs_privileged is False


def run_preflight_without(*capabilities: str) -> str:
    """require_privileges() in a child process whose bounding set (so, as root, its
    effective set) lacks `capabilities`: the probe on this very kernel, not a mask."""
    import subprocess
    import sys

    code = ("from retransmit_agent.preflight import PrivilegeProblem, require_privileges\n"
            "try:\n    require_privileges()\n    print('permitted')\n"
            "except PrivilegeProblem as p:\n    print(p.needs_privileged, p)\n")
    drop = ",".join(f"-{c.lower()}" for c in capabilities)
    done = subprocess.run(["setpriv", f"--bounding-set={drop}", "--inh-caps=-all", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_probe_on_this_kernel_without_perfmon_asks_for_privileged():
    # make test runs as root on Debian, where util-linux (setpriv) is essential: a missing
    # one is a broken set-up to fix, not a probe to leave untested.
    assert shutil.which("setpriv") and os.geteuid() == 0, \
        "the probe test needs root and setpriv (util-linux) to drop capabilities from a child"
    assert run_preflight_without("sys_admin", "perfmon") == (
        "True not permitted to load BPF programs (uid 0): this process has neither CAP_SYS_ADMIN nor CAP_PERFMON "
        f"(effective capabilities {effective_without('sys_admin', 'perfmon'):#x}): run as root (sudo) or, in a pod, "
        "privileged (the chart's agent.securityMode auto does that on such nodes by itself)")
    assert run_preflight_without("perfmon") == "permitted"            # CAP_SYS_ADMIN covers it
    assert run_preflight_without("sys_admin") == "permitted"          # CAP_BPF + CAP_PERFMON (Linux 5.8+)


def effective_without(*capabilities: str) -> int:
    from retransmit_agent.preflight import effective_capabilities
    from tests.harness.runc_capfilter import CAPABILITIES

    mask = effective_capabilities()
    for name in capabilities:
        mask &= ~(1 << CAPABILITIES.index(name.upper()))
    return mask
