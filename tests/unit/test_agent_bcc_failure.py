"""What the agent says when bcc fails: the message must point at the real cause."""

import pytest

from retransmit_agent.bccerrors import bcc_failure as _bcc_failure

pytestmark = pytest.mark.unit


def test_denied_map_creation_is_reported_as_a_permission_problem_not_as_headers():
    problem = _bcc_failure(Exception("Failed to compile BPF module <text>"),
                           ["could not open bpf map: config, error: Operation not permitted"])
    assert "denied BPF" in str(problem)
    assert "CAP_BPF" in str(problem) and "seccomp" in str(problem)
    assert "headers" not in str(problem)


def test_a_compile_error_blames_the_headers_and_quotes_clang():
    problem = _bcc_failure(Exception("Failed to compile BPF module <text>"),
                           ["/virtual/main.c:3:10: fatal error: 'linux/kconfig.h' file not found"])
    assert "kconfig.h" in str(problem) and "headers" in str(problem)


def test_a_load_failure_points_at_kernel_configuration():
    problem = _bcc_failure(Exception("Failed to load BPF program b'x': Invalid argument"),
                           ["libbpf: prog 'x': BPF program load failed: Invalid argument"])
    assert "rejected the BPF program" in str(problem)
