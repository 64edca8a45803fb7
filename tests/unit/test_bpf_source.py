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


def test_program_reads_only_tracepoint_fields():
    # no hand-written tracepoint struct, no kernel structs (generic headers in the image)
    program = re.sub(r"/\*.*?\*/|//[^\n]*", "", source("retransmit.bpf.c"), flags=re.S)
    assert not re.search(r"struct\s+(sock|sk_buff|inet_sock|trace_event_raw_\w+)\b", program)
    assert "bpf_probe_read" not in program


def test_samples_are_submitted_without_waking_user_space():
    assert "BPF_RB_NO_WAKEUP" in source("retransmit.bpf.c")
