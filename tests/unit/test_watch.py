"""The list-then-watch loop (core/watch.py) backs off while its watch keeps failing, even
when each list before it succeeds, and starts its backoff over once a watch works."""

from __future__ import annotations

import threading

import pytest

from retransmit_core.watch import list_then_watch

pytestmark = pytest.mark.unit


class Refused(Exception):
    pass


def run(watch_events: list[list[dict]], failures_before_stop: int) -> tuple[list[int], int]:
    """The backoff attempts asked for and the lists made, until `failures_before_stop`
    interruptions. Each watch yields its events, then is refused (a 403, say)."""
    stop = threading.Event()
    attempts: list[int] = []
    lists = [0]

    def list_objects() -> dict:
        lists[0] += 1
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    def watch_from(version):
        events = watch_events[min(len(attempts), len(watch_events) - 1)]
        yield from events
        raise Refused("HTTP 403: cannot watch")

    def backoff(attempt: int) -> float:
        attempts.append(attempt)
        if len(attempts) >= failures_before_stop:
            stop.set()
        return 0.0

    list_then_watch(list_objects, watch_from, lambda items, version: None, lambda obj, deleted: None, stop,
                    "things", backoff)
    return attempts, lists[0]


def test_a_watch_refused_after_each_successful_list_backs_off_longer_each_time():
    attempts, lists = run([[]], failures_before_stop=5)
    assert attempts == [0, 1, 2, 3, 4]
    assert lists == 5


def test_a_watch_that_delivered_events_starts_the_backoff_over():
    event = {"type": "MODIFIED", "raw_object": {"metadata": {"name": "a", "resourceVersion": "2"}}}
    attempts, _ = run([[], [], [event], []], failures_before_stop=5)
    assert attempts == [0, 1, 0, 1, 2]
