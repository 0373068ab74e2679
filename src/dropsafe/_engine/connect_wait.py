"""A checkout that waits out a short outage instead of failing the request at once.

`ConnectWait` wraps the pool's creator, so every connect the pool makes (a new connection, a
dead one replaced at checkout) tries again with full-jitter backoff until
``ConnectionPolicy.connect_wait`` has passed, while the error says the server is not there now
(`worth_waiting`); the first-statement replay waits the same way for a pooler that turns its
clients away (`ConnectWait.try_again`). Each try runs SQLAlchemy's whole connect again
(``do_connect`` listeners included), so a multi-host target moves past the host that just
failed. Inside a unit of work a connect fails at once: the unit waits itself. What users see,
and why 10 s: docs/settings.md, "When the server is not there".
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Literal, TypeVar

from dropsafe._backoff import caller_waits, full_jitter, sleep_in_greenlet
from dropsafe._classify import classify
from dropsafe._hooks import emit
from dropsafe._policy import seconds
from dropsafe._redaction import describe_error, redact_url
from dropsafe._sqlalchemy_private import pool_connect_function, set_pool_creator
from dropsafe.events import ConnectWaited

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import ConnectionPoolEntry, Pool

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._policy import ConnectionPolicy
    from dropsafe.events import Hook

__all__ = ["ConnectWait", "count_wait_from"]

# The schedule between tries: short first (a restart takes well under a second on a small
# server), never more than half a second apart, so the app gets the server back promptly.
_INITIAL = 0.05
_MAXIMUM = 0.5
_MULTIPLIER = 2.0
# Texts of connect errors that name a TLS setting: a retry cannot fix those, although the
# driver reports some of them as a lost or refused connection.
_TLS_SETTINGS = (
    "does not support ssl",  # libpq, sslmode=require against a server without TLS
    "rejected ssl upgrade",  # asyncpg, ssl=require likewise
    "certificate",
    "sslmode",
)
_JITTER = random.Random()
T = TypeVar("T")
# Where a checkout that refused its pooled connection leaves, on the pool's entry, when it
# began and when it refused it (`count_wait_from`): the connect that replaces it reads and
# drops them. SQLAlchemy reconnects that entry at once; one left longer (another version's
# pool) is ignored rather than let it cut a later checkout's wait short.
_BEGAN = "_dropsafe_checkout_began"
_STALE_AFTER_S = 5.0


def count_wait_from(entry: ConnectionPoolEntry, began: float) -> None:
    """Count the wait of the connect that replaces ``entry``'s connection from ``began``.

    A checkout that waited on its pooled connection first (a ROLLBACK's late reply read, a
    ping), then refused it, has spent part of the request's time already: its replacement
    waits only what is left of ``connect_wait``, so that the checkout still ends within
    ``connect_wait`` plus one ``connect_timeout`` (docs/settings.md). ``began`` is a
    ``time.monotonic()``.
    """
    entry.__dict__[_BEGAN] = (began, time.monotonic())


def worth_waiting(error: BaseException) -> bool:
    """Whether ``error`` from a connect means "the server is not there now"."""
    if not classify(error).retryable:
        return False  # a wrong password, a missing database, the app's own error...
    text = str(error).lower()
    return not any(setting in text for setting in _TLS_SETTINGS)


class ConnectWait:
    """Makes one engine's connects wait up to ``connect_wait`` for a server that is away."""

    def __init__(self, policy: ConnectionPolicy, hooks: tuple[Hook, ...], engine: Engine) -> None:
        self._wait = seconds(policy.connect_wait)
        self._hooks = hooks
        self._url = redact_url(engine.url)
        self._is_async = bool(engine.dialect.is_async)

    @property
    def enabled(self) -> bool:
        """Whether connects wait at all (``connect_wait`` above 0)."""
        return self._wait > 0

    def deadline(self) -> float | None:
        """When a wait that starts now ends (``time.monotonic()``); None if connects do not wait.

        A replay whose fresh connection the server ended sends its statement again only
        until then (`dropsafe._engine.fresh_connection`).
        """
        if not self.enabled or caller_waits():
            return None
        return time.monotonic() + self._wait

    def wrap(self, pool: Pool) -> None:
        """Make ``pool`` (and the pools ``recreate()`` makes from it) connect through the wait."""
        invoke = pool_connect_function(pool)

        # SQLAlchemy calls a creator with this exact signature with the pool's entry.
        def connect(connection_record: ConnectionPoolEntry | None = None) -> DBAPIConnection:
            return self.connect(invoke, connection_record)

        set_pool_creator(pool, connect)

    def connect(
        self,
        invoke: Callable[..., DBAPIConnection],
        entry: ConnectionPoolEntry | None,
    ) -> DBAPIConnection:
        """Connect; while the server is not there, try again until ``connect_wait`` is over.

        Counted from the first try's start (a try into a path that drops packets lasts
        ``connect_timeout``), or from when the checkout began, for one that refused its pooled
        connection after waiting on it (`count_wait_from`).
        """
        stamp = None if entry is None else entry.__dict__.pop(_BEGAN, None)
        if caller_waits():
            return invoke(entry)
        began = now = time.monotonic()
        if stamp is not None and now - stamp[1] < _STALE_AFTER_S:
            began = stamp[0]
        try:
            return invoke(entry)
        except Exception as exc:
            if not worth_waiting(exc):
                raise
            return self.try_again(lambda: invoke(entry), exc, worth_waiting, since=began)

    def try_again(
        self,
        attempt: Callable[[], T],
        first: Exception,
        worth: Callable[[Exception], bool],
        *,
        since: float | None = None,
    ) -> T:
        """Call ``attempt`` again after it failed with ``first``, until it succeeds or gives up.

        It is called again while its errors are ``worth`` waiting out and ``connect_wait`` is
        not over, counted from ``since`` (``time.monotonic()``; default: now); the last error
        is raised then. ``first`` is raised at once when connects do not wait
        (``connect_wait`` is 0, or a unit of work waits itself).
        """
        if not self.enabled or caller_waits():
            raise first
        now, started_at = time.monotonic(), time.time()
        # The wait, and what its event says was waited, start at ``since``: a wait given up
        # has waited ``connect_wait`` at least.
        started = now if since is None else min(since, now)
        started_at -= now - started
        deadline = started + self._wait
        attempts = 1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._note_gave_up(first, first, attempts, started, started_at)
                raise first
            delay = full_jitter(_INITIAL, _MAXIMUM, _MULTIPLIER, attempts, _JITTER)
            self._sleep(min(delay, remaining))
            attempts += 1
            try:
                result = attempt()
            except Exception as exc:
                if not worth(exc) or time.monotonic() >= deadline:
                    self._note_gave_up(exc, first, attempts, started, started_at)
                    raise
                continue
            self._report("connected", first, attempts, started, started_at)
            return result

    def _sleep(self, delay: float) -> None:
        if self._is_async:
            # An async engine connects in a greenlet inside the event loop: yield to it.
            sleep_in_greenlet(delay)
        else:
            time.sleep(delay)

    def _note_gave_up(
        self,
        error: Exception,
        first: Exception,
        attempts: int,
        started: float,
        started_at: float,
    ) -> None:
        """Report the wait given up, and note it on ``error``, which the caller raises."""
        waited = self._report("gave_up", first, attempts, started, started_at)
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(
                f"dropsafe: no connection after {attempts} attempt(s) in {waited:.2f}s "
                f"(ConnectionPolicy.connect_wait={self._wait:g}s)"
            )

    def _report(
        self,
        outcome: Literal["connected", "gave_up"],
        first: Exception,
        attempts: int,
        started: float,
        started_at: float,
    ) -> float:
        waited = time.monotonic() - started
        event = ConnectWaited(
            self._url, outcome, attempts, waited, started_at, describe_error(first)
        )
        emit(self._hooks, event)
        return waited
