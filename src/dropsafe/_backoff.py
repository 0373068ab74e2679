"""Attempts, backoff and the deadline of a unit of work: the decisions, with no I/O.

`run_transaction` and `run_transaction_async` share this; they differ only in how they sleep.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import time
from typing import TYPE_CHECKING, Literal

from dropsafe._errors import RetriesExhausted
from dropsafe._policy import Policy, seconds
from dropsafe._redaction import describe_error
from dropsafe.events import RetriesGaveUp, RetryScheduled, emit

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dropsafe._classify import Kind

__all__ = ["Attempts", "test_mode"]

_MAX_EXPONENT = 64  # backoff_multiplier (at most 10) ** 64 is still a finite float
_NO_BACKOFF: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dropsafe_no_backoff", default=False
)


@contextlib.contextmanager
def test_mode() -> Iterator[None]:
    """Retry at once, without backoff sleeps, inside this block (for your own test suites).

    Attempts and deadlines still apply. It holds for the current thread or task and what it
    starts with a copy of its context (asyncio tasks); a plain new thread starts without it.

    Example::

        with dropsafe.test_mode():
            run_transaction(Session, create_post)
    """
    token = _NO_BACKOFF.set(True)
    try:
        yield
    finally:
        _NO_BACKOFF.reset(token)


class Attempts:
    """Counts the runs of one unit of work and decides how long to wait before the next.

    Only runs that reached the server count against ``Policy.max_attempts``: while the server
    cannot be reached at all (a restart, a failover), connecting is retried with the same
    backoff until the deadline, as psycopg_pool's ``reconnect_timeout`` does. The deadline is
    absolute: no run starts once it has passed.
    """

    def __init__(self, policy: Policy, *, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.number = 1
        self.failed_connects = 0
        self.started = time.monotonic()
        self.deadline = self.started + seconds(policy.deadline)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def next_delay(self, kind: Kind, error: BaseException, *, reached_server: bool = True) -> float:
        """Return the backoff before the next run, or raise `RetriesExhausted` from ``error``.

        ``reached_server`` is False when the run failed to get a connection at all: that
        does not use up an attempt, only time. Full jitter: uniform in
        [0, min(backoff_max, backoff_initial * multiplier ** (n - 1))], n counting failures.
        """
        policy = self.policy
        text = describe_error(error)
        if reached_server and self.number >= policy.max_attempts:
            self._give_up("attempts", text, error)
        # The exponent is capped: a long outage makes thousands of failed connects.
        growth = min(self.number + self.failed_connects - 1, _MAX_EXPONENT)
        bound = min(
            seconds(policy.backoff_max),
            seconds(policy.backoff_initial) * policy.backoff_multiplier**growth,
        )
        delay = 0.0 if _NO_BACKOFF.get() else self._rng.uniform(0, bound)
        if time.monotonic() + delay >= self.deadline:
            self._give_up("deadline", text, error)
        emit(policy.hooks, RetryScheduled(self.number, delay, kind, text))
        if reached_server:
            self.number += 1
        else:
            self.failed_connects += 1
        return delay

    def _give_up(
        self, reason: Literal["attempts", "deadline"], text: str, error: BaseException
    ) -> None:
        elapsed = time.monotonic() - self.started
        emit(self.policy.hooks, RetriesGaveUp(self.number, elapsed, reason, text))
        runs = f"{self.number} attempt(s)"
        if self.failed_connects:
            runs += f" and {self.failed_connects} failed connect(s)"
        if reason == "attempts":
            why = f"after {runs}"
        else:
            deadline = seconds(self.policy.deadline)
            why = f"at the {deadline:g}s deadline after {runs}"
        raise RetriesExhausted(
            f"unit of work gave up {why} in {elapsed:.2f}s; last error: {text}",
            attempts=self.number,
        ) from error
