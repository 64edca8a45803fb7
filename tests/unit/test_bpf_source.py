"""The kernel program ships as package data and follows the project's rules for BPF code."""

from __future__ import annotations

import re
from importlib import resources

import pytest

pytestmark = pytest.mark.unit


def source(name: str) -> str:
    return (resources.files("retransmit_bpf") / name).read_text()


def test_program_and_header_are_package_data():
    assert "TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)" in source("retransmit.bpf.c")
    assert "TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)" in source("retransmit.bpf.c")
    assert "struct event {" in source("retransmit.h")


def code(name: str) -> str:
    """The source without comments: rules apply to what compiles, not to what is said."""
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", source(name), flags=re.S)


def test_program_reads_tracepoint_fields_and_btf_resolved_socket_offsets_only():
    # no hand-written tracepoint struct, no kernel structs (the image's generic headers
    # belong to another kernel): socket memory only at offsets from this node's BTF
    program, _, drops = code("retransmit.bpf.c").partition("#ifdef HAVE_DROP_REASONS")
    assert not re.search(r"struct\s+(sock|sk_buff|inet_sock|tcp_sock|trace_event_raw_\w+)\b", program + drops)
    reads = re.findall(r"read_kernel\(([^;]*?)\)\s*(?:\|\||\))", program)
    # causes (2 + 1), RTT and window (1 span or 4 fields), segment counters (2)
    assert len(reads) == 10
    assert all(re.search(r"base \+ SOCK_[A-Z_]+$", args.strip()) for args in reads), reads
    assert "bpf_probe_read(" not in program.replace("#define read_kernel bpf_probe_read", "") + drops


def test_drop_part_reads_sk_buff_only_at_btf_offsets_then_the_ip_header():
    # the drop part (skb:kfree_skb) reads struct sk_buff at SKB_* offsets from the node's BTF,
    # and packet bytes only from the IP header those give (head + network_header)
    drops = code("retransmit.bpf.c").partition("#ifdef HAVE_DROP_REASONS")[2]
    reads = [args.split(",")[-1].strip() for args in re.findall(r"bpf_probe_read_kernel\(([^;]*?)\)\s*(?:\|\||\))", drops)]
    skb_reads = [r for r in reads if r.startswith("skb + ")]
    assert skb_reads and all(re.fullmatch(r"skb \+ (SKB_[A-Z_]+|SKB_SPAN_FIRST)", r) for r in skb_reads), reads
    assert set(reads) - set(skb_reads) == {"ip", "ip + (ihl & 0x3c"}, reads   # the regex stops at the first ")"
    # the cheapest tests come first: the reason and the protocol are tracepoint fields
    probe = drops[drops.index("TRACEPOINT_PROBE(skb, kfree_skb)"):]
    assert probe.index("DROP_REASON_NOT_SPECIFIED") < probe.index("ETH_P_IP_") < probe.index("read_skb(")


def test_samples_are_submitted_without_waking_user_space():
    assert "BPF_RB_NO_WAKEUP" in source("retransmit.bpf.c")


def test_both_families_take_one_code_path():
    # an event becomes one struct flow_key whatever its family; only the maps keyed by
    # address are per family, each touched in the one function that picks it by key.family
    program = code("retransmit.bpf.c")
    functions = re.findall(r"static __always_inline [\w\s*]+?\b(\w+)\(", program)
    assert "handle" in functions and "start_run" in functions
    assert [f for f in functions if re.search(r"[46]$", f)] == ["key4", "key6"]
    for family_map in ("flows4", "flows6", "cidrs4", "cidrs6", "local4", "local6"):
        assert len(re.findall(rf"\b{family_map}\.\w+\(", program)) <= 2, family_map
    header = code("retransmit.h")
    assert not re.search(r"\b(runs|run)[46]\b", program + header)


def test_the_parts_the_bench_prices_are_the_programs_switches():
    from retransmit_agent.kernelconfig import PROGRAM_PARTS

    # every part kernelconfig can leave out has its switch in the program, and no other
    assert set(re.findall(r"WITHOUT_(\w+)", code("retransmit.bpf.c"))) == {p.upper() for p in PROGRAM_PARTS}


def test_an_unknown_part_is_refused_by_name(tmp_path):
    from retransmit_agent.kernelconfig import KernelConfig, compile_flags
    from retransmit_agent.kernelinfo import KernelFeatures, TracepointLayout

    features = KernelFeatures(TracepointLayout(frozenset(), frozenset()), jiffies64=True, ringbuf=True)
    assert "-DWITHOUT_SAMPLES" in compile_flags(KernelConfig(), tmp_path, features, without=("samples",))
    with pytest.raises(ValueError, match="unknown program parts causes"):
        compile_flags(KernelConfig(), tmp_path, features, without=("causes",))
