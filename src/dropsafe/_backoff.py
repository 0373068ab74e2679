"""How long a unit of work waits before it runs again: full-jitter backoff, and `test_mode`.

Also who waits: inside `waits_elsewhere` a connect fails at once, because the caller (a unit of
work, a commit resolution) waits for the server itself, within its own deadline; and how a
wait in SQLAlchemy's asyncio greenlet sleeps (`sleep_in_greenlet`).

`test_mode` lives here because it is the switch on this one decision: inside it, every wait
is zero, while attempts and deadlines still apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import TYPE_CHECKING

from sqlalchemy.util import concurrency

from dropsafe._policy import UnitPolicy, seconds

if TYPE_CHECKING:
    import random
    from collections.abc import Iterator

__all__ = [
    "backoff",
    "caller_waits",
    "full_jitter",
    "sleep_in_greenlet",
    "test_mode",
    "waits_elsewhere",
]

_MAX_EXPONENT = 64  # backoff_multiplier (at most 10) ** 64 is still a finite float
_NO_BACKOFF: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dropsafe_no_backoff", default=False
)
_WAITS_ELSEWHERE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dropsafe_connect_waits_elsewhere", default=False
)


# Runs a coroutine from SQLAlchemy's greenlet; SQLAlchemy 2.1 renamed await_only to await_.
_await = getattr(concurrency, "await_", None) or concurrency.await_only


def sleep_in_greenlet(delay: float) -> None:
    """Sleep without blocking the event loop, from sync code in SQLAlchemy's asyncio greenlet.

    An async engine's connect, a unit's resolution and a plain COMMIT's resolution run there.
    """
    _await(asyncio.sleep(delay))


class waits_elsewhere:  # noqa: N801 - used as a function: ``with waits_elsewhere():``
    """Inside this block a failed connect fails at once: the caller waits on its own terms.

    For a unit of work (its loop waits for the server until its deadline) and for what runs
    within its deadline (commit resolution). Holds for the thread or task, and for the
    greenlets SQLAlchemy runs an async engine's work in. A class, not a generator: every
    attempt of a unit enters one (three Python calls, where ``contextlib`` made eight).
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _WAITS_ELSEWHERE.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _WAITS_ELSEWHERE.reset(self._token)


def caller_waits() -> bool:
    """Whether a connect here must fail at once (see `waits_elsewhere`)."""
    return _WAITS_ELSEWHERE.get()


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


def backoff(policy: UnitPolicy, failures: int, rng: random.Random) -> float:
    """Return the wait after the ``failures``-th failure in a row (from 1), in seconds.

    Full jitter: uniform in [0, min(backoff_max, backoff_initial * multiplier ** (n - 1))].
    The exponent is capped: a long outage makes thousands of failed connects.
    """
    if _NO_BACKOFF.get():
        return 0.0
    return full_jitter(
        seconds(policy.backoff_initial),
        seconds(policy.backoff_max),
        policy.backoff_multiplier,
        failures,
        rng,
    )


def full_jitter(
    initial: float, maximum: float, multiplier: float, failures: int, rng: random.Random
) -> float:
    """Return a wait uniform in [0, min(maximum, initial * multiplier ** (failures - 1))].

    The schedule alone, for every loop that backs off (a unit of work, a checkout that waits
    for the server); `test_mode` is the unit's switch, not this function's.
    """
    growth = min(failures - 1, _MAX_EXPONENT)
    return rng.uniform(0, min(maximum, initial * multiplier**growth))
