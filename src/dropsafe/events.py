"""Events: one frozen dataclass per thing dropsafe did, handed to the hooks of the policy.

Hooks are plain callables taking one event; they are attached to a `Policy`
(``Policy(hooks=(my_hook,))``), so each engine reports to its own hooks and nothing is global.
A hook that raises is logged and ignored: observing must never break the application.

Example::

    def count_retries(event: dropsafe.events.Event) -> None:
        if isinstance(event, dropsafe.events.RetryScheduled):
            metrics.retries.inc()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Union

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dropsafe.classify import Kind

__all__ = [
    "CommitResolved",
    "DeadConnectionReplaced",
    "Event",
    "Hook",
    "PingSucceeded",
    "RetriesGaveUp",
    "RetryScheduled",
    "emit",
]

logger = logging.getLogger("dropsafe")


@dataclass(frozen=True)
class DeadConnectionReplaced:
    """A pooled connection was found dead at checkout and replaced before the app saw it."""

    reason: str
    pool_wide: bool  # every older pooled connection was recycled too


@dataclass(frozen=True)
class PingSucceeded:
    """A checkout paid a round trip (idle too long, or something arrived while idle)."""

    latency: float  # seconds
    why: Literal["idle", "suspect"]


@dataclass(frozen=True)
class RetryScheduled:
    """A unit of work failed with a retryable error and will run again after ``delay``."""

    attempt: int  # the attempt that failed, from 1
    delay: float  # seconds
    kind: Kind
    error: str  # the error's type and message, passwords redacted


@dataclass(frozen=True)
class RetriesGaveUp:
    """A unit of work ran out of attempts or of time; `RetriesExhausted` follows."""

    attempts: int
    elapsed: float
    reason: Literal["attempts", "deadline"]
    error: str


@dataclass(frozen=True)
class CommitResolved:
    """A COMMIT whose reply was lost was resolved by asking the server."""

    xid: int
    outcome: Literal["committed", "aborted", "unknown"]
    elapsed: float  # seconds spent asking


Event = Union[  # noqa: UP007 - a runtime alias, evaluated on Python 3.10
    DeadConnectionReplaced, PingSucceeded, RetryScheduled, RetriesGaveUp, CommitResolved
]


class Hook(Protocol):
    """Anything that takes an event."""

    def __call__(self, event: Event, /) -> None:
        """Observe one event; must not block for long."""


def emit(hooks: Iterable[Hook], event: Event) -> None:
    """Hand ``event`` to every hook; a failing hook is logged, never raised."""
    for hook in hooks:
        try:
            hook(event)
        except Exception:  # noqa: PERF203 - one failing hook must not silence the others
            logger.exception("dropsafe hook %r failed on %r", hook, event)
