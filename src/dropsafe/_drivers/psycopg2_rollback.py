"""psycopg2: the ROLLBACK that ends a request runs in a background thread, settled before reuse.

`dropsafe._engine.quiet_rollback` decides when a ROLLBACK may go unawaited (the connection is
checked in right after it: PoolPolicy.defer_checkin_rollback); this module does it on a psycopg2
connection. psycopg2 keeps its transaction state in C and offers no way to send a query and
read its reply later on a sync connection (a query sent beneath it through libpq would leave
its state wrong), so psycopg2's own ``rollback()`` runs, whole, in a worker thread: psycopg2
releases the GIL while it waits for the server, and serialises every use of a connection on a
lock of its own, so anything that reaches the connection meanwhile waits for the ROLLBACK to
end rather than interleaving with it. The request returns at once.

Its outcome is read (`settle`) before anyone else uses the connection: at the next checkout
(the checkout check), before SQLAlchemy's pre-ping, before the pool closes or terminates it
(`close_settled`; `dropsafe._engine.quiet_rollback` wraps the dialect's ``do_ping``, ``do_close``
and ``do_terminate``). A ROLLBACK that failed, that has not ended within ``ping_timeout`` (its
socket is then shut down, which ends it at once), or that a forked child finds in its copy of
the pool closes the connection: at checkout it is replaced like any dead one, never shown to
the request.

Threads, and where it stays awaited:
- The workers are daemon threads, one per ROLLBACK under way, kept idle for reuse: a ROLLBACK
  is never queued behind another connection's.
- Before ``os.fork`` (a pre-fork server, multiprocessing), every ROLLBACK under way is waited
  for (bounded by its ``ping_timeout``, then its socket shut down): psycopg2's lock on a
  connection held by a worker thread, copied into a child that has no such thread, would never
  be released there, and the child's first touch of that connection (even its close, or its
  collection) would hang for ever.
- At interpreter exit, a ROLLBACK under way is waited for at most a second, then its socket is
  shut down: the exit never hangs on an unanswered server.
- Where psycopg2 has a wait callback (gevent's or eventlet's psycogreen), the ROLLBACK stays
  awaited: a real thread and a green wait callback do not mix.
Why and what it costs: docs/guarantees.md, "The ROLLBACK that ends a request is not awaited".
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import os
import queue
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, cast

from dropsafe._drivers import psycopg2_first_flight
from dropsafe._drivers.deferred_rollback import DeferredRollback, During
from dropsafe._process import renew_in_child, unpatched

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._dbapi import DBAPIConnection, NativeConnection
    from dropsafe._drivers.deferred_rollback import Reporter

__all__ = ["PendingRollback", "close_settled", "send_rollback", "settle"]

#: A ROLLBACK under way (or one that failed, not yet settled), by psycopg2 connection. A
#: connection is keyed by identity (psycopg2's has no ``__dict__`` to keep it in).
_PENDING: dict[Any, PendingRollback] = {}
#: How long an exit waits for a ROLLBACK under way before it shuts its socket down.
_EXIT_WAIT_S = 1.0
#: How long a ROLLBACK whose socket was shut down may take to end (it fails at once).
_ABORT_WAIT_S = 2.0
#: A ROLLBACK quicker than this (psycopg2's whole call, timed in the request's thread) is
#: awaited: it is mostly CPU, the client's and the server's (a database next to the app), which
#: a hand-off to a thread does not save and adds to (about 100 us a request, measured). Slower,
#: it is mostly the network's round trip: deferred.
SLOW_ROLLBACK_S = 0.0005
#: Deferred, a connection's ROLLBACK is still awaited once in this many, to time it again.
REMEASURE_EVERY = 32
#: A new connection's first ROLLBACKs deferred before one is timed.
DEFERRED_BEFORE_TIMING = 4
#: What a connection's last awaited ROLLBACK took: [seconds, deferred ones left before the next],
#: by ``id()`` of the connection (a hint: an id reused by a new connection only costs one
#: wrong guess). Forgotten at close; emptied if it grows past `_TIMES_AT_MOST`.
_TIMES: dict[int, list[float]] = {}
_TIMES_AT_MOST = 10_000
_NOT_TIMED = float("inf")
# libpq's PGTransactionStatusType (psycopg2.extensions.TRANSACTION_STATUS_*).
_PQTRANS_INTRANS = 2
_PQTRANS_INERROR = 3


@functools.cache
def _psycopg2() -> tuple[tuple[type[Any], ...], Callable[[], object]]:
    """Return psycopg2's connection classes (its own, dropsafe's) and its wait callback getter.

    Looked up once: dropsafe's class is `psycopg2_first_flight`'s.
    """
    import psycopg2.extensions

    classes = (psycopg2.extensions.connection, psycopg2_first_flight.connection_class())
    return tuple(cls for cls in classes if cls is not None), psycopg2.extensions.get_wait_callback


def settle(native: NativeConnection) -> None:
    """Wait for the ROLLBACK run at checkin, if one is under way; raise if it failed.

    Called at every checkout of a psycopg2 engine: one dictionary read when none is due.
    """
    pending = _PENDING.get(native)
    if pending is not None:
        pending.settle()


def close_settled(dbapi_connection: DBAPIConnection) -> None:
    """Before the pool pings, closes or terminates a connection: settle a ROLLBACK. Never raises."""
    native = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
    _TIMES.pop(id(native), None)
    pending = _PENDING.get(native)
    if pending is not None:
        with contextlib.suppress(Exception):  # closed already; the close goes on
            pending.settle(quiet=True)


def send_rollback(
    proxied: DBAPIConnection,
    during: During,
    timeout: float,
    report: Reporter,
) -> bool:
    """Start psycopg2's ``rollback()`` in a worker thread; True also when run here, timed.

    Run here, awaited, and timed (in the request's thread: a worker's timing would count its
    wait for the GIL): one in `REMEASURE_EVERY` of a connection's ROLLBACKs, and all of them
    while its last timed one took less than `SLOW_ROLLBACK_S` (a database next to the app: the
    hand-off would cost more than it saves). False, left to the dialect's own: a connection
    closed or in no transaction as libpq knows it (psycopg2's own rollback then sends nothing,
    or fixes its own state: it must run), a psycopg2 with a wait callback (green), a connection
    of another class (a ``connection_factory`` of the app's; dropsafe's own is deferred: its
    ``rollback()`` sends ROLLBACK where libpq says a transaction is open). Awaited here on a
    pool whose listeners of the app's may touch the connection before the ROLLBACK is read
    (`Reporter.app_listens_before_settle`).
    """
    native: Any = getattr(proxied, "dbapi_connection", proxied)
    connection_classes, wait_callback = _psycopg2()
    if native in _PENDING:
        # A ROLLBACK is under way, or failed and unread, and nothing was sent since (anything
        # would have waited for it): the transaction is ending already, as the pool's reset
        # after a close finds it. Asked before ``closed``: a ROLLBACK that failed has closed
        # the connection, and its error is the one to say, once, where it is read.
        return True
    if type(native) not in connection_classes or native.closed:
        return False
    status = native.get_transaction_status()
    if status != _PQTRANS_INTRANS and status != _PQTRANS_INERROR:  # noqa: PLR1714 - ints
        return False
    times = _TIMES.get(id(native))
    if times is None:
        # Not timed yet: its first few deferred (a request's first ROLLBACKs wait for nothing).
        if len(_TIMES) >= _TIMES_AT_MOST:
            _TIMES.clear()
        times = _TIMES[id(native)] = [_NOT_TIMED, DEFERRED_BEFORE_TIMING]
    if times[0] < SLOW_ROLLBACK_S or times[1] <= 0:
        # Awaited here and timed in the request's own thread (a worker's timing would count
        # its wait for the GIL): psycopg2's own rollback, as the dialect's; its error is
        # the caller's to absorb, as ever.
        started = time.monotonic()
        native.rollback()
        times[0] = time.monotonic() - started
        times[1] = REMEASURE_EVERY
        return True
    if wait_callback() is not None or report.app_listens_before_settle(proxied):
        # Awaited by the dialect's own: green (in this greenlet), or the app's checkin
        # listeners (right after the reset) or checkout listeners (before dropsafe's check
        # reads the ROLLBACK) would meet it under way: psycopg2 refuses a setter
        # (``readonly``...) then ("set_session cannot be used inside a transaction"), and one
        # that failed has closed the connection.
        return False
    times[1] -= 1
    pending = PendingRollback(native, timeout, during, report)
    # Its own state, set here (an __init__ of its own would be a call more a request).
    pending.deadline = time.monotonic() + timeout
    pending._done = done = _allocate_lock()  # noqa: SLF001 - this module's class
    done.acquire()
    _PENDING[native] = pending
    _WORKERS[0].run(pending)
    return True


class PendingRollback(DeferredRollback):
    """psycopg2's ``rollback()`` of one connection, run by a worker thread.

    Besides the core's: ``deadline``, when the settle stops waiting (``ping_timeout`` after
    the checkin), and ``_done``, held until the rollback has returned or raised (a lock:
    cheaper than an Event); both set by `send_rollback`.
    """

    __slots__ = ("_done", "deadline")

    deadline: float
    _done: Any

    def run(self) -> None:
        """In the worker: psycopg2's rollback; the error, if any, kept for the settle."""
        connection = self._connection
        try:
            connection.rollback()
        except BaseException as exc:  # noqa: BLE001 - kept, raised by the settle
            self.error = exc
        else:
            if _PENDING.get(connection) is self:
                _PENDING.pop(connection, None)  # never raises: settle may take it meanwhile
        finally:
            self._done.release()

    def wait(self, seconds: float) -> bool:
        """Whether the rollback has ended, waiting at most ``seconds`` for it."""
        if self._done.acquire(timeout=max(seconds, 0.0)):
            self._done.release()
            return True
        return False

    def abort(self) -> bool:
        """Shut the socket down under a rollback still waiting for the server; whether it ended.

        Only in the process that started it: a forked child's shutdown would cut its parent's.
        """
        if os.getpid() != self._pid:
            return False
        with contextlib.suppress(Exception):  # closed meanwhile: nothing to shut down
            fd = self._connection.fileno()  # libpq's PQsocket: psycopg2 takes no lock for it
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        return self.wait(_ABORT_WAIT_S)

    def settle(self, *, quiet: bool = False) -> None:
        """Wait for the rollback (up to the deadline); a failure closes the connection, raised.

        ``quiet``: before a close; the failure is not reported.
        """
        connection = self._connection
        if _PENDING.get(connection) is self:
            _PENDING.pop(connection, None)  # never raises: settle may take it meanwhile
        try:
            if os.getpid() != self._pid:
                msg = "a ROLLBACK run by another process is under way or unread here"
                raise _operational_error(msg)  # noqa: TRY301 - closed below, as any failure
            if not self.wait(self.deadline - time.monotonic()):
                ended = self.abort()
                msg = "the ROLLBACK at checkin did not end within ping_timeout"
                if not ended:
                    # Still inside psycopg2 (its lock held): closing would wait with it.
                    raise _StillRunning(msg)  # noqa: TRY301
                raise _operational_error(msg)  # noqa: TRY301
            if self.error is not None:
                raise self.error  # noqa: TRY301 - closed below, as any failure
        except _StillRunning as exc:
            if not quiet:
                self._report(self.during, exc)
            raise
        except BaseException as exc:
            self._failed(exc, quiet=quiet)
            raise

    def _close(self) -> None:
        # In a forked child the rollback ended before the fork (`_before_fork`): its lock is
        # free.
        with contextlib.suppress(Exception):
            self._connection.close()


class _StillRunning(Exception):
    """A rollback still inside psycopg2 after its socket was shut down under it."""


def _operational_error(message: str) -> Exception:
    error: type[Exception] = sys.modules["psycopg2"].OperationalError
    return error(message)


# -- the workers ----------------------------------------------------------------------------


class _Workers:
    """Daemon threads that run rollbacks, one each at a time; idle ones are reused.

    Each worker has its own queue; an idle one waits on it and is found in ``_idle``. Handing a
    rollback over pops an idle worker (deque operations are atomic) or starts a new one: no
    rollback waits behind another. A worker idle for a minute ends.
    """

    IDLE_S = 60.0

    def __init__(self) -> None:
        self._idle: collections.deque[queue.SimpleQueue[PendingRollback]] = collections.deque()

    def run(self, pending: PendingRollback) -> None:
        try:
            inbox = self._idle.pop()
        except IndexError:
            inbox = _simple_queue()
            inbox.put(pending)
            _start_thread(self._work, (inbox,))
        else:
            inbox.put(pending)

    def _work(self, inbox: queue.SimpleQueue[PendingRollback]) -> None:
        idle = self._idle
        while True:
            try:
                job = inbox.get(timeout=self.IDLE_S)
            except queue.Empty:
                try:
                    idle.remove(inbox)
                except ValueError:  # handed a rollback just now: it is on its way
                    continue
                return
            job.run()
            del job  # its connection is not kept alive by an idle worker
            idle.append(inbox)


def _start_thread(target: Callable[..., None], args: tuple[object, ...]) -> None:
    # A real thread even under gevent's or eventlet's monkey patching (no wait callback there:
    # psycopg2 blocks the thread it runs in, which must not be the hub's).
    unpatched("_thread", "start_new_thread")(target, args)


@functools.cache
def _queue_class() -> type[queue.SimpleQueue[Any]]:
    try:
        # CPython's, in C, on real locks: neither gevent nor eventlet replaces it.
        from _queue import SimpleQueue
    except ImportError:  # an interpreter without it
        return cast("type[queue.SimpleQueue[Any]]", unpatched("queue", "SimpleQueue"))
    return SimpleQueue


def _simple_queue() -> queue.SimpleQueue[PendingRollback]:
    # The interpreter's, even under gevent's or eventlet's monkey patching: a green queue parks
    # a getter on the hub of the thread that waits, here a real worker thread's, which a put
    # from the app's hub never wakes (gevent: six greenlets hung after a dozen requests;
    # eventlet, whose ``queue.SimpleQueue`` is then the pure-Python one on its green
    # semaphore, and which `unpatched` does not see as patched: every request hung, session 18).
    return _queue_class()()


@functools.cache
def _lock_factory() -> Callable[[], Any]:
    return unpatched("_thread", "allocate_lock")


def _allocate_lock() -> Any:  # noqa: ANN401 - _thread's lock
    return _lock_factory()()


#: In a list so that a forked child gets its own (the parent's threads are not there).
_WORKERS = [_Workers()]


def _renew_workers() -> None:
    _WORKERS[0] = _Workers()


def _end_all(seconds: float) -> None:
    """Wait for every rollback under way in this process (at most ``seconds`` each), else abort."""
    pid = os.getpid()
    for pending in list(_PENDING.values()):
        if pending._pid != pid:  # noqa: SLF001 - this module's class
            continue
        if not pending.wait(min(seconds, pending.deadline - time.monotonic())):
            pending.abort()


def _before_fork() -> None:
    _end_all(float("inf"))


def _at_exit() -> None:
    _end_all(_EXIT_WAIT_S)


renew_in_child(_renew_workers)
os.register_at_fork(before=_before_fork)
atexit.register(_at_exit)
