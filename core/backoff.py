"""Retry spacing for every loop that talks to the API server (agent and operator alike):
exponential, capped, with "equal jitter", so thousands of agents that lost the API server
together do not come back together, and no delay ever collapses to zero (no spinning)."""

from __future__ import annotations

import random
from typing import Callable

from .schedule import INTERVAL_JITTER

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0


def backoff_delay(attempt: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS,
                  rng: Callable[[], float] = random.random) -> float:
    """Delay before retry number `attempt` (0-based): half the capped step fixed, half random."""
    step = min(cap, base * (2 ** min(attempt, 32)))
    return step / 2 + rng() * step / 2


def jittered(interval: float, rng: Callable[[], float] = random.random, spread: float = INTERVAL_JITTER) -> float:
    """The interval +-INTERVAL_JITTER, so agents started together do not write in lock-step."""
    return interval * (1 - spread + 2 * spread * rng())
