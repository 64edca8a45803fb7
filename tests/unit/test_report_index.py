"""The operator's index of reports and heartbeat Leases: a node is heard at the later of its
report's lastReportTime and its Lease's renewTime, only from Leases of the same trace, the
index says it is synced only once both kinds were listed, and it keeps the reports asking for
a privileged agent per trace."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.api import NodeStatus
from retransmit_operator.reportindex import ReportIndex
from retransmit_core.naming import heartbeat_object, report_object

pytestmark = pytest.mark.unit

WRITTEN = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
NS, TRACE, UID = "retransmit-system", "shop", "uid-1"


def report(node: str, uid: str = UID) -> dict:
    return report_object(TRACE, uid, node, NS, NodeStatus(node=node, phase="Running", retransmits=3,
                                                          last_report_time=WRITTEN))


def lease(node: str, renewed: datetime, uid: str = UID) -> dict:
    return heartbeat_object(TRACE, uid, node, NS, renewed, 45)


def heard(index: ReportIndex) -> dict[str, datetime]:
    return {r.entry.node: r.entry.last_report_time for r in index.for_trace(TRACE, UID)}


def test_a_node_is_heard_at_its_latest_write_of_either_kind():
    index = ReportIndex()
    index.replace([report("a"), report("b"), report("c")])
    assert not index.synced.is_set()   # the Leases are not listed yet: quiet nodes would look stale
    later = WRITTEN + timedelta(seconds=30)
    index.replace_heartbeats([lease("a", later), lease("b", WRITTEN - timedelta(seconds=5)),
                              lease("c", later, uid="uid-of-an-earlier-trace")])
    assert index.synced.is_set()
    # a: renewed after its report; b: an older Lease does not move it back; c: not its trace's.
    assert heard(index) == {"a": later, "b": WRITTEN, "c": WRITTEN}
    # Counts are the report's, whatever the Lease says.
    assert {r.entry.retransmits for r in index.for_trace(TRACE, UID)} == {3}
    # A completed trace reads each report's own write time (Leases still renewed until the
    # agents stop would otherwise keep changing its status).
    assert {r.entry.last_report_time for r in index.for_trace(TRACE, UID, heartbeats=False)} == {WRITTEN}


def test_watch_events_renew_and_forget_heartbeats():
    index = ReportIndex()
    index.replace([report("a")])
    index.replace_heartbeats([])
    renewed = WRITTEN + timedelta(seconds=20)
    index.observe_heartbeat(lease("a", renewed))
    assert heard(index) == {"a": renewed}
    index.observe_heartbeat(lease("a", renewed), deleted=True)
    assert heard(index) == {"a": WRITTEN}


def test_a_lease_named_for_another_node_than_its_holder_is_ignored():
    index = ReportIndex()
    index.replace([report("a")])
    forged = lease("b", WRITTEN + timedelta(minutes=5))
    forged["metadata"]["name"] = report("a")["metadata"]["name"]   # holder b, name of a's report
    index.replace_heartbeats([forged])
    assert heard(index) == {"a": WRITTEN}


def asking(node: str, trace: str, uid: str, needs: bool) -> dict:
    entry = NodeStatus(node=node, phase="Failed" if needs else "Running", retransmits=1, last_report_time=WRITTEN,
                       message="no BPF with capabilities" if needs else None, needs_privileged=needs or None)
    return report_object(trace, uid, node, NS, entry)


@pytest.mark.parametrize("seed", range(10))
def test_the_reports_asking_for_privileged_agents_are_kept_per_trace_through_any_changes(seed):
    """What a pass reads instead of going over every report: the same as going over them."""
    rng = random.Random(seed)
    owners = [("shop", "uid-1"), ("shop", "uid-0"), ("web", "uid-9")]   # uid-0: an earlier trace "shop"
    index = ReportIndex()
    index.replace([])
    index.replace_heartbeats([])
    current: dict[tuple[str, str], dict] = {}
    for step in range(80):
        trace, uid = rng.choice(owners)
        node = f"node-{rng.randrange(6)}"
        roll = rng.random()
        if roll < 0.2 and (trace, node) in current:
            index.observe(current.pop((trace, node)), deleted=True)
        elif roll < 0.25:   # a relist, after deletions the watch missed
            current = {k: v for k, v in current.items() if rng.random() < 0.7}
            index.replace(list(current.values()))
        else:
            current[(trace, node)] = asking(node, trace, uid, rng.random() < 0.4)
            index.observe(current[(trace, node)])
        for t, u in owners:
            scanned = [r.entry for r in index.for_trace(t, u, heartbeats=False) if r.entry.needs_privileged]
            assert index.asking_privileged(t, u) == scanned, f"step {step}"


def test_a_new_leadership_term_is_not_synced_until_both_kinds_are_listed_again():
    index = ReportIndex()
    index.replace([report("a")])
    index.replace_heartbeats([])
    assert index.synced.is_set()
    index.reset()   # what the last term saw may be long gone
    assert not index.synced.is_set()
    index.replace([report("b")])
    assert not index.synced.is_set()
    index.replace_heartbeats([])
    assert index.synced.is_set() and set(heard(index)) == {"b"}


def test_a_pass_reads_the_index_while_a_relist_is_being_summed(monkeypatch):
    """Summing 25,000 listed reports takes seconds: a pass must not wait for it (it would
    stall the operator's event loop), only for the swap."""
    import threading

    from retransmit_operator import reportindex

    index = ReportIndex()
    index.replace([report("a")])
    index.replace_heartbeats([])
    read_meanwhile: list[set[str]] = []
    build = reportindex._Indexes.of

    def slow_build(reports):
        reader = threading.Thread(target=lambda: read_meanwhile.append(set(heard(index))))
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "the pass waited for the relist's sums"
        return build(reports)

    monkeypatch.setattr(reportindex._Indexes, "of", slow_build)
    index.replace([report("a"), report("b")])
    assert read_meanwhile == [{"a"}]   # the old index, whole, while the new one was summed
    assert set(heard(index)) == {"a", "b"}
