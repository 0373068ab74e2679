"""The client's last word on a wait: shut a connection's socket down when its deadline passes.

A server that hangs mid-statement while its kernel still acknowledges (a SIGSTOPped backend, a
frozen VM, a stuck leader) never trips a TCP timeout, and libpq has no per-call timeout: only
the client can end the wait. One daemon thread keeps the deadlines of the connections in use
and, when one passes, shuts the socket down (``shutdown(SHUT_RDWR)`` on a duplicate of its file
descriptor). The driver's blocked read then returns end-of-file and raises its ordinary
"connection closed" error, which the usual machinery handles: the connection is invalidated and
the unit of work's deadline decides what follows. Works the same for every driver, sync or
async, whatever thread or event loop is waiting.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Bound", "bounded", "socket_fd"]


def socket_fd(dbapi_connection: Any) -> int | None:  # noqa: ANN401 - DBAPI connections are untyped
    """Return the file descriptor of a DBAPI connection's socket, if it can be found."""
    driver_connection = getattr(dbapi_connection, "_connection", None)  # SQLAlchemy's adapters
    transport = getattr(driver_connection, "_transport", None)  # asyncpg
    if transport is not None:
        sock = transport.get_extra_info("socket")
        return None if sock is None else int(sock.fileno())
    usock = getattr(dbapi_connection, "_usock", None)  # pg8000
    if usock is not None:
        return int(usock.fileno())
    for candidate in (dbapi_connection, driver_connection):  # psycopg2, psycopg 3
        fileno = getattr(candidate, "fileno", None)
        if callable(fileno):
            with contextlib.suppress(Exception):
                return int(fileno())
    return None


def _identity(fd: int) -> tuple[int, int] | None:
    """Return the socket behind ``fd`` as (device, inode): a reused number differs."""
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def _shut_down(fd: int, identity: tuple[int, int]) -> None:
    # The connection may have been closed meanwhile and its number given to another socket.
    if _identity(fd) != identity:
        return
    with contextlib.suppress(OSError):
        duplicate = os.dup(fd)
        with socket.socket(fileno=duplicate) as sock:
            sock.shutdown(socket.SHUT_RDWR)


class Bound:
    """One guarded block: ``expired`` tells whether the watchdog shut its socket down."""

    def __init__(self) -> None:
        self.expired = False


class _Watchdog:
    """One thread for the whole process; started on first use."""

    def __init__(self) -> None:
        # (deadline, ticket, fd, the socket's identity, the block's Bound)
        self._heap: list[tuple[float, int, int, tuple[int, int], Bound]] = []
        self._live: set[int] = set()
        self._tickets = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, fd: int, identity: tuple[int, int], deadline: float, bound: Bound) -> int:
        with self._wake:
            ticket = next(self._tickets)
            heapq.heappush(self._heap, (deadline, ticket, fd, identity, bound))
            self._live.add(ticket)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dropsafe-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][1] == ticket:
                self._wake.notify()  # an earlier deadline than the thread sleeps for
            return ticket

    def release(self, ticket: int) -> None:
        with self._wake:
            self._live.discard(ticket)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # released before its time
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, ticket, fd, identity, bound = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(ticket)
                # Under the lock: the owner cannot release (and close the fd) meanwhile.
                bound.expired = True
                _shut_down(fd, identity)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def bounded(dbapi_connection: Any, deadline: float) -> Iterator[Bound]:  # noqa: ANN401
    """Shut ``dbapi_connection``'s socket down if the block still runs at ``deadline``.

    ``deadline`` is a `time.monotonic` value. A connection whose socket cannot be found is
    left to its TCP timeouts. The `Bound` given says afterwards whether the deadline struck.
    """
    bound = Bound()
    fd = socket_fd(dbapi_connection)
    identity = None if fd is None else _identity(fd)
    if fd is None or identity is None:
        yield bound
        return
    ticket = _WATCHDOG.watch(fd, identity, deadline, bound)
    try:
        yield bound
    finally:
        _WATCHDOG.release(ticket)
