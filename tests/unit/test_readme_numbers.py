"""The figures in the README and docs/ that follow from a rule in the code are recomputed here from that
rule, so a change of the rule fails until the prose follows (a staleness bound once read
"45 s" in the README while the code gave 54 s)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retransmit_core.api import DEFAULT_TOP_FLOWS, MAX_NODE_PODS, MAX_NODE_ROWS, RetransmitTraceSpec
from retransmit_core.kernelvocab import DEFAULT_OWNER_CAPACITY
from retransmit_core.schedule import (
    HEARTBEAT_INTERVALS,
    INTERVAL_JITTER,
    REPORT_WRITES_PER_SECOND,
    WRITE_TIMEOUT_SECONDS,
    heartbeat_seconds,
    report_period,
    stale_after,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# The README and every page under docs/ (how-it-works.md holds the schedule's prose,
# results.md the API's bounds, performance.md the bench's).
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = " ".join(" ".join(page.read_text().split()) for page in PAGES)
DEFAULT_INTERVAL = RetransmitTraceSpec().report_interval_seconds
# The README's schedule figures are for one trace of up to this many nodes at the default
# interval, where the cluster-wide budget stretches nothing (tests/unit/test_heartbeat.py).
SMALL_CLUSTER = 1000


def figure(pattern: str) -> str:
    """The one group of `pattern` in the README (white space folded); fails when absent."""
    found = re.findall(pattern, README)
    assert found, f"README no longer says {pattern!r}: update this test with the prose"
    return found[0]


def test_the_staleness_bound_is_the_schedules():
    assert float(figure(r"timeout: (\d+) s at the default 10 s")) == stale_after(DEFAULT_INTERVAL, SMALL_CLUSTER).total_seconds()
    formula = figure(r"`stale_after\(reportInterval\) = ([^`]+)`")
    jitter = 1 + INTERVAL_JITTER
    assert formula == (f"{HEARTBEAT_INTERVALS} × {jitter:g} × reportInterval + {jitter:g} × reportInterval"
                       f" + {WRITE_TIMEOUT_SECONDS:g} s")


def test_the_report_period_and_write_budget_are_the_schedules():
    assert float(figure(r"at most about (\d+) report writes/s")) == REPORT_WRITES_PER_SECOND
    assert float(figure(r"(\d+) s up to 1,000 nodes at the default interval")) == report_period(DEFAULT_INTERVAL, 1000)
    assert float(figure(r"(\d+) s at 5,000 \(each agent reads")) == report_period(DEFAULT_INTERVAL, 5000)
    assert int(figure(r"same name every (\d+) intervals")) == HEARTBEAT_INTERVALS
    assert float(figure(r"renewing their heartbeat Lease every (\d+) s")) == heartbeat_seconds(DEFAULT_INTERVAL, SMALL_CLUSTER)


def test_the_row_bound_and_defaults_are_the_apis():
    assert int(figure(r"lists at most (\d+) rows")) == MAX_NODE_ROWS
    assert int(figure(r"topFlows: (\d+)")) == DEFAULT_TOP_FLOWS


def test_the_per_address_map_and_the_pod_rows_bound_are_the_codes():
    def number(text: str) -> int:
        return int(text.replace(",", ""))
    assert number(figure(r"a plain hash of ([\d,]+) addresses")) == DEFAULT_OWNER_CAPACITY
    assert number(figure(r"per-address map \(([\d,]+)\s+addresses\) was full")) == DEFAULT_OWNER_CAPACITY
    assert number(figure(r"at most ([\d,]+) rows\), each count exact")) == MAX_NODE_PODS
