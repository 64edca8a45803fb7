"""The bounds the kernel tests hold the program's causes to against TcpExt, including the
slack for retransmitted segments the kernel counted in RetransSegs that no program saw."""

from __future__ import annotations

import pytest

from tests.harness.causecheck import cause_mismatches, unseen_segments

pytestmark = pytest.mark.unit

COUNTERS = {"TCPFastRetrans": 364, "TCPSlowStartRetrans": 0, "TCPLossProbes": 2, "TCPTimeouts": 4}


def causes(timeout: int, fast: int, probe: int = 0) -> dict[str, int]:
    return {"timeout": timeout, "fast": fast, "probe": probe, "unknown": 0}


def check(by_cause: dict[str, int], retrans_segs: int) -> list[str]:
    """The bounds for a program that counted one event per cause, against RetransSegs."""
    return cause_mismatches(by_cause, {**COUNTERS, "RetransSegs": retrans_segs}, counted=sum(by_cause.values()))


def test_exact_counts_agree_and_probes_may_fill_the_gap():
    assert check(causes(4, 364), 368) == []
    assert check(causes(4, 364, probe=2), 370) == []


def test_counts_below_the_kernels_need_as_many_unseen_segments():
    assert check(causes(4, 363), 367)            # one short, nothing unseen: wrong
    assert check(causes(4, 363), 368) == []
    assert check(causes(3, 363), 367)            # two short, one unseen: wrong
    assert check(causes(3, 363), 368) == []


def test_counts_above_the_kernels_are_wrong_whatever_was_unseen():
    assert check(causes(5, 364), 379)            # 10 unseen
    assert check(causes(4, 365, probe=2), 381)   # 10 unseen


def test_unseen_segments_are_retranssegs_beyond_the_programs_count():
    counters = {**COUNTERS, "RetransSegs": 370}
    assert unseen_segments(counters, 368) == 2
    assert unseen_segments(counters, 370) == 0
    # more events than the kernel retransmitted segments is a counting error, not slack
    assert unseen_segments(counters, 371) == -1
    assert check(causes(4, 364), 367)
