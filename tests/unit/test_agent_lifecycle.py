"""The agent's lifecycle decisions (issue 22): the SIGTERM write within its budget, noticing a
deleted report, resuming only from the own trace's report. Pure functions, real inputs."""

from __future__ import annotations

import pytest

from retransmit_agent.writeschedule import (
    FINAL_ATTEMPT_MIN_SECONDS,
    final_attempt_timeout,
    final_retry_wait,
)
from retransmit_core.backoff import backoff_delay
from retransmit_core.schedule import FINAL_REPORT_BUDGET_SECONDS, WRITE_TIMEOUT_SECONDS

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- the final report's budget

def test_the_first_final_write_may_use_the_whole_budget_for_a_slow_answer():
    # Longer than an ordinary write's timeout: a slow API server's answer within the budget lands.
    assert final_attempt_timeout(FINAL_REPORT_BUDGET_SECONDS) == FINAL_REPORT_BUDGET_SECONDS > WRITE_TIMEOUT_SECONDS
    assert final_attempt_timeout(3.5) == 3.5
    assert final_attempt_timeout(FINAL_ATTEMPT_MIN_SECONDS / 2) is None   # too late to start one


def test_final_retries_back_off_but_always_leave_room_for_one_more_attempt():
    assert final_retry_wait(2.0, 15.0) == 2.0
    assert final_retry_wait(5.0, 3.0) == 3.0 - FINAL_ATTEMPT_MIN_SECONDS    # cut to fit
    assert final_retry_wait(5.0, FINAL_ATTEMPT_MIN_SECONDS) == 0.0
    assert final_retry_wait(0.5, FINAL_ATTEMPT_MIN_SECONDS / 2) is None    # no attempt fits any more


def test_final_attempts_against_an_api_server_that_never_answers_end_within_the_budget():
    """Play the agent's final loop against a server whose every call takes its whole timeout
    or fails at once: the attempts stop, and the last one ends by the budget."""
    for call_seconds in (lambda timeout: timeout, lambda timeout: 0.05):
        clock, attempts = 0.0, 0
        while True:
            timeout = final_attempt_timeout(FINAL_REPORT_BUDGET_SECONDS - clock)
            if timeout is None:
                break
            clock += call_seconds(timeout)
            attempts += 1
            wait = final_retry_wait(backoff_delay(attempts - 1, cap=5.0), FINAL_REPORT_BUDGET_SECONDS - clock)
            if wait is None:
                break
            clock += wait
        assert attempts >= 1 and clock <= FINAL_REPORT_BUDGET_SECONDS
