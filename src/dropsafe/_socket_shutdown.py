"""Shut a socket down at its deadline, which ends any read blocked on it, in any thread or loop.

One daemon thread for the whole process keeps the deadlines and, when one passes, shuts the
socket down (``shutdown(SHUT_RDWR)`` on a duplicate of its file descriptor): the blocked read
returns end-of-file. This module knows sockets only by file descriptor; which socket a DBAPI
connection uses is the driver's business (`dropsafe._drivers`), and why dropsafe bounds a wait
this way is told in `dropsafe._watchdog`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = ["Bound", "shut_down_at"]

# Below this many deadlines kept, released ones are left for the watchdog thread to drop.
_COMPACT_ABOVE = 64


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
            # A released deadline stays in the heap until it reaches the top, i.e. until it
            # passes: a busy process would keep rate x deadline of them (60,000 at 1,000 blocks
            # a second under a 60 s deadline). Once the released outnumber the live, rebuild:
            # linear in the heap, after as many releases, so constant per release.
            if len(self._heap) > _COMPACT_ABOVE and len(self._heap) > 2 * len(self._live):
                self._heap = [item for item in self._heap if item[1] in self._live]
                heapq.heapify(self._heap)

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


class _Guarded:
    """The block `shut_down_at` guards: a class, not a generator, as it runs on every unit."""

    __slots__ = ("_bound", "_deadline", "_fd", "_ticket")

    def __init__(self, fd: int | None, deadline: float) -> None:
        self._fd = fd
        self._deadline = deadline
        self._bound = Bound()
        self._ticket: int | None = None

    def __enter__(self) -> Bound:
        identity = None if self._fd is None else _identity(self._fd)
        if self._fd is not None and identity is not None:
            self._ticket = _WATCHDOG.watch(self._fd, identity, self._deadline, self._bound)
        return self._bound

    def __exit__(self, *exc_info: object) -> None:
        if self._ticket is not None:
            _WATCHDOG.release(self._ticket)


def shut_down_at(fd: int | None, deadline: float) -> AbstractContextManager[Bound]:
    """Shut the socket with file descriptor ``fd`` down if the block still runs at ``deadline``.

    ``deadline`` is a `time.monotonic` value. With no ``fd`` (or one that is not open) the
    block runs unbounded. The `Bound` given says afterwards whether the deadline struck.
    """
    return _Guarded(fd, deadline)
