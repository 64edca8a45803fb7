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
    program = code("retransmit.bpf.c")
    assert not re.search(r"struct\s+(sock|sk_buff|inet_sock|tcp_sock|trace_event_raw_\w+)\b", program)
    reads = re.findall(r"read_kernel\(([^;]*?)\)\s*(?:\|\||\))", program)
    assert len(reads) == 7
    assert all(re.search(r"base \+ SOCK_[A-Z_]+$", args.strip()) for args in reads), reads
    assert "bpf_probe_read(" not in program.replace("#define read_kernel bpf_probe_read", "")


def test_samples_are_submitted_without_waking_user_space():
    assert "BPF_RB_NO_WAKEUP" in source("retransmit.bpf.c")
