import logging
import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dropsafe
from dropsafe import ErrorKind, UnitPolicy
from dropsafe._hooks import emit
from dropsafe._unit.core import RetryBudget
from dropsafe.events import RetryScheduled

ERROR = ConnectionResetError(104, "reset by postgresql://app:s3cret@db/app")


class _LongestJitter(random.Random):
    def uniform(self, a, b):  # noqa: ARG002 - the signature of random.Random.uniform
        return b


def test_full_jitter_grows_to_the_cap():
    policy = UnitPolicy(
        backoff_initial=0.1, backoff_max=0.8, backoff_multiplier=2, max_attempts=50, deadline=1000
    )
    attempts = RetryBudget(policy, (), rng=random.Random(1))
    bounds = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    delays = [attempts.next_delay(ErrorKind.DISCONNECT, ERROR) for _ in bounds]
    assert all(0 <= delay <= bound for delay, bound in zip(delays, bounds, strict=True))
    assert len(set(delays)) == len(delays), "jitter draws a fresh delay each time"


@given(
    initial=st.floats(0, 5),
    extra=st.floats(0, 5),
    multiplier=st.floats(1, 10),
    seed=st.integers(0, 2**32),
)
def test_every_delay_stays_within_the_cap(initial, extra, multiplier, seed):
    policy = UnitPolicy(
        backoff_initial=initial,
        backoff_max=initial + extra,
        backoff_multiplier=multiplier,
        max_attempts=20,
        deadline=86400,
    )
    attempts = RetryBudget(policy, (), rng=random.Random(seed))
    for _ in range(19):
        assert 0 <= attempts.next_delay(ErrorKind.TRANSIENT, ERROR) <= initial + extra


def test_attempts_run_out_by_raising_the_last_error_itself():
    error = ConnectionResetError(104, "reset by postgresql://app:s3cret@db/app")
    attempts = RetryBudget(UnitPolicy(max_attempts=2), ())
    attempts.next_delay(ErrorKind.DISCONNECT, error)
    with pytest.raises(ConnectionResetError) as raised:
        attempts.next_delay(ErrorKind.DISCONNECT, error)
    assert raised.value is error  # what the app's own except clauses already catch
    notes = getattr(raised.value, "__notes__", [])
    if sys.version_info >= (3, 11):
        assert any("gave up after 2 attempt(s)" in note for note in notes)
    assert not any("s3cret" in note for note in notes)


def test_a_delay_past_the_deadline_gives_up_now():
    policy = UnitPolicy(deadline=0.05, backoff_initial=10, backoff_max=10, backoff_multiplier=1)
    attempts = RetryBudget(policy, (), rng=_LongestJitter())
    error = ConnectionResetError(104, "reset")
    with pytest.raises(ConnectionResetError) as raised:
        attempts.next_delay(ErrorKind.DISCONNECT, error)
    if sys.version_info >= (3, 11):
        assert any("deadline" in note for note in raised.value.__notes__)


def test_test_mode_removes_the_sleeps_only_inside_the_block():
    policy = UnitPolicy(backoff_initial=1, backoff_max=1, backoff_multiplier=1, max_attempts=10)
    attempts = RetryBudget(policy, (), rng=random.Random(3))
    with dropsafe.test_mode():
        assert attempts.next_delay(ErrorKind.DISCONNECT, ERROR) == 0
    assert attempts.next_delay(ErrorKind.DISCONNECT, ERROR) > 0


def test_events_carry_redacted_errors_and_a_failing_hook_is_only_logged(caplog):
    seen = []

    def broken(event):
        raise RuntimeError("hook bug")

    attempts = RetryBudget(UnitPolicy(), (broken, seen.append))
    with caplog.at_level(logging.ERROR, logger="dropsafe"):
        attempts.next_delay(ErrorKind.FAILOVER, ERROR)
    (event,) = seen
    assert isinstance(event, RetryScheduled)
    assert event.kind is ErrorKind.FAILOVER
    assert "s3cret" not in event.error
    assert "hook bug" in caplog.text


def test_emit_with_no_hooks_is_a_no_op():
    emit((), RetryScheduled(1, 0.0, ErrorKind.DISCONNECT, "x"))


def test_a_long_outage_of_failed_connects_keeps_backing_off():
    # Thousands of refused connects (a restart waited out in test mode) must not overflow.
    policy = UnitPolicy(backoff_initial=0.1, backoff_max=1, max_attempts=2, deadline=86400)
    attempts = RetryBudget(policy, (), rng=_LongestJitter())
    for _ in range(5000):
        delay = attempts.next_delay(ErrorKind.FAILOVER, ERROR, reached_server=False)
    assert delay == 1
    assert attempts.number == 1  # no run reached the server: no attempt used up
