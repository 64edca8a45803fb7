"""Short garbage-collector pauses for a process that holds millions of long-lived objects.

CPython's full collection walks every tracked object and stops every thread meanwhile. At 5
traces x 5,000 nodes the operator holds 25,000 parsed reports, about 6.5 million objects (a
full collection over them alone took 2.3 s here; inside the busy operator of the
control-plane bench one took 9 s, and a busy node's write reached its summary 10 s late).
The reports hold no reference cycles and live for minutes, so cycle detection over them
finds nothing.

So the long-lived heap is frozen (`gc.freeze`: moved to the permanent generation, which no
collection walks; its objects are still freed when their last reference goes) every
FREEZE_EVERY seconds, right after a collection of what is not frozen yet (the garbage made
since the last freeze, so none of it is frozen). Full collections then walk only the objects
that became long-lived since. The price: a reference cycle that was alive when frozen and
dies later is not reclaimed until the next thaw; every THAW_EVERY seconds everything is
unfrozen and collected once, a long pause at a known rate instead of one whenever the
heap has grown by a quarter (CPython's trigger for a full collection).

The process entry point tends its heap; an operator embedded in another process (tests)
leaves that process's collector alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Optional

log = logging.getLogger(__name__)

FREEZE_EVERY = 60.0
THAW_EVERY = 3600.0


class Step(Enum):
    NOTHING = "nothing"
    FREEZE = "freeze"     # collect what is not frozen, then freeze what is left
    THAW = "thaw"         # unfreeze, collect everything, then freeze what is left


def next_step(now: float, frozen_at: Optional[float], thawed_at: Optional[float],
              freeze_every: float = FREEZE_EVERY, thaw_every: float = THAW_EVERY) -> Step:
    """What the heap needs at `now` (monotonic), given the last freeze and the last thaw."""
    if thawed_at is None or now - thawed_at >= thaw_every:
        return Step.THAW
    if frozen_at is None or now - frozen_at >= freeze_every:
        return Step.FREEZE
    return Step.NOTHING


@dataclass
class Heap:
    frozen_at: Optional[float] = None
    thawed_at: Optional[float] = None

    def tend(self, now: float) -> Step:
        step = next_step(now, self.frozen_at, self.thawed_at)
        if step is Step.NOTHING:
            return step
        started = time.perf_counter()
        if step is Step.THAW:
            gc.unfreeze()
            self.thawed_at = now
        gc.collect()
        gc.freeze()
        self.frozen_at = now
        log.debug("heap %s: %d objects frozen, %.3f s", step.value, gc.get_freeze_count(), time.perf_counter() - started)
        return step

    async def tend_forever(self, every: float = FREEZE_EVERY / 4) -> None:
        while True:
            self.tend(time.monotonic())
            await asyncio.sleep(every)
