"""Where a multi-host connect starts, and which hosts it leaves out for a while.

libpq and asyncpg try a multi-host target's hosts in the order given. After a failover the
first host may be gone, and asyncpg gives all hosts one connect timeout, which a vanished first
host eats whole. So a connect starts at the host that last answered, and after a connect that
failed, at the host after the one it started from. A connect that is merely in flight says
nothing about any host: it never moves the start (twenty concurrent connects to a healthy first
host all go to it, as with plain SQLAlchemy).

A host that stopped answering (a connect timed out there, or TCP gave up on an open connection
to it) is left out of connects for `SKIP_FOR` seconds: a vanished primary then costs no connect
its ``connect_timeout`` while its standby is promoted. It is tried again when that time is over,
so a host back from a blip is used again. Every host is never left out at once: when all of
them timed out the network or the servers are slow, not gone, and connects try them in order.

A connect runs in one thread (or asyncio task) from SQLAlchemy's ``do_connect`` event to its
``connect`` event; a thread that starts another connect before its previous one reported success
has seen that one fail.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._process import renew_lock_in_child
from dropsafe.events import HostRetried, HostSkipped

if TYPE_CHECKING:
    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._drivers import Driver
    from dropsafe.events import Event, Hook

__all__ = ["SKIP_FOR", "HostOrder", "rotate"]

logger = SafeLogger()

#: Seconds a host that stopped answering is left out of connects. Long enough to cover a
#: promotion (Patroni's ttl is 10-30 s: each skip saves one connect_timeout per connect);
#: short enough that a host back from a network blip serves again soon.
SKIP_FOR = 10.0
# libpq names each host a connect tried, and why it failed (PostgreSQL 14+ clients; psycopg 3
# connects to each host itself and names them in its own words).
_LIBPQ_TIMED_OUT = re.compile(
    r'server at "(?P<host>[^"]*)"(?: \([^)]*\))?, port (?P<port>\d+) failed: timeout expired'
)
_PSYCOPG_TIMED_OUT = re.compile(
    r"host: '(?P<host>[^']*)', port: '(?P<port>\d+)'[^\n]*?: (?:connection )?timeout expired"
)
_now = time.monotonic  # the clock of the time outs (a test's fake clock replaces it)
Cause = Literal["connect_timed_out", "connection_timed_out"]


@dataclass(frozen=True)
class _Attempt:
    start: int  # index in _hosts where this connect started
    first: tuple[str, str] | None  # the host it tried first (None: a single host)


class HostOrder:
    """The start of one engine's multi-host target; safe to use from any thread or task."""

    def __init__(self, driver: Driver, hooks: tuple[Hook, ...] = (), url: str = "") -> None:
        self._driver = driver
        self._hooks = hooks
        self._url = url  # the engine's URL, password masked (for events)
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork
        self._hosts: list[tuple[str, str]] = []  # as configured; empty for a single host
        self._start = 0  # index in _hosts where connects start
        # Host -> (skipped since, skipped until), both time.monotonic().
        self._skipped: dict[tuple[str, str], tuple[float, float]] = {}
        # Thread or task -> the connect it is running; dropped on success.
        self._in_flight: weakref.WeakKeyDictionary[object, _Attempt] = weakref.WeakKeyDictionary()

    def before_connect(self, cparams: dict[str, Any]) -> None:
        """Reorder a new connect's hosts (``cparams`` is this connect's own copy)."""
        worker = _current_worker()
        hosts = self._driver.hosts(cparams)
        events: list[Event] = []
        with self._lock:
            self._hosts = hosts
            failed = self._in_flight.pop(worker, None)
            if failed is not None:  # this worker's previous connect never succeeded
                self._move_past(failed.start)
            start = self._start if self._start < len(hosts) else 0
            events += self._retry_due(_now())
            order = hosts[start:] + hosts[:start]
            usable = [host for host in order if host not in self._skipped] or order
            if "hostaddr" in cparams:  # libpq pairs it by position: a shorter list would not match
                usable = order
            self._in_flight[worker] = _Attempt(start, usable[0] if usable else None)
        self._emit(events)
        if usable != hosts:
            self._driver.set_hosts(cparams, usable)

    def connected(self, dbapi_connection: DBAPIConnection) -> None:
        """Record that this worker's connect succeeded, and the host it reached."""
        with self._lock:
            self._in_flight.pop(_current_worker(), None)
        server = self._server(dbapi_connection)
        if server is None:
            return
        with self._lock:
            if server in self._hosts:
                self._start = self._hosts.index(server)

    def connect_failed(self, error: BaseException | None = None) -> None:
        """Record that this worker's running connect raised (known before its next one).

        The hosts it timed out at are left out of connects for a while: libpq names them; a
        driver that does not (asyncpg spends its one timeout on the first host) had a
        timeout at the host it tried first.
        """
        with self._lock:
            failed = self._in_flight.pop(_current_worker(), None)
            if failed is None:
                return
            self._move_past(failed.start)
            timed_out = _hosts_timed_out(error) if error is not None else set()
            if not timed_out and error is not None and failed.first and _is_timeout(error):
                timed_out = {failed.first}
            events = self._skip(timed_out & set(self._hosts), "connect_timed_out")
        self._emit(events)

    def timed_out(self, dbapi_connection: DBAPIConnection) -> None:
        """Record that an open connection's host stopped answering (TCP gave up on it).

        Its host is likely gone (a vanished primary): connects that start there would spend
        their whole connect timeout on it, so it is left out of connects for a while.
        """
        server = self._server(dbapi_connection)
        if server is None:
            return
        with self._lock:
            if server not in self._hosts:
                return
            self._move_past(self._hosts.index(server))
            events = self._skip({server}, "connection_timed_out")
        self._emit(events)

    def skipped(self) -> set[tuple[str, str]]:
        """Return the hosts connects leave out now (host, port)."""
        with self._lock:
            return {host for host, (_, until) in self._skipped.items() if until > _now()}

    def _emit(self, events: list[Event]) -> None:
        for event in events:  # outside the lock: a hook may take its time
            emit(self._hooks, event)

    def _server(self, dbapi_connection: DBAPIConnection) -> tuple[str, str] | None:
        try:
            server = self._driver.server_of(dbapi_connection)
        except Exception:
            logger.debug("dropsafe could not tell which host a connection reached", exc_info=True)
            return None
        return None if server is None else (server.host, str(server.port))

    def _skip(self, hosts: set[tuple[str, str]], cause: Cause) -> list[Event]:
        """Leave ``hosts`` out of connects for `SKIP_FOR` seconds; return the events to emit."""
        now = _now()
        new = {host for host in hosts if host not in self._skipped}
        if not new:
            return []
        if len(set(self._skipped) | new) >= len(self._hosts):
            # Every host timed out: slow, not gone. Connects try them all again, in order.
            self._skipped.clear()
            return []
        for host in new:
            self._skipped[host] = (now, now + SKIP_FOR)
        return [
            HostSkipped(self._url, host, int(port), cause, SKIP_FOR) for host, port in sorted(new)
        ]

    def _retry_due(self, now: float) -> list[Event]:
        """Put back the hosts whose time out is over; return the events to emit."""
        due = [host for host, (_, until) in self._skipped.items() if until <= now]
        events: list[Event] = []
        for host in due:
            since, _ = self._skipped.pop(host)
            events.append(HostRetried(self._url, host[0], int(host[1]), now - since))
        return events

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


def _hosts_timed_out(error: BaseException) -> set[tuple[str, str]]:
    """Return the hosts a failed connect's error says timed out (libpq's and psycopg's texts)."""
    text = str(error)
    found = set()
    for pattern in (_LIBPQ_TIMED_OUT, _PSYCOPG_TIMED_OUT):
        found |= {(m.group("host"), m.group("port")) for m in pattern.finditer(text)}
    return found


def _is_timeout(error: BaseException) -> bool:
    """Whether a failed connect ran out of time (rather than being refused or rejected)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError) or "timeout expired" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def _current_worker() -> object:
    """Return the asyncio task running this code, else its thread (each runs one connect)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.current_thread()
    return asyncio.current_task() or threading.current_thread()
