"""The operator's heap policy (operator/heap.py): freeze the long-lived heap every
FREEZE_EVERY seconds after collecting what is not frozen, thaw and collect everything every
THAW_EVERY seconds; and what freezing does to this process's collector."""

from __future__ import annotations

import gc

import pytest

from retransmit_operator.heap import FREEZE_EVERY, THAW_EVERY, Heap, Step, next_step

pytestmark = pytest.mark.unit


def test_the_first_step_thaws_then_freezes_every_interval_and_thaws_every_hour():
    assert next_step(100.0, None, None) is Step.THAW
    assert next_step(100.0 + FREEZE_EVERY - 1, 100.0, 100.0) is Step.NOTHING
    assert next_step(100.0 + FREEZE_EVERY, 100.0, 100.0) is Step.FREEZE
    assert next_step(100.0 + THAW_EVERY, 100.0 + THAW_EVERY - 1, 100.0) is Step.THAW


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_frozen_objects_are_left_out_of_collections_and_garbage_is_never_frozen():
    heap = Heap()
    try:
        garbage = Cycle()
        alive = Cycle()
        del garbage   # unreachable, but only a collection can free a cycle
        assert heap.tend(0.0) is Step.THAW
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not any(isinstance(o, Cycle) and o is not alive for o in gc.get_objects())   # collected first
        assert all(o is not alive for o in gc.get_objects())   # frozen: no generation holds it
        assert heap.tend(1.0) is Step.NOTHING and gc.get_freeze_count() == frozen
        assert heap.tend(FREEZE_EVERY) is Step.FREEZE
    finally:
        gc.unfreeze()
