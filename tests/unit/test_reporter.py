"""The agent's pure steps around a write: resume from the node's own report, backoff, change
detection and the write decision, the report document."""

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.backoff import backoff_delay, jittered
from retransmit_agent.flows import FlowCounters
from retransmit_agent.reportwriter import ReportTarget, field_manager
from retransmit_agent.resume import Baseline, FlowKey, cumulative_entry, merge_flows, read_entry
from retransmit_agent.writeschedule import WriteTimes, decide_write, entry_changed
from retransmit_core.api import Endpoint, Flow, NodeStatus, Phase, RecentEvent, to_api
from retransmit_core.schedule import Write, heartbeat_seconds

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def flow(local_port, retransmits, synack=0, *, remote_port=5201, family="IPv4", seen=0, state="ESTABLISHED"):
    ip_l, ip_r = ("198.18.0.2", "198.18.0.3") if family == "IPv4" else ("fd00::2", "fd00::3")
    return Flow(
        local=Endpoint(ip=ip_l, port=local_port), remote=Endpoint(ip=ip_r, port=remote_port),
        family=family, retransmits=retransmits, synack_retransmits=synack, last_state=state,
        first_seen=T0 + timedelta(seconds=seen), last_seen=T0 + timedelta(seconds=seen + 1),
    )


def counters(local_port, retransmits, synack=0, *, remote_port=5201, family="IPv4", seen=0, state="ESTABLISHED"):
    """The kernel's FlowCounters of the same flow as flow(...) with the same arguments."""
    api = flow(local_port, retransmits, synack, remote_port=remote_port, family=family, seen=seen, state=state)
    return FlowCounters(family, api.local.ip, local_port, api.remote.ip, remote_port, retransmits, synack, state,
                        api.first_seen, api.last_seen)


def event(second):
    return RecentEvent(time=T0 + timedelta(seconds=second), kind="retransmit", family="IPv4",
                       local=Endpoint(ip="198.18.0.2", port=1), remote=Endpoint(ip="198.18.0.3", port=2))


def owned(report, uid="uid-t1"):
    """`report` with trace t1 (uid `uid`) as its controlling owner, as the agent writes it."""
    meta = {"ownerReferences": [{"apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace",
                                 "name": "t1", "uid": uid, "controller": True}]}
    return {"metadata": meta, **report}


def entry(**kw):
    base = dict(node="n1", phase=Phase.RUNNING)
    base.update(kw)
    return NodeStatus(**base)


# ---------------------------------------------------------------- when to write

def test_jitter_stays_within_ten_percent():
    assert jittered(100.0, rng=lambda: 0.0) == pytest.approx(90.0)
    assert jittered(100.0, rng=lambda: 1.0) == pytest.approx(110.0)


# ---------------------------------------------------------------- backoff

def test_backoff_grows_exponentially_then_caps():
    mid = [backoff_delay(n, base=1.0, cap=30.0, rng=lambda: 0.5) for n in range(8)]
    assert mid[:5] == [0.75, 1.5, 3.0, 6.0, 12.0]
    assert mid[5:] == [22.5, 22.5, 22.5]


def test_backoff_jitter_never_reaches_zero_nor_exceeds_the_cap():
    for attempt in range(50):
        low = backoff_delay(attempt, base=1.0, cap=30.0, rng=lambda: 0.0)
        high = backoff_delay(attempt, base=1.0, cap=30.0, rng=lambda: 1.0)
        assert low >= 0.5 and high <= 30.0 and low < high


# ---------------------------------------------------------------- change detection

def test_a_new_timestamp_alone_is_no_change():
    a = entry(retransmits=3, last_report_time=T0)
    b = entry(retransmits=3, last_report_time=T0 + timedelta(seconds=10))
    assert not entry_changed(a, b)


def test_new_counts_or_phase_are_a_change():
    a = entry(retransmits=3)
    assert entry_changed(a, entry(retransmits=4))
    assert entry_changed(a, entry(retransmits=3, phase=Phase.FAILED, message="x"))
    assert entry_changed(None, a)


# ---------------------------------------------------------------- resume

def test_no_earlier_report_means_an_empty_baseline():
    assert Baseline.from_entry(None).empty
    assert read_entry(None, "n1", "uid-t1") is None
    assert read_entry(owned({"spec": {"node": "other", "retransmits": 5}}), "n1", "uid-t1") is None  # never another node's
    assert read_entry(owned({"spec": {"node": "n1", "retransmits": -5}}), "n1", "uid-t1") is None  # unreadable: logged


def test_own_report_is_the_baseline():
    found = read_entry(owned({"spec": {"node": "n1", "phase": "Running", "retransmits": 7,
                                       "byState": {"ESTABLISHED": 7}}}), "n1", "uid-t1")
    assert found.retransmits == 7 and found.by_state == {"ESTABLISHED": 7}


def test_resumed_totals_add_to_the_kernels_new_counts():
    before = entry(retransmits=100, synack_retransmits=4, lost_events=2, missed_events=6, flows=3,
                   by_state={"ESTABLISHED": 90, "SYN_RECV": 10},
                   top_flows=[flow(1000, 60), flow(1001, 40)], recent_events=[event(5)])
    baseline = Baseline.from_entry(before)
    fresh_flows = [counters(1000, 7, seen=20), counters(1002, 3, seen=21)]
    fresh = entry(retransmits=10, synack_retransmits=1, lost_events=1, missed_events=4, flows=2,
                  by_state={"ESTABLISHED": 10, "FIN_WAIT1": 1}, recent_events=[event(30)])
    merged = merge_flows(baseline, fresh_flows)
    out = cumulative_entry(baseline, fresh, merged, top_n=10, keep=20)
    assert (out.retransmits, out.synack_retransmits, out.lost_events, out.missed_events) == (110, 5, 3, 10)
    assert out.by_state == {"ESTABLISHED": 100, "SYN_RECV": 10, "FIN_WAIT1": 1}
    counts = {f.local.port: f.retransmits for f in out.top_flows}
    assert counts == {1000: 67, 1001: 40, 1002: 3}
    assert out.flows == 3  # never fewer than before
    assert [e.time for e in out.recent_events] == [T0 + timedelta(seconds=30), T0 + timedelta(seconds=5)]
    f1000 = next(f for f in out.top_flows if f.local.port == 1000)
    assert f1000.first_seen == T0 and f1000.last_seen == T0 + timedelta(seconds=21)


def test_counts_never_go_backwards_across_repeated_restarts():
    """Three agents in a row on one node, each seeing some events: totals only grow."""
    previous = None
    reported = []
    for generation, new in enumerate([5, 0, 8]):
        baseline = Baseline.from_entry(previous)
        fresh = entry(retransmits=new)
        out = cumulative_entry(baseline, fresh, merge_flows(baseline, [counters(2000, new)] if new else []), 10, 20)
        reported.append(out.retransmits)
        previous = NodeStatus.model_validate(to_api(out))  # what the next agent reads back
    assert reported == [5, 5, 13]
    assert previous.top_flows[0].retransmits == 13


def test_a_flow_busy_before_and_after_a_restart_ranks_by_its_total():
    """The kernel's fresh count of flow A is small, but with its baseline it is the busiest."""
    baseline = Baseline.from_entry(entry(retransmits=50, top_flows=[flow(1, 50)]))
    fresh_flows = [counters(1, 2)] + [counters(100 + i, 10) for i in range(5)]
    fresh = entry(retransmits=52)
    out = cumulative_entry(baseline, fresh, merge_flows(baseline, fresh_flows), top_n=3, keep=0)
    assert [f.local.port for f in out.top_flows][0] == 1
    assert out.top_flows[0].retransmits == 52
    assert len(out.top_flows) == 3
    assert out.recent_events == []


def test_top_flows_orders_busiest_first_and_zero_means_all():
    flows = [flow(1, 1), flow(2, 5), flow(3, 0, synack=9), flow(4, 5, seen=50)]
    merged = merge_flows(Baseline.from_entry(entry(top_flows=flows)), [])
    assert [f.local.port for f in cumulative_entry(Baseline(), entry(), merged, top_n=2, keep=0).top_flows] == [3, 4]
    assert len(cumulative_entry(Baseline(), entry(), merged, top_n=0, keep=0).top_flows) == 4


def test_kernel_flows_rank_by_count_then_recency_then_key():
    t = lambda s: datetime.fromtimestamp(s, tz=timezone.utc)  # noqa: E731
    flows = [FlowCounters("IPv4", "10.0.0.1", port, "10.0.0.2", 80, n, 0, "ESTABLISHED", t(last), t(last))
             for port, n, last in [(1, 5, 100), (2, 9, 50), (3, 5, 200), (4, 5, 200)]]
    assert [f.key.local_port for f in merge_flows(Baseline(), flows)] == [2, 3, 4, 1]


def test_ipv4_and_ipv6_flows_with_equal_ports_stay_apart():
    a, b = flow(1, 3, family="IPv4"), counters(1, 4, family="IPv6")
    assert FlowKey.of_flow(a) != FlowKey.of_counters(b)
    assert FlowKey.of_flow(flow(1, 4, family="IPv6")) == FlowKey.of_counters(b)
    baseline = Baseline.from_entry(entry(top_flows=[a]))
    merged = merge_flows(baseline, [b])
    assert sorted(f.retransmits for f in merged) == [3, 4]


# ---------------------------------------------------------------- the write

def test_the_report_document_is_named_labelled_and_owned_from_trace_and_node():
    target = ReportTarget(trace="t1", trace_uid="uid-t1", node="n1", namespace="rs")
    body = target.body(entry(retransmits=3, by_state={"ESTABLISHED": 3}))
    assert body["apiVersion"] == "retransmit.dev/v1alpha1" and body["kind"] == "RetransmitNodeReport"
    assert body["metadata"]["name"] == target.name == "t1.n1" and body["metadata"]["namespace"] == "rs"
    assert body["metadata"]["labels"]["retransmit.dev/trace"] == "t1"
    assert body["metadata"]["labels"]["retransmit.dev/node"] == "n1"
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace",
                                                     "name": "t1", "uid": "uid-t1", "controller": True}]
    assert body["spec"] == {"node": "n1", "phase": "Running", "retransmits": 3, "synackRetransmits": 0,
                            "lostEvents": 0, "podCountsOverflow": 0, "flows": 0, "byState": {"ESTABLISHED": 3}, "byCause": {},
                            "kernelChecks": [], "topFlows": [], "topPods": [], "recentEvents": [], "byRemote": []}
    assert read_entry(body, "n1", "uid-t1") == entry(retransmits=3, by_state={"ESTABLISHED": 3})  # it reads back as written


def test_each_node_writes_with_its_own_field_manager():
    assert field_manager("worker-7") == "rtrace-agent/worker-7"


def test_missed_events_alone_make_a_baseline_and_survive_restarts():
    # An entry whose only count is missedEvents must still be resumed, and an entry from a
    # kernel that cannot count them reads back as unknown (None), not 0.
    baseline = Baseline.from_entry(entry(missed_events=3))
    assert not baseline.empty and baseline.missed_events == 3
    assert Baseline.from_entry(NodeStatus.model_validate({"node": "n1", "phase": "Running"})).missed_events is None
    first = cumulative_entry(baseline, entry(missed_events=2), [], top_n=10, keep=0)
    second = cumulative_entry(Baseline.from_entry(first), entry(missed_events=0), [], top_n=10, keep=0)
    assert (first.missed_events, second.missed_events) == (5, 5)
    assert to_api(second)["missedEvents"] == 5


def test_failed_attempts_and_causes_add_across_restarts_and_unknown_stays_unknown():
    first = cumulative_entry(Baseline(), entry(failed_attempts=2, by_cause={"fast": 3}), [], top_n=10, keep=0)
    second = cumulative_entry(Baseline.from_entry(first), entry(failed_attempts=1, by_cause={"fast": 1, "timeout": 2}),
                              [], top_n=10, keep=0)
    assert second.failed_attempts == 3 and second.by_cause == {"fast": 4, "timeout": 2}
    older_kernel = cumulative_entry(Baseline(), entry(), [], top_n=10, keep=0)
    assert older_kernel.failed_attempts is None and older_kernel.missed_events is None
    assert "failedAttempts" not in to_api(older_kernel) and "missedEvents" not in to_api(older_kernel)


# ---------------------------------------------------------------- the write decision

def test_a_final_report_is_always_the_report_never_a_heartbeat():
    long_quiet = WriteTimes(report=0.0, any=0.0)
    now = 10 * heartbeat_seconds(10.0, 1)
    assert decide_write(False, long_quiet, now, 10.0, 1) is Write.HEARTBEAT
    assert decide_write(False, long_quiet, now, 10.0, 1, final=True) is Write.REPORT   # unchanged: still written
    just_written = WriteTimes(report=now, any=now)
    assert decide_write(False, just_written, now, 10.0, 5000, final=True) is Write.REPORT   # no period applies
    assert decide_write(True, long_quiet, now, 10.0, 1, final=True) is Write.REPORT
    assert decide_write(True, WriteTimes(), 0.0, 10.0, 1, final=True) is Write.REPORT


def test_the_decision_reads_the_times_of_the_writes_that_were_stored():
    times = WriteTimes().after(Write.REPORT, 100.0).after(Write.HEARTBEAT, 130.0)
    assert times == WriteTimes(report=100.0, any=130.0, checked=100.0)
    assert times.after(Write.NOTHING, 200.0) == times
    assert decide_write(False, WriteTimes(), 0.0, 10.0, 1) is Write.REPORT   # nothing written yet
    assert decide_write(True, times, 131.0, 10.0, 1) is Write.REPORT         # changed, a period since the report
    assert decide_write(False, times, 131.0, 10.0, 1) is Write.NOTHING       # a heartbeat just now
    assert decide_write(False, times, 130.0 + heartbeat_seconds(10.0, 1), 10.0, 1) is Write.HEARTBEAT
    assert decide_write(True, times, 131.0, 10.0, 5000) is Write.NOTHING     # 5,000 nodes stretch the period
