"""The operator's index of reports and heartbeat Leases: a node is heard at the later of its
report's lastReportTime and its Lease's renewTime, only from Leases of the same trace, and the
index says it is synced only once both kinds were listed."""

from __future__ import annotations

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
