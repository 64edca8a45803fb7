"""The bounds the kernel tests hold the program's causes to against TcpExt, including the
slack for hits the kernel ran no program for (missedEvents)."""

from __future__ import annotations

import pytest

from tests.harness.causecheck import cause_mismatches

pytestmark = pytest.mark.unit

COUNTERS = {"TCPFastRetrans": 364, "TCPSlowStartRetrans": 0, "TCPLossProbes": 2, "TCPTimeouts": 4}


def causes(timeout: int, fast: int, probe: int = 0) -> dict[str, int]:
    return {"timeout": timeout, "fast": fast, "probe": probe, "unknown": 0}


def test_exact_counts_agree_and_probes_may_fill_the_gap():
    assert cause_mismatches(causes(4, 364), COUNTERS) == []
    assert cause_mismatches(causes(4, 364, probe=2), COUNTERS) == []


def test_counts_below_the_kernels_need_as_many_missed_events():
    assert cause_mismatches(causes(4, 363), COUNTERS)            # one short, nothing missed: wrong
    assert cause_mismatches(causes(4, 363), COUNTERS, missed=1) == []
    assert cause_mismatches(causes(3, 363), COUNTERS, missed=1)  # two short, one missed: wrong
    assert cause_mismatches(causes(3, 363), COUNTERS, missed=2) == []


def test_counts_above_the_kernels_are_wrong_whatever_was_missed():
    assert cause_mismatches(causes(5, 364), COUNTERS, missed=10)
    assert cause_mismatches(causes(4, 365, probe=2), COUNTERS, missed=10)
