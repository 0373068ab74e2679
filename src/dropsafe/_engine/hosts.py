"""Where a multi-host connect starts: at the host that last answered, past one that failed.

libpq and asyncpg try a multi-host target's hosts in the order given. After a failover the
first host may be gone, and asyncpg gives all hosts one connect timeout, which a vanished first
host eats whole. So a connect starts at the host that last answered, and after a connect that
failed, at the host after the one it started from. A connect that is merely in flight says
nothing about any host: it never moves the start (twenty concurrent connects to a healthy first
host all go to it, as with plain SQLAlchemy).

A connect runs in one thread (or asyncio task) from SQLAlchemy's ``do_connect`` event to its
``connect`` event; a thread that starts another connect before its previous one reported success
has seen that one fail. An open connection that TCP gave up on (its host stopped answering)
moves the start past its host too: a vanished primary is skipped before any connect waits on it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import TYPE_CHECKING, Any

from dropsafe._log import SafeLogger
from dropsafe._process import renew_lock_in_child

if TYPE_CHECKING:
    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._drivers import Driver

__all__ = ["HostOrder", "rotate"]

logger = SafeLogger()


class HostOrder:
    """The start of one engine's multi-host target; safe to use from any thread or task."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork
        self._hosts: list[tuple[str, str]] = []  # as configured; empty for a single host
        self._start = 0  # index in _hosts where connects start
        # Thread or task -> the start its running connect used; dropped on success.
        self._in_flight: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()

    def before_connect(self, cparams: dict[str, Any]) -> None:
        """Reorder a new connect's hosts (``cparams`` is this connect's own copy)."""
        worker = _current_worker()
        hosts = self._driver.hosts(cparams)
        with self._lock:
            self._hosts = hosts
            failed_from = self._in_flight.pop(worker, None)
            if failed_from is not None:  # this worker's previous connect never succeeded
                self._move_past(failed_from)
            start = self._start if self._start < len(hosts) else 0
            self._in_flight[worker] = start
        if start:
            rotate(self._driver, cparams, start)

    def connected(self, dbapi_connection: DBAPIConnection) -> None:
        """Record that this worker's connect succeeded, and the host it reached."""
        with self._lock:
            self._in_flight.pop(_current_worker(), None)
        try:
            server = self._driver.server_of(dbapi_connection)
        except Exception:
            logger.debug("dropsafe could not tell which host a connection reached", exc_info=True)
            return
        if server is None:
            return
        with self._lock:
            reached = (server.host, str(server.port))
            if reached in self._hosts:
                self._start = self._hosts.index(reached)

    def connect_failed(self) -> None:
        """Record that this worker's running connect raised (known before its next one)."""
        with self._lock:
            failed_from = self._in_flight.pop(_current_worker(), None)
            if failed_from is not None:
                self._move_past(failed_from)

    def timed_out(self, dbapi_connection: DBAPIConnection) -> None:
        """Record that an open connection's host stopped answering (TCP gave up on it).

        Its host is likely gone (a vanished primary): connects that start there would spend
        their whole connect timeout on it, so the start moves past it at once.
        """
        try:
            server = self._driver.server_of(dbapi_connection)
        except Exception:
            logger.debug("dropsafe could not tell which host timed out", exc_info=True)
            return
        if server is None:
            return
        with self._lock:
            reached = (server.host, str(server.port))
            if reached in self._hosts:
                self._move_past(self._hosts.index(reached))

    def _move_past(self, failed_from: int) -> None:
        # Only the first of several connects that failed from the same start moves it: the
        # others are not news, and must not skip the next host too.
        if len(self._hosts) > 1 and failed_from == self._start:
            self._start = (failed_from + 1) % len(self._hosts)


def rotate(driver: Driver, cparams: dict[str, Any], steps: int) -> None:
    """Start a multi-host target ``steps`` hosts further down its list (in ``driver``'s form)."""
    pairs = driver.hosts(cparams)
    if len(pairs) > 1:
        steps %= len(pairs)
        driver.set_hosts(cparams, pairs[steps:] + pairs[:steps])


def _current_worker() -> object:
    """Return the asyncio task running this code, else its thread (each runs one connect)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.current_thread()
    return asyncio.current_task() or threading.current_thread()
