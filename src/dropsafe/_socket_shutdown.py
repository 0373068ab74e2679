"""Shut a socket down at its deadline, which ends any read blocked on it, in any thread or loop.

One thread for each process (made anew in a forked child) keeps the deadlines and, when one
passes, shuts the socket down (``shutdown(SHUT_RDWR)`` on a duplicate of its file descriptor):
the blocked read returns end-of-file. This module knows sockets only by file descriptor; which
socket a DBAPI connection uses is the driver's business (`dropsafe._drivers`), and why dropsafe
bounds a wait this way is told in `dropsafe._drivers.deadline`.
"""

from __future__ import annotations

import _socket
import contextlib
import heapq
import itertools
import os
import time
from typing import TYPE_CHECKING

from dropsafe._process import renew_in_child, unpatched

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = ["Bound", "identity_of", "shut_down_at"]

# Below this many deadlines kept, released ones are left for the watchdog thread to drop.
_COMPACT_ABOVE = 64
# The longest the thread sleeps at once: a lock's timeout is bounded (threading.TIMEOUT_MAX).
_LONGEST_SLEEP = 3600.0


def _identity(fd: int) -> tuple[int, int] | None:
    """Return the socket behind ``fd`` as (device, inode): a reused number differs.

    None when ``fd`` is not open. A socket's pair never changes while it is open, and the
    kernel gives no other open socket the same one.
    """
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
        # The C socket type: gevent's socket class would reach for a hub in this thread.
        sock = _socket.socket(fileno=duplicate)
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        finally:
            sock.close()


class Bound:
    """One guarded block: ``expired`` tells whether the watchdog shut its socket down."""

    expired = False  # set on the instance by the watchdog; no __init__: one call fewer a block


class _Watchdog:
    """The process's one shutdown thread and its deadlines; the thread starts on first use.

    Made of the interpreter's own thread and locks (`dropsafe._process.unpatched`): under
    gevent or eventlet it stays a real thread, which still ends a wait when a driver without a
    green wait callback blocks the whole hub, and a lock made before ``monkey.patch_all()`` is
    never released by a greenlet that did not take it. Its lock is held only for heap
    operations, never while waiting, so a greenlet that takes it does not stall the hub.
    """

    def __init__(self) -> None:
        allocate_lock = unpatched("_thread", "allocate_lock")
        # (deadline, ticket, fd, the socket's identity, the block's Bound)
        self._heap: list[tuple[float, int, int, tuple[int, int], Bound]] = []
        self._live: set[int] = set()
        self._tickets = itertools.count()
        self._lock = allocate_lock()
        # Released to wake the thread early; the thread holds it while it sleeps on it.
        self._wake = allocate_lock()
        self._wake.acquire()
        self._started = False

    def watch(self, fd: int, identity: tuple[int, int], deadline: float, bound: Bound) -> int:
        with self._lock:
            ticket = next(self._tickets)
            heapq.heappush(self._heap, (deadline, ticket, fd, identity, bound))
            self._live.add(ticket)
            if not self._started:
                self._started = True
                unpatched("_thread", "start_new_thread")(self._run, ())
            elif self._heap[0][1] == ticket:
                self._notify()  # an earlier deadline than the thread sleeps for
            return ticket

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # woken already, not asleep yet
            self._wake.release()

    def release(self, ticket: int) -> None:
        with self._lock:
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
            with self._lock:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # released before its time
                wait = -1.0 if not self._heap else self._heap[0][0] - time.monotonic()
                if wait <= 0 and self._heap:
                    _, ticket, fd, identity, bound = heapq.heappop(self._heap)
                    self._live.discard(ticket)
                    # Under the lock: the owner cannot release (and close the fd) meanwhile.
                    bound.expired = True
                    _shut_down(fd, identity)
                    continue
            # Sleep until the first deadline (or for ever with none), or until woken.
            self._wake.acquire(timeout=-1 if wait < 0 else min(wait, _LONGEST_SLEEP))


class _OnePerProcess:
    """The process's one watchdog, made on first use."""

    def __init__(self) -> None:
        self.watchdog: _Watchdog | None = None
        self.making = unpatched("_thread", "allocate_lock")()

    def current(self) -> _Watchdog:
        watchdog = self.watchdog
        if watchdog is None:
            with self.making:
                watchdog = self.watchdog
                if watchdog is None:
                    watchdog = self.watchdog = _Watchdog()
        return watchdog

    def forget_in_child(self) -> None:
        # The parent's thread is gone, its lock may be held for ever, and its deadlines are
        # the parent's: the shared sockets they name must not be shut down from here.
        self.watchdog = None
        self.making = unpatched("_thread", "allocate_lock")()


_PROCESS = _OnePerProcess()
_current_watchdog = _PROCESS.current
renew_in_child(_PROCESS.forget_in_child)


class _Guarded:
    """The block `shut_down_at` guards: a class, not a generator, as it runs on every unit."""

    __slots__ = ("_bound", "_deadline", "_fd", "_identity", "_ticket", "_watchdog")

    def __init__(
        self, fd: int | None, deadline: float, identity: tuple[int, int] | None = None
    ) -> None:
        self._fd = fd
        self._deadline = deadline
        self._identity = identity
        self._bound = Bound()
        self._ticket: int | None = None
        self._watchdog: _Watchdog | None = None

    def __enter__(self) -> Bound:
        identity = self._identity
        if identity is None and self._fd is not None:
            identity = _identity(self._fd)
        if self._fd is not None and identity is not None:
            self._watchdog = _current_watchdog()
            self._ticket = self._watchdog.watch(self._fd, identity, self._deadline, self._bound)
        return self._bound

    def __exit__(self, *exc_info: object) -> None:
        # The watchdog it was given: after a fork in the block, the parent's (gone) one.
        if self._ticket is not None and self._watchdog is not None:
            self._watchdog.release(self._ticket)


def shut_down_at(
    fd: int | None, deadline: float, identity: tuple[int, int] | None = None
) -> AbstractContextManager[Bound]:
    """Shut the socket with file descriptor ``fd`` down if the block still runs at ``deadline``.

    ``deadline`` is a `time.monotonic` value. With no ``fd`` (or one that is not open) the
    block runs unbounded. The `Bound` given says afterwards whether the deadline struck.
    ``identity``: the socket's (`identity_of`), read earlier by a caller that keeps it for the
    socket's life; it spares an ``fstat`` at each block, and is checked again before the
    shutdown, as a read one is: a socket closed meanwhile (its number perhaps reused) is left
    alone.
    """
    return _Guarded(fd, deadline, identity)


#: The identity of the socket behind an fd, as `shut_down_at` takes it; None if not open.
identity_of = _identity
