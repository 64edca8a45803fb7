"""Pre-compile checks: finding tracefs, the tracepoints and their fields; one-line fixes."""

from __future__ import annotations

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
    flags = compile_flags(KernelConfig(flow_capacity=99, ring_pages=8, filter_capacity=7), tmp_path,
                          KernelFeatures(layout, jiffies64=True, ringbuf=True))
    assert flags[:8] == [f"-I{tmp_path}", "-DFLOW_CAPACITY=99", "-DRINGBUF_PAGES=8", "-DFILTER_CAPACITY=7",
                         "-DHAVE_SKB_STATE", "-DHAVE_SKB_ERR", "-DHAVE_JIFFIES64", "-DUSE_RINGBUF"]
    # the constants shared with Python, from their one definition
    assert {"-DAF_INET6_=10", "-DKIND_SYNACK=1", "-DTCP_SYN_RECV_=3", "-DCAUSE_TIMEOUT=1",
            "-DFAMILY_IPV6=2"} <= set(flags)
    plain = compile_flags(KernelConfig(), tmp_path, KernelFeatures(layout, jiffies64=False, ringbuf=False))
    assert not {"-DUSE_RINGBUF", "-DHAVE_JIFFIES64"} & set(plain)
