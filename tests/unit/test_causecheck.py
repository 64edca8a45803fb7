"""The bounds the kernel tests hold the program's causes to against TcpExt, including the
slack for retransmitted segments the kernel counted in RetransSegs that no program saw."""

from __future__ import annotations

import pytest

from tests.harness.causecheck import cause_mismatches, unseen_segments

pytestmark = pytest.mark.unit

COUNTERS = {"TCPFastRetrans": 364, "TCPSlowStartRetrans": 0, "TCPLossProbes": 2, "TCPTimeouts": 4,
            "RetransSegs": 370}


def causes(timeout: int, fast: int, probe: int = 0) -> dict[str, int]:
    return {"timeout": timeout, "fast": fast, "probe": probe, "unknown": 0}


def test_exact_counts_agree_and_probes_may_fill_the_gap():
    assert cause_mismatches(causes(4, 364), COUNTERS) == []
    assert cause_mismatches(causes(4, 364, probe=2), COUNTERS) == []


def test_counts_below_the_kernels_need_as_many_unseen_segments():
    assert cause_mismatches(causes(4, 363), COUNTERS)            # one short, nothing unseen: wrong
    assert cause_mismatches(causes(4, 363), COUNTERS, unseen=1) == []
    assert cause_mismatches(causes(3, 363), COUNTERS, unseen=1)  # two short, one unseen: wrong
    assert cause_mismatches(causes(3, 363), COUNTERS, unseen=2) == []


def test_counts_above_the_kernels_are_wrong_whatever_was_unseen():
    assert cause_mismatches(causes(5, 364), COUNTERS, unseen=10)
    assert cause_mismatches(causes(4, 365, probe=2), COUNTERS, unseen=10)


def test_unseen_segments_are_retranssegs_beyond_the_programs_count():
    assert unseen_segments(COUNTERS, 368) == 2
    assert unseen_segments(COUNTERS, 370) == 0
    # more events than the kernel retransmitted segments is a counting error, not slack
    assert unseen_segments(COUNTERS, 371) == -1
    assert cause_mismatches(causes(4, 364), COUNTERS, unseen=-1)
