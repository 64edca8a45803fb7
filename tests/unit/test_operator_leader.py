"""Leader election's decisions (operator/leader.py), pure."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.naming import micro_time
from retransmit_operator.leader import LEASE_SECONDS, RENEW_DEADLINE_SECONDS, can_acquire, held_spec

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


def held_by(holder, renewed_ago):
    return {"holderIdentity": holder, "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": micro_time(NOW - timedelta(seconds=renewed_ago))}


def test_a_free_or_own_lease_is_taken_and_anothers_only_once_it_expired():
    assert can_acquire({}, "b", NOW)
    assert can_acquire({"holderIdentity": ""}, "b", NOW)               # released
    assert can_acquire(held_by("b", 1), "b", NOW)                       # renewing its own
    assert not can_acquire(held_by("a", LEASE_SECONDS - 1), "b", NOW)
    assert can_acquire(held_by("a", LEASE_SECONDS), "b", NOW)


def test_a_leader_gives_up_before_anyone_may_take_over():
    """The leader stops after RENEW_DEADLINE_SECONDS without a renewal; others may take the
    Lease only after LEASE_SECONDS: never two leaders."""
    assert RENEW_DEADLINE_SECONDS < LEASE_SECONDS


def test_taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time():
    first = held_spec({}, "a", NOW)
    assert (first["holderIdentity"], first["leaseTransitions"]) == ("a", 0)
    later = NOW + timedelta(seconds=2)
    renewed = held_spec(first, "a", later)
    assert renewed["acquireTime"] == first["acquireTime"] and renewed["renewTime"] == micro_time(later)
    taken = held_spec({**first, "holderIdentity": ""}, "b", later)
    assert (taken["holderIdentity"], taken["leaseTransitions"], taken["acquireTime"]) == ("b", 1, micro_time(later))
