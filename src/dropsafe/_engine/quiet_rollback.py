"""A ROLLBACK that meets a lost connection is no error: the server has aborted that transaction.

This engine's own dialect instance gets a ``do_rollback`` that runs the original and, when the
connection was lost, invalidates what the ROLLBACK was for (a pool entry, when the pool's reset
called it; or the Connection, found in the frames that called it) and emits
`RollbackConnectionLost` instead of raising. Any other error stays loud; a COMMIT is
never touched. Why a dialect method and not an event, and what that costs: docs/guarantees.md,
"A ROLLBACK on a lost connection is not an error".

Where the driver can (`Driver.deferred_rollback`: psycopg 3 and psycopg2, sync;
`Driver.async_deferred_rollback`: asyncpg, psycopg 3), the ROLLBACK is not awaited
(``PoolPolicy.defer_checkin_rollback``): it is sent at once and its reply read before the
connection's next use, whoever makes it: the next checkout (`settler`, from the checkout
check), the driver itself (`dropsafe._drivers.psycopg_rollback`), or the dialect's pre-ping,
close and terminate, wrapped here where the driver asks (`dropsafe._drivers.asyncpg_rollback`,
`dropsafe._drivers.psycopg2_rollback`: no hook on their connections that every use passes). A
request that ends with a ROLLBACK then does not wait for it. A reply that is an error, late past
``ping_timeout``, or read in another process than the one that sent it closes the connection:
at checkout it is replaced like any dead one, never shown to the request.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy.exc

from dropsafe._classify import ErrorKind, classify
from dropsafe._dbapi import dialect_says_disconnect
from dropsafe._drivers import driver_for, is_supported
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe.events import RollbackConnectionLost

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import CodeType, FrameType

    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

    from dropsafe._dbapi import DBAPIConnection, NativeConnection
    from dropsafe.events import Hook

__all__ = ["QuietRollback"]

logger = SafeLogger()

#: How many frames above do_rollback to look for the Connection rolling back: SQLAlchemy's
#: _rollback_impl calls it directly; a few more leave room for a wrapper of someone else's.
_CALLER_FRAMES = 4


class QuietRollback:
    """Absorbs a lost connection during ROLLBACK on one engine: invalidated, never raised."""

    def __init__(
        self, hooks: tuple[Hook, ...], dialect: Dialect, *, defer: bool, settle_timeout: float
    ) -> None:
        self._hooks = hooks
        self._dialect = dialect
        # A driver that can send a ROLLBACK and read its reply later (psycopg 3 sync, its
        # `Driver.deferred_rollback`; asyncpg through SQLAlchemy's adapter, its
        # `Driver.async_deferred_rollback`).
        driver = driver_for(dialect) if is_supported(str(dialect.driver)) else None
        if driver is None:
            deferred = None
        elif dialect.is_async:
            deferred = driver.async_deferred_rollback
        else:
            deferred = driver.deferred_rollback
        self._deferred = deferred if defer else None
        self._defer = self._deferred is not None
        self._settle_timeout = settle_timeout
        self.reporter = _Reporter(hooks)

    @property
    def defers(self) -> bool:
        """Whether this engine's ROLLBACKs are sent without waiting for their reply."""
        return self._defer

    def wrap_do_rollback(self) -> None:
        """Put the absorbing ``do_rollback`` on this engine's dialect instance (not its class).

        Whatever ``do_rollback`` the instance has now (the dialect's own, or someone's wrapper)
        is what runs inside.
        """
        original: Callable[[Any], None] = self._dialect.do_rollback
        send_rollback = None if self._deferred is None else self._deferred.send
        defer = send_rollback is not None
        timeout = self._settle_timeout
        report = self.reporter

        def do_rollback(dbapi_connection: DBAPIConnection) -> None:
            # Who called it (the pool's reset, or a Connection): read before any I/O, as an
            # async ROLLBACK awaits inside and other tasks' run on this thread meanwhile.
            caller = sys._getframe(1)  # noqa: SLF001 - a frame read, no lookup by name
            try:
                # Deferred only where the connection is checked in right after: the pool's
                # reset at checkin, or a Connection's ROLLBACK that closes it (_ends_connection).
                # Decided here, not in a helper: a call at every request that ends.
                during: Literal["rollback", "reset"] | None = None
                if defer:
                    if caller.f_code is _closer_codes()[0]:
                        during = "reset"
                    elif _ends_connection(caller):
                        during = "rollback"
                if (
                    during is None
                    or send_rollback is None
                    or not send_rollback(dbapi_connection, during, timeout, report)
                ):
                    original(dbapi_connection)
            except Exception as exc:
                if not self._absorbed(caller, dbapi_connection, exc):
                    raise

        # A documented Dialect method, replaced on this instance only (an attribute of the
        # instance shadows the class's method): other engines, and the dialect class, are
        # untouched. harden() attaches one guard per engine, so never twice.
        vars(self._dialect)["do_rollback"] = do_rollback
        if self._deferred is not None and self._deferred.before_close is not None:
            self._settle_before_other_uses(self._deferred.before_close)

    def _settle_before_other_uses(self, before_close: Callable[[Any], None]) -> None:
        """Read a reply that is due before the dialect pings, closes or terminates a connection.

        Where the driver's connection offers no hook of its own that every use passes
        (SQLAlchemy's asyncio adapters: ``__slots__``), the uses that come before the checkout
        check are the dialect's: the pool's pre-ping, and its closes (dispose, overflow, an
        invalidation). A ROLLBACK that failed fails the pre-ping as a dead connection (this one
        replaced, not the whole pool); a close goes on after it.
        """
        dialect = self._dialect
        ping: Callable[[Any], bool] = dialect.do_ping
        close: Callable[[Any], None] = dialect.do_close
        terminate: Callable[[Any], None] = dialect.do_terminate
        settle = self._deferred.settle if self._deferred is not None else None

        def do_ping(dbapi_connection: DBAPIConnection) -> bool:
            if settle is not None:
                try:
                    settle(dbapi_connection)
                except Exception as exc:  # noqa: BLE001 - any failure: a dead connection
                    text = f"the ROLLBACK at checkin failed: {describe_error(exc)}"
                    raise sqlalchemy.exc.DisconnectionError(text) from None
            return ping(dbapi_connection)

        def do_close(dbapi_connection: DBAPIConnection) -> None:
            before_close(dbapi_connection)
            close(dbapi_connection)

        def do_terminate(dbapi_connection: DBAPIConnection) -> None:
            before_close(dbapi_connection)
            terminate(dbapi_connection)

        vars(dialect).update(do_ping=do_ping, do_close=do_close, do_terminate=do_terminate)
        if settle is not None and not dialect.is_async:
            self._settle_before_resets(settle)

    def _settle_before_resets(self, settle: Callable[[Any], None]) -> None:
        """Read a ROLLBACK run at checkin before SQLAlchemy resets the connection's characteristics.

        A Connection's ``execution_options(postgresql_readonly=..., isolation_level=...)`` are
        undone at checkin by a finalizer that runs after the pool's ROLLBACK
        (``DefaultDialect._reset_characteristics``, bound when the option is set): psycopg2
        refuses ``set_session`` while its ROLLBACK still runs in the worker ("cannot be used
        inside a transaction"; SQLAlchemy's own readonly and deferrable tests, 7 of them, under
        load). A failed ROLLBACK has closed the connection: nothing is reset on it.
        """
        dialect = self._dialect
        reset: Callable[[Any, Any], None] | None = getattr(dialect, "_reset_characteristics", None)
        if reset is None:  # a SQLAlchemy that resets nothing this way
            return

        def _reset_characteristics(characteristics: Any, dbapi_connection: Any) -> None:  # noqa: ANN401
            with contextlib.suppress(Exception):  # a failed ROLLBACK closed it: skipped below
                settle(dbapi_connection)
            if getattr(dbapi_connection, "closed", 0):
                return
            reset(characteristics, dbapi_connection)

        vars(dialect)["_reset_characteristics"] = _reset_characteristics

    # -- deciding -----------------------------------------------------------------------------

    def _absorbed(
        self, caller: FrameType, proxied: PoolProxiedConnection, error: Exception
    ) -> bool:
        """Invalidate what the failed ROLLBACK was for, if it was a lost connection; say so.

        ``caller``: the frame that called do_rollback (the pool's reset, or a Connection's).
        """
        if not self._lost(error, proxied):
            return False
        entry = _resetting(caller)
        if entry is not None and entry.dbapi_connection is proxied.dbapi_connection:
            during: Literal["rollback", "reset"] = "reset"
            entry.invalidate(error)
        else:
            connection = _rolling_back(proxied, caller)
            if connection is None:
                return False
            during = "rollback"
            # Its public invalidate() checks the pool entry back in, invalidated, and leaves
            # the Connection to reconnect on its next use, once its transaction has ended.
            connection.invalidate(error)
        text = describe_error(error)
        logger.debug("dropsafe: a ROLLBACK met a lost connection, invalidated it: %s", text)
        emit(self._hooks, RollbackConnectionLost(during, text))
        return True

    @property
    def settler(self) -> Callable[[NativeConnection], None] | None:
        """How to read the reply of a ROLLBACK sent without waiting, if one is due; or None.

        The driver's own function (`DeferredRollback.settle`), handed to the checkout check
        as it is (no wrapper: a call at every checkout), which calls it before anything else
        looks at the connection; a raise means the connection is closed and must be replaced.
        None where this engine's ROLLBACKs are awaited.
        """
        return None if self._deferred is None else self._deferred.settle

    def _lost(self, error: Exception, proxied: PoolProxiedConnection) -> bool:
        if classify(error) in (ErrorKind.DISCONNECT, ErrorKind.FAILOVER):
            return True
        # An unsure verdict keeps the error loud.
        return dialect_says_disconnect(
            self._dialect, error, proxied, what="whether a ROLLBACK lost its connection"
        )


class _Reporter:
    """What a driver's ROLLBACK not awaited tells this engine, and asks it (`Reporter`)."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: tuple[Hook, ...]) -> None:
        self._hooks = hooks

    def __call__(self, during: Literal["rollback", "reset"], error: BaseException) -> None:
        text = describe_error(error)
        logger.debug("dropsafe: a ROLLBACK met a lost connection, invalidated it: %s", text)
        emit(self._hooks, RollbackConnectionLost(during, text))

    def app_listens_before_settle(self, proxied: Any) -> bool:  # noqa: ANN401 - a pool's entry
        """Whether the app's listeners may touch the connection before the ROLLBACK is read.

        ``checkin`` listeners of the app's (they run right after the pool's reset), and
        ``checkout`` listeners of the app's that run before dropsafe's checkout check, which
        reads the ROLLBACK: on the Pool class (always first), or on the pool before harden().
        psycopg2 refuses their setters while its ROLLBACK runs in the worker ("set_session
        cannot be used inside a transaction"), and one that failed has closed the connection
        they would meet ("SSL connection has been closed unexpectedly" from a checkout listener
        of the app's, the request failed, where an awaited one replaced it at checkin).
        """
        # SQLAlchemy's _ConnectionFairy knows its pool; anything else: assume listeners.
        pool = getattr(proxied, "_pool", None)
        if pool is None:
            return True
        dispatch = pool.dispatch
        if not all(map(_is_dropsafes, dispatch.checkin)):
            return True
        # The first to run at checkout (class-level ones first, then the pool's in order):
        # dropsafe's checkout check, attached before any of dropsafe's other checkout listeners.
        first = next(iter(dispatch.checkout), None)
        return first is None or not _is_dropsafes(first)


def _is_dropsafes(listener: object) -> bool:
    """Whether a pool listener is one dropsafe attached (its function's module is ours)."""
    return str(getattr(listener, "__module__", None)).startswith("dropsafe.")


def _rolling_back(proxied: PoolProxiedConnection, caller: FrameType | None) -> Connection | None:
    """Return the open Connection whose ROLLBACK failed on ``proxied``, or None.

    Read from the calling frames, only after a ROLLBACK failed (see the module's docstring):
    the ``self`` of a frame that is a Connection holding this very pool connection. Anything
    else (no such frame, a Connection already closed or invalidated) gives None, and the error
    stays loud, as without dropsafe.
    """
    from sqlalchemy.engine import Connection

    frame = caller
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Connection):
            if owner.closed or owner.invalidated or owner.connection is not proxied:
                return None
            return owner
        frame = frame.f_back
    return None


# -- when a ROLLBACK may go unawaited: its connection is checked in right after it --------


#: Frames between do_rollback and what called a Connection's closing ROLLBACK (SQLAlchemy 2:
#: Connection._rollback_impl, RootTransaction._connection_rollback_impl, ._close_impl,
#: ._do_close, Transaction.close, then Connection.close or SessionTransaction.close).
_TO_CLOSER = 5


@functools.cache
def _closer_codes() -> tuple[CodeType | None, CodeType, CodeType, CodeType]:
    """Return the code of the pool's reset, and of what closes a Connection and its transaction.

    SQLAlchemy's pool calls do_rollback from ``_ConnectionFairy._reset`` (private: a version
    without it has its resets' ROLLBACKs awaited, and a lost one raised there, as without us).
    """
    from sqlalchemy.engine.base import Connection, Transaction
    from sqlalchemy.orm.session import SessionTransaction
    from sqlalchemy.pool.base import _ConnectionFairy

    reset = getattr(_ConnectionFairy, "_reset", None)
    return (
        getattr(reset, "__code__", None),
        Transaction.close.__code__,
        Connection.close.__code__,
        inspect.unwrap(SessionTransaction.close).__code__,
    )


def _resetting(caller: FrameType) -> ConnectionPoolEntry | None:
    """Return the pool entry whose reset called do_rollback from ``caller``, or None."""
    if caller.f_code is not _closer_codes()[0]:
        return None
    fairy = caller.f_locals.get("self")
    entry: ConnectionPoolEntry | None = getattr(fairy, "_connection_record", None)
    return entry


def _ends_connection(rollback_impl: FrameType) -> bool:
    """Whether this ROLLBACK closes its Connection for good (its transaction's close, then it).

    ``Connection.close()``, or a Session's close of a connection it opened (``autoclose``):
    nothing can be sent on that Connection after it. An explicit ``rollback()``, or a Session
    bound to the app's own Connection, may be followed by a statement on the same Connection,
    which would meet a failed ROLLBACK's error: those wait for their reply, as before. Any
    other shape of SQLAlchemy's frames (another version) waits too.
    """
    _, transaction_close, connection_close, session_close = _closer_codes()
    frame: FrameType | None = rollback_impl
    for _ in range(_TO_CLOSER - 1):
        frame = None if frame is None else frame.f_back
    if frame is None or frame.f_code is not transaction_close or frame.f_back is None:
        return False
    closer = frame.f_back
    if closer.f_code is connection_close:
        return True
    return closer.f_code is session_close and closer.f_locals.get("autoclose") is True
