"""The agent's lifecycle decisions (issue 22): the SIGTERM write within its budget, noticing a
deleted report, resuming only from the own trace's report. Pure functions, real inputs."""

from __future__ import annotations

import pytest

from retransmit_agent.flows import OFFSET_TOLERANCE_NS, ktime_to_datetime, stable_offset, wall_clock_offset_ns
from retransmit_agent.reportwriter import ReportTarget
from retransmit_agent.resume import Baseline, StoredReport, owner_uid, read_entry, stored_report
from retransmit_agent.writeschedule import (
    FINAL_ATTEMPT_MIN_SECONDS,
    WriteTimes,
    check_due,
    decide_write,
    entry_changed,
    final_attempt_timeout,
    final_retry_wait,
)
from retransmit_core.api import NodeStatus, Phase
from retransmit_core.backoff import backoff_delay
from retransmit_core.schedule import (
    FINAL_REPORT_BUDGET_SECONDS,
    REPORT_WRITES_PER_SECOND,
    WRITE_TIMEOUT_SECONDS,
    Write,
    report_period,
)

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- the final report's budget

def test_the_first_final_write_may_use_the_whole_budget_for_a_slow_answer():
    # Longer than an ordinary write's timeout: a slow API server's answer within the budget lands.
    assert final_attempt_timeout(FINAL_REPORT_BUDGET_SECONDS) == FINAL_REPORT_BUDGET_SECONDS > WRITE_TIMEOUT_SECONDS
    assert final_attempt_timeout(3.5) == 3.5
    assert final_attempt_timeout(FINAL_ATTEMPT_MIN_SECONDS / 2) is None   # too late to start one


def test_final_retries_back_off_but_always_leave_room_for_one_more_attempt():
    assert final_retry_wait(2.0, 15.0) == 2.0
    assert final_retry_wait(5.0, 3.0) == 3.0 - FINAL_ATTEMPT_MIN_SECONDS    # cut to fit
    assert final_retry_wait(5.0, FINAL_ATTEMPT_MIN_SECONDS) == 0.0
    assert final_retry_wait(0.5, FINAL_ATTEMPT_MIN_SECONDS / 2) is None    # no attempt fits any more


def test_final_attempts_against_an_api_server_that_never_answers_end_within_the_budget():
    """Play the agent's final loop against a server whose every call takes its whole timeout
    or fails at once: the attempts stop, and the last one ends by the budget."""
    for call_seconds in (lambda timeout: timeout, lambda timeout: 0.05):
        clock, attempts = 0.0, 0
        while True:
            timeout = final_attempt_timeout(FINAL_REPORT_BUDGET_SECONDS - clock)
            if timeout is None:
                break
            clock += call_seconds(timeout)
            attempts += 1
            wait = final_retry_wait(backoff_delay(attempts - 1, cap=5.0), FINAL_REPORT_BUDGET_SECONDS - clock)
            if wait is None:
                break
            clock += wait
        assert attempts >= 1 and clock <= FINAL_REPORT_BUDGET_SECONDS


# ---------------------------------------------------------------- whose report, and is it there

def _report(uid, node="n1", retransmits=7):
    """The report as the agent of trace t1 (uid `uid`) writes it."""
    target = ReportTarget(trace="t1", trace_uid=uid, node=node, namespace="rs")
    return target.body(NodeStatus(node=node, phase=Phase.RUNNING, retransmits=retransmits))


def test_only_the_own_traces_report_is_resumed():
    ours = _report("uid-new")
    assert stored_report(ours, "uid-new") is StoredReport.OURS
    assert read_entry(ours, "n1", "uid-new").retransmits == 7


def test_a_report_of_an_earlier_trace_of_the_same_name_is_foreign_and_no_baseline():
    older = _report("uid-old")
    assert stored_report(older, "uid-new") is StoredReport.FOREIGN
    assert read_entry(older, "n1", "uid-new") is None
    assert Baseline.from_entry(read_entry(older, "n1", "uid-new")).empty   # the re-created trace starts from zero
    unowned = {k: v for k, v in older.items()}
    unowned["metadata"] = {"name": older["metadata"]["name"]}
    assert stored_report(unowned, "uid-new") is StoredReport.FOREIGN        # no owner: never resumed either


def test_metadata_alone_tells_whose_report_it_is_and_none_means_missing():
    # What read_metadata returns: PartialObjectMetadata, no spec.
    partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
               "metadata": _report("uid-new")["metadata"]}
    assert owner_uid(partial) == "uid-new"
    assert stored_report(partial, "uid-new") is StoredReport.OURS
    assert stored_report(partial, "uid-other") is StoredReport.FOREIGN
    assert stored_report(None, "uid-new") is StoredReport.MISSING


# ---------------------------------------------------------------- when a quiet node reads back

def test_a_quiet_node_reads_its_report_back_once_per_report_period():
    interval = 10.0
    wrote = WriteTimes().after(Write.REPORT, 100.0)
    assert not check_due(WriteTimes(), 1000.0, interval, 1)                   # before the first write: never
    assert not check_due(wrote, 101.0, interval, 1)                           # just written
    assert check_due(wrote, 100.0 + report_period(interval, 1), interval, 1)
    quiet = wrote.after(Write.HEARTBEAT, 130.0)                               # a heartbeat is no proof
    assert check_due(quiet, 130.0, interval, 1)
    read = quiet.read_back(130.0)                                                 # a read-back is
    assert not check_due(read, 131.0, interval, 1)
    assert check_due(read, 130.0 + report_period(interval, 1), interval, 1)


def test_read_backs_stretch_with_the_report_period_on_big_clusters():
    interval, nodes = 10.0, 5000
    period = report_period(interval, nodes)
    assert period > interval
    read = WriteTimes().after(Write.REPORT, 0.0).read_back(100.0)
    assert not check_due(read, 100.0 + interval, interval, nodes)
    assert check_due(read, 100.0 + period, interval, nodes)
    # At most one read per node and period: the cluster's reads per second stay within the
    # report write budget, whatever the size.
    assert nodes / period <= REPORT_WRITES_PER_SECOND


def test_a_quiet_node_whose_report_was_deleted_writes_it_again_with_the_same_counts():
    """The pipeline of a quiet node: unchanged counts make a heartbeat, the read-back finds no
    report, and the entry the agent holds (cumulative, not reset) is what goes out."""
    interval = 10.0
    held = NodeStatus(node="n1", phase=Phase.RUNNING, retransmits=42, by_state={"ESTABLISHED": 42})
    times = WriteTimes().after(Write.REPORT, 0.0).after(Write.HEARTBEAT, 25.0)
    now = report_period(interval, 1)
    assert decide_write(entry_changed(held, held), times, now, interval, 1) is not Write.REPORT
    assert check_due(times, now, interval, 1)
    assert stored_report(None, "uid-t1") is StoredReport.MISSING
    body = ReportTarget("t1", "uid-t1", "n1", "rs").body(held)
    assert read_entry(body, "n1", "uid-t1") == held                           # the same counts come back


# ---------------------------------------------------------------- quiet means unchanged

def test_kernel_timestamps_read_the_same_from_one_snapshot_to_the_next():
    """A flow's firstSeen/lastSeen come from the kernel's monotonic clock plus the wall-clock
    offset; the offset, measured anew, differs by some nanoseconds each time: it must not move
    the timestamps, or a node that once retransmitted would never be quiet again."""
    first = stable_offset(None, 1_700_000_000_000_000_000)
    again = stable_offset(first, first + 700)          # the clocks read a little apart
    assert again == first
    ktime = 5_000_000_123_456
    assert ktime_to_datetime(ktime, again) == ktime_to_datetime(ktime, first)
    stepped = stable_offset(first, first + 2 * OFFSET_TOLERANCE_NS)   # the wall clock was set
    assert stepped == first + 2 * OFFSET_TOLERANCE_NS
    assert wall_clock_offset_ns() == wall_clock_offset_ns()
