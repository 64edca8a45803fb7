"""Pending per-CPU runs merge into flow-map entries; reported flow counts never go backwards."""

from __future__ import annotations

import pytest

from retransmit_agent.flows import SocketState
from retransmit_agent.runs import FlowEntry, merge_pending_runs

pytestmark = pytest.mark.unit

A, B = ("flow", "a"), ("flow", "b")


def test_runs_add_to_their_flow_and_create_flows_not_yet_in_the_map():
    entries = {A: FlowEntry(10, 1, first_ns=100, last_ns=500, last_state=1)}
    runs = [(A, FlowEntry(5, 0, 600, 900, 4)), (B, FlowEntry(3, 0, 700, 800, 1)), (A, FlowEntry(2, 0, 50, 60, 1))]
    merged, floors = merge_pending_runs(entries, runs, {})
    assert merged[A] == FlowEntry(17, 1, first_ns=50, last_ns=900, last_state=4)
    assert merged[B] == FlowEntry(3, 0, 700, 800, 1)
    assert floors == {A: (17, 1, 0, 0, 0, 0), B: (3, 0, 0, 0, 0, 0)}


def test_a_run_moved_into_the_map_between_reads_cannot_lower_a_flow():
    # snapshot 1 saw 10 in the map and a run of 5; during snapshot 2's reads the run moved
    # into the map after the map was read: the map still says 10 and the run is gone.
    first, floors = merge_pending_runs({A: FlowEntry(10, 0, 1, 2, 1)}, [(A, FlowEntry(5, 0, 3, 4, 1))], {})
    assert first[A].retransmits == 15
    second, floors = merge_pending_runs({A: FlowEntry(10, 0, 1, 2, 1)}, [], floors)
    assert second[A].retransmits == 15
    third, floors = merge_pending_runs({A: FlowEntry(16, 0, 1, 5, 1)}, [], floors)
    assert third[A].retransmits == 16


def test_floors_are_kept_only_for_flows_still_present():
    _, floors = merge_pending_runs({A: FlowEntry(4, 0, 1, 2, 1), B: FlowEntry(1, 0, 1, 2, 1)}, [], {})
    merged, floors = merge_pending_runs({B: FlowEntry(1, 0, 1, 2, 1)}, [], floors)
    assert set(merged) == set(floors) == {B}


def test_causes_add_up_keep_their_floors_and_the_latest_socket_wins():
    old, new = SocketState(100, 10, 5, 1, 0), SocketState(900, 2, 1, 1, 3)
    entry = FlowEntry(6, 0, 1, 10, 1, by_cause=(0, 1, 5, 0), socket=old)
    run = FlowEntry(4, 0, 20, 30, 1, by_cause=(0, 4, 0, 0), socket=new)
    merged, floors = merge_pending_runs({A: entry}, [(A, run)], {})
    assert merged[A].by_cause == (0, 5, 5, 0) and merged[A].socket == new
    assert floors[A] == (10, 0, 0, 5, 5, 0)
    # the run moved into the map between reads: neither the total nor a cause goes back
    again, _ = merge_pending_runs({A: entry}, [], floors)
    assert again[A].retransmits == 10 and again[A].by_cause == (0, 5, 5, 0)
