"""Which reports a trace counts (operator/vouching.py): a node that runs or ran an agent pod
of the trace, one its placement selects, one marked departed, or one the operator does not
know; never a node that the trace leaves out and where none of its agents ran."""

from __future__ import annotations

import pytest

from retransmit_core.api import NodeReportStatus, NodeStatus
from retransmit_operator.placement import NodeFacts, Placement
from retransmit_operator.reportindex import StoredReport
from retransmit_operator.vouching import ignored_message, unvouched

pytestmark = pytest.mark.unit

POOL = Placement({"kubernetes.io/os": "linux", "pool": "blue"}, ())
NODES = {
    "blue-1": NodeFacts("blue-1", {"kubernetes.io/os": "linux", "pool": "blue"}, ()),
    "blue-tainted": NodeFacts("blue-tainted", {"kubernetes.io/os": "linux", "pool": "blue"},
                              ({"key": "dedicated", "value": "db", "effect": "NoSchedule"},)),
    "green-1": NodeFacts("green-1", {"kubernetes.io/os": "linux", "pool": "green"}, ()),
    "green-2": NodeFacts("green-2", {"kubernetes.io/os": "linux", "pool": "green"}, ()),
    "green-3": NodeFacts("green-3", {"kubernetes.io/os": "linux", "pool": "green"}, ()),
}


def stored(node: str, departed: bool = False) -> StoredReport:
    return StoredReport("ns", f"shop.{node}", "shop", frozenset({"uid"}), NodeStatus(node=node, retransmits=1),
                        NodeReportStatus(departed=departed))


def test_only_reports_no_agent_of_the_trace_can_have_written_are_left_out():
    reports = [stored(n) for n in ("blue-1", "blue-tainted", "green-1", "green-2", "unknown-node")]
    reports.append(stored("green-3", departed=True))
    # blue-1: selected. green-1: an agent pod ran there (the selector changed since).
    # green-3: marked departed by the operator. unknown-node: not in the Node watch (yet).
    # blue-tainted: selected, but a taint the trace does not tolerate keeps its agents off.
    assert unvouched(reports, frozenset({"green-1"}), NODES, POOL) == {"green-2", "blue-tainted"}
    tolerant = Placement(POOL.node_selector, ({"operator": "Exists"},))
    assert unvouched(reports, frozenset({"green-1"}), NODES, tolerant) == {"green-2"}


def test_nothing_is_left_out_when_the_operator_cannot_tell():
    reports = [stored("green-2")]
    assert unvouched(reports, frozenset(), NODES, None) == frozenset()   # invalid spec: no placement
    assert unvouched(reports, frozenset(), {}, POOL) == frozenset()      # no Node watch


def test_the_message_names_the_nodes_and_how_to_look():
    message = ignored_message([f"n{i}" for i in range(7)], "retransmit-system", "shop")
    assert "n0, n1, n2, n3, n4 and 2 more" in message
    assert "kubectl -n retransmit-system get rtreport -l retransmit.dev/trace=shop" in message
