"""Each trace on its own schedule (Reconciler.sync_forever): a trace whose status write hangs
on a busy API server holds back neither another trace's passes nor, once it is gone, anything;
while it hangs, the operator's heartbeat stays where that trace's pass began, so the liveness
probe notices a pass that never ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

from tests.unit.operator_fakes import FakeKube, reconciler, trace

pytestmark = pytest.mark.unit

WAIT = 30.0   # seconds a condition may take on a loaded machine


class SlowStatusKube(FakeKube):
    """The status write of trace `slow` waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.status_writes: dict[str, int] = {}

    async def apply_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.status_writes[name] = self.status_writes.get(name, 0) + 1
        if name == "slow":
            await self.release.wait()
        return await super().apply_status(name, status)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT:.0f}s: {what}"
        await asyncio.sleep(0.01)


def test_a_trace_whose_status_write_hangs_does_not_hold_back_another_traces_passes():
    async def scenario() -> None:
        kube = SlowStatusKube()
        r = reconciler(kube, trace("slow", "uid-1"), trace("fast", "uid-2"), sync_interval=0.1)
        r.daemonsets.replace([], "1")
        passes: dict[str, int] = {}
        reconcile = r.reconcile

        async def counted(body: dict[str, Any], **kwargs: Any) -> Any:
            done = await reconcile(body, **kwargs)
            passes[body["metadata"]["name"]] = passes.get(body["metadata"]["name"], 0) + 1
            return done
        r.reconcile = counted   # type: ignore[method-assign]
        sync = asyncio.create_task(r.sync_forever())
        try:
            await until(lambda: kube.status_writes.get("slow") == 1, "slow's first status write began")
            await until(lambda: passes.get("fast", 0) >= 5, "5 passes over fast")
            assert kube.status_writes["slow"] == 1 and "slow" not in passes   # still the first, hanging
            # The heartbeat stays at (or before) the start of slow's loop: its pass has not ended.
            heartbeat = r.last_sync
            await until(lambda: passes["fast"] >= 8, "8 passes over fast")
            assert r.last_sync == heartbeat
            kube.release.set()
            await until(lambda: passes.get("slow", 0) >= 2, "slow's next pass")
            await until(lambda: r.last_sync is not None and r.last_sync > heartbeat, "the heartbeat moving on")
        finally:
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)
    asyncio.run(scenario())


def test_a_deleted_trace_loop_ends_and_a_new_trace_gets_one():
    async def scenario() -> None:
        kube = FakeKube()
        gone, stays = trace("gone", "uid-1"), trace("stays", "uid-2")
        r = reconciler(kube, gone, stays, sync_interval=0.1)
        r.daemonsets.replace([], "1")
        sync = asyncio.create_task(r.sync_forever())
        try:
            await until(lambda: {"gone", "stays"} <= set(r._phases), "both traces passed once")
            r.observe_trace("DELETED", gone)
            await until(lambda: "gone" not in r._phases and "gone" not in r._trace_passed, "gone's loop ended")
            tasks = lambda: {t.get_name() for t in asyncio.all_tasks()}   # noqa: E731
            await until(lambda: "rtrace-sync-gone" not in tasks(), "gone's task ended")
            new = trace("new", "uid-3")
            kube.traces["new"] = dict(new)
            r.observe_trace("ADDED", new)
            await until(lambda: "new" in r._phases and "rtrace-sync-new" in tasks(), "new's loop running")
        finally:
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)
        # Stopping the schedule stops every trace's loop with it.
        await until(lambda: not any(t.get_name().startswith("rtrace-sync-") for t in asyncio.all_tasks()),
                    "every trace's loop stopped")
    asyncio.run(scenario())
