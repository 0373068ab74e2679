"""asyncpg: a ROLLBACK started at checkin, its reply read before the connection's next use.

`dropsafe._engine.quiet_rollback` decides when a ROLLBACK may go unawaited (the connection is
checked in right after it: PoolPolicy.defer_checkin_rollback); this module does it on
SQLAlchemy's asyncpg adapter. The adapter's own rollback awaits asyncpg's
``Transaction.rollback()`` and then forgets the transaction (``_transaction = None``, whatever
the outcome). Here the transaction is forgotten the same way, and asyncpg's own coroutine is
started at once: its first step writes ``ROLLBACK;`` (asyncpg's protocol is then busy with that
operation, as it knows), and each later step runs when the future it awaits is done, until
asyncpg has read the reply and its protocol is idle again, its transaction status updated from
the server's ReadyForQuery. Nobody awaits it meanwhile: the request returns.

Why the coroutine is stepped by its futures' callbacks rather than wrapped in an asyncio Task:
a Task is cancelled by ``asyncio.run``'s shutdown (an app that never disposes its engine), and
cancelling asyncpg in the middle of an operation makes it open a second connection to send a
CancelRequest, itself a task still pending when the loop closes ("Task was destroyed but it is
pending"); a Task pending on a loop that closed warns the same way when it is collected. A
coroutine that was started and is collected unfinished is closed silently. asyncpg's
``Transaction.rollback()`` awaits only asyncio futures (no timeout, no task of its own).

Its reply is read (`settle`) before anyone else uses the connection: at the next checkout (the
checkout check), before SQLAlchemy's pre-ping, before the pool closes or terminates it
(`dropsafe._engine.quiet_rollback` wraps the dialect's ``do_ping``, ``do_close`` and
``do_terminate``). A reply that is an error, that is not there within ``ping_timeout``, that
was due on another event loop (one that closed, or a forked child's copy) or in another process
closes the connection (aborted: nothing more is sent): at checkout it is replaced like any dead
one, never shown to the request. Why and what it costs: docs/guarantees.md, "The ROLLBACK that
ends a request is not awaited".
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from typing import TYPE_CHECKING, Any

from dropsafe._drivers.base import await_
from dropsafe._drivers.deferred_rollback import FORKED, DeferredRollback, During

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from dropsafe._dbapi import DBAPIConnection, NativeConnection


__all__ = ["PendingRollback", "close_settled", "send_rollback", "settle"]


def in_greenlet() -> bool:
    """Whether this runs in SQLAlchemy's asyncio greenlet (its ``await_only`` may be used).

    SQLAlchemy's own ``in_greenlet`` arrived after 2.0.0 (the oldest version supported): its
    greenlet says so by an attribute, or, before that, by its class.
    """
    # SQLAlchemy's asyncio extra (only async engines get here), untyped.
    current = importlib.import_module("greenlet").getcurrent()
    return bool(
        getattr(current, "__sqlalchemy_greenlet_provider__", False)
        or type(current).__name__ == "_AsyncIoGreenlet"
    )


class RollbackLost(Exception):
    """The ROLLBACK's outcome cannot be trusted here.

    It was sent by another process, or on another event loop, or the connection was lost
    right behind its reply.
    """


#: Where a pending ROLLBACK is kept: in the ``__dict__`` of the asyncpg connection's transport
#: (asyncio's own transports have one; asyncpg's connection and SQLAlchemy's adapter have
#: ``__slots__``, and the protocol under a TLS transport is forgotten once the link is lost).
_KEY = "_dropsafe_rollback"


def _transport_vars(adapter: Any) -> dict[str, Any] | None:  # noqa: ANN401 - the adapter
    """Return the ``__dict__`` of the adapter's asyncpg transport (None: it has none)."""
    try:
        found: dict[str, Any] = adapter._connection._transport.__dict__  # noqa: SLF001
    except AttributeError:
        return None
    return found


def settle(native: NativeConnection) -> None:
    """Read the reply of a ROLLBACK started at checkin, if one is due; raise if it failed.

    Called at every checkout of an asyncpg engine: three attribute reads and a dictionary
    read when none is due.
    """
    try:
        pending = native._connection._transport.__dict__.get(_KEY)  # noqa: SLF001 - asyncpg's
    except AttributeError:  # not asyncpg's adapter, or a transport without a __dict__ (uvloop)
        return
    if pending is not None:
        pending.settle()


def close_settled(dbapi_connection: DBAPIConnection) -> None:
    """Before the pool closes or terminates a connection: settle a reply that is due.

    Inside SQLAlchemy's greenlet on the ROLLBACK's own loop, the reply is awaited (bounded by
    ``ping_timeout``), so that the close that follows is the usual polite one; anywhere else (a
    collected connection, another loop) the connection is aborted. Never raises.
    """
    found = _transport_vars(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))
    pending = None if found is None else found.get(_KEY)
    if pending is None:
        return
    with contextlib.suppress(Exception):  # aborted already; the close goes on
        pending.settle(quiet=True)


def send_rollback(  # noqa: C901, PLR0911 - one return per case left to the adapter
    proxied: DBAPIConnection,
    during: During,
    timeout: float,
    report: Callable[[During, BaseException], None],
) -> bool:
    """Start the ROLLBACK on an asyncpg adapter without waiting; False: run the adapter's own.

    Left to the adapter: a connection asyncpg knows closed, one whose server said goodbye, one
    on a transport without a ``__dict__`` (uvloop's), an adapter of a shape dropsafe does not
    know, no event loop running in this thread.
    """
    adapter: Any = getattr(proxied, "dbapi_connection", proxied)
    try:
        transaction = adapter._transaction  # noqa: SLF001 - the adapter's state (SQLAlchemy 2.x)
        connection = adapter._connection  # noqa: SLF001
    except AttributeError:
        return False
    started = _started(adapter, transaction)
    if started is None:
        return False
    if not started:
        adapter._transaction = None  # noqa: SLF001 - as the adapter's rollback: nothing sent
        return True
    found = _transport_vars(adapter)
    if found is None or found.get(_KEY) is not None or connection.is_closed():
        return False
    # dropsafe's watch on the transport (`dropsafe._drivers.asyncpg`): the server said goodbye,
    # or the stream broke; asyncpg's own rollback then fails, and is absorbed as before.
    watch = connection._transport.get_protocol()  # noqa: SLF001
    if getattr(watch, "goodbye", False) or getattr(watch, "broken", False):
        return False
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    # A goodbye right behind the reply, in the same read, is noted too (the watch's docstring).
    scan = getattr(watch, "scan_to_ready", None)
    if scan is not None:
        scan()
    # As the adapter's _call_and_discard: once asyncpg's rollback is called, whatever it
    # says, the transaction is done.
    adapter._transaction = None  # noqa: SLF001
    if "_started" in _slots(adapter):
        adapter._started = False  # noqa: SLF001 - SQLAlchemy 2.0's flag
    pending = PendingRollback(connection, timeout, during, report)
    # Its own state, set here (an __init__ of its own would be a call more a request).
    pending._coroutine = transaction.rollback()  # noqa: SLF001 - this module's class
    pending._loop = loop  # noqa: SLF001
    pending.finished = loop.create_future()
    pending.step()
    if pending.finished.done() and pending.error is not None:
        # Failed before anything was sent (asyncpg refused the operation): as the adapter's
        # rollback, raised now, translated.
        adapter._handle_exception(pending.error)  # noqa: SLF001
    if not pending.finished.done():
        found[_KEY] = pending
    return True


def _started(adapter: Any, transaction: object) -> bool | None:  # noqa: ANN401
    """Whether the adapter began a transaction (None: an adapter dropsafe does not know)."""
    if "_started" in _slots(adapter):  # SQLAlchemy 2.0
        started = getattr(adapter, "_started", None)
        return started if isinstance(started, bool) else None
    return transaction is not None


def _slots(adapter: Any) -> tuple[str, ...]:  # noqa: ANN401
    # Over the class's bases too: the adapter's class may be dropsafe's subclass of
    # SQLAlchemy's, with no slots of its own (`asyncpg_begin`).
    return tuple(
        name for klass in type(adapter).__mro__ for name in getattr(klass, "__slots__", ())
    )


class PendingRollback(DeferredRollback):
    """asyncpg's ``Transaction.rollback()`` coroutine, stepped as its futures complete.

    Besides the core's: the coroutine, the loop it runs on, and ``finished``, done once
    asyncpg's rollback returned or raised (``error``); all set by `send_rollback`.
    """

    __slots__ = ("_coroutine", "_loop", "finished")

    _coroutine: Coroutine[Any, Any, object]
    _loop: asyncio.AbstractEventLoop
    finished: asyncio.Future[None]

    def step(self, _done: object = None) -> None:
        """Run the coroutine up to its next await (asyncio's Task does the same, less)."""
        try:
            awaited = self._coroutine.send(None)
        except StopIteration:
            self._end(None)
        except (KeyboardInterrupt, SystemExit) as exc:
            self._end(exc)
            raise
        except BaseException as exc:  # noqa: BLE001 - asyncpg's error, kept for the settle
            self._end(exc)
        else:
            if getattr(awaited, "_asyncio_future_blocking", False):
                # An asyncio future (asyncpg's waiter): step again once it is done; the
                # coroutine reads its result (or its exception) itself.
                awaited._asyncio_future_blocking = False  # noqa: SLF001 - asyncio's protocol
                awaited.add_done_callback(self.step)
            elif awaited is None:  # a bare yield: step again on the next loop iteration
                self._loop.call_soon(self.step)
            else:
                self._coroutine.close()
                self._end(RuntimeError(f"asyncpg's rollback awaited {awaited!r}"))

    def _end(self, error: BaseException | None) -> None:
        self.error = error
        if not self.finished.done():
            self.finished.set_result(None)

    def settle(self, *, quiet: bool = False) -> None:
        """Read the ROLLBACK's reply (or its failure); a failure aborts the connection, raised.

        ``quiet``: before a close; the failure is not reported, and outside SQLAlchemy's
        greenlet the connection is aborted rather than the reply awaited.
        """
        found = vars(self._connection._transport)  # noqa: SLF001 - asyncpg's
        if found.get(_KEY) is self:
            del found[_KEY]
        try:
            if os.getpid() != self._pid:
                raise RollbackLost(FORKED)  # noqa: TRY301 - aborted below, as any failure
            if not self.finished.done():
                if _running_loop() is not self._loop or (quiet and not in_greenlet()):
                    msg = "a ROLLBACK sent on another event loop is still unanswered here"
                    raise RollbackLost(msg)  # noqa: TRY301 - aborted below
                await_(asyncio.wait_for(self.finished, self._timeout))
            if self.error is not None:
                raise self.error  # noqa: TRY301 - aborted below, as any failure
            if self._connection._transport.is_closing():  # noqa: SLF001 - asyncpg's
                # Lost right behind the reply (a cut, a reset), and asyncio has begun to say so
                # (its TLS transport tells asyncpg a loop iteration later): closed anyway.
                msg = "the connection was lost right after the ROLLBACK's reply"
                raise RollbackLost(msg)  # noqa: TRY301
        except BaseException as exc:
            self._failed(exc, quiet=quiet)
            raise

    def _close(self) -> None:
        """End the connection without a word: its protocol state is unknown.

        On its own loop, asyncpg's ``terminate()``; the coroutine is left to read what asyncpg
        then says (the connection lost): a future whose exception nobody reads would be
        logged. On a loop that runs elsewhere, the same, handed to that loop. On a loop that
        no longer runs (closed, or a forked child's copy of its parent's), asyncpg's own abort
        would fail half way (its callbacks cannot be scheduled): the sockets under the
        transport are closed here (a child's close sends nothing: the parent's copy stays
        open), and asyncpg marked aborted, so that nothing is sent on it again; the
        coroutine is collected unfinished, silently.
        """
        loop = self._loop
        connection = self._connection
        if loop is _running_loop():
            connection.terminate()
        elif loop.is_running() and os.getpid() == self._pid:
            loop.call_soon_threadsafe(connection.terminate)
        else:
            connection._aborted = True  # noqa: SLF001 - asyncpg's is_closed() reads it
            _close_sockets(connection._transport)  # noqa: SLF001


def _close_sockets(transport: Any) -> None:  # noqa: ANN401 - asyncio's transport
    """Close the sockets under asyncio's transport (plain, or TLS over plain) without its loop.

    Marked closed as asyncio marks them, so that their collection does not warn.
    """
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    for each in (transport, inner):
        if each is None:
            continue
        sock = getattr(each, "_sock", None)
        if sock is not None:
            sock.close()
            each._sock = None  # noqa: SLF001 - asyncio's _SelectorTransport
        if getattr(each, "_closed", True) is False:
            each._closed = True  # noqa: SLF001 - asyncio's _SSLProtocolTransport


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
