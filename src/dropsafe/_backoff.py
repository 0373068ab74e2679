"""How long a unit of work waits before it runs again: full-jitter backoff, and `test_mode`.

`test_mode` lives here because it is the switch on this one decision: inside it, every wait
is zero, while attempts and deadlines still apply.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING

from dropsafe._policy import UnitPolicy, seconds

if TYPE_CHECKING:
    import random
    from collections.abc import Iterator

__all__ = ["backoff", "full_jitter", "test_mode"]

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
