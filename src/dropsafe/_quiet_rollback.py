"""A ROLLBACK that meets a lost connection is no error: the server has aborted that transaction.

A connection that dies while a transaction is open takes the transaction with it: PostgreSQL
aborts it when the backend ends or notices its client is gone. The ROLLBACK an application
sends afterwards (``session.rollback()``, a ``with Session(...)`` block closing, a Connection
closed with a transaction open, the pool's reset when a connection is checked in) can only
confirm that. Plain SQLAlchemy raises the driver's error there, after the request's work was
done; dropsafe invalidates the connection instead, as SQLAlchemy would have, emits
`RollbackConnectionLost` and lets the application go on as after a successful rollback: the
next use gets a fresh connection. A COMMIT is never touched: a lost COMMIT stays loud (and
inside ``run_transaction`` goes to the resolver).

Why the dialect's ``do_rollback`` is wrapped, on this engine's own dialect instance only:
SQLAlchemy 2.x lets a ``handle_error`` listener replace an error but never swallow it, and the
``rollback`` event fires before the ROLLBACK is sent, so no event can absorb a failure that
happens during it. ``do_rollback`` is the documented Dialect method every ROLLBACK goes
through (the Connection's, and the pool's reset). The ``rollback`` and ``reset`` events, which
fire just before it, say what the ROLLBACK is for: a Connection (invalidated with its public
``invalidate()``, so SQLAlchemy's own state is what it is after an invalidation) or a pool
entry (``ConnectionPoolEntry.invalidate()``, what the pool itself does when a reset fails,
without its ERROR log line). A failed ROLLBACK is absorbed only when it is a lost connection;
any other error is raised as before. Absorbing is safe even if the verdict were wrong: the
connection is closed, and closing a connection ends its transaction on the server.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from typing import TYPE_CHECKING, Any, Literal

from dropsafe._classify import ErrorKind, classify
from dropsafe._hooks import emit
from dropsafe._redaction import describe_error
from dropsafe.events import RollbackConnectionLost

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

    from dropsafe.events import Hook

__all__ = ["QuietRollback"]

logger = logging.getLogger("dropsafe")

_Target = tuple[Literal["rollback", "reset"], "weakref.ReferenceType[Any]"]

# What the next do_rollback in this thread (or greenlet, or task) is for: set by the event that
# fires right before it, taken by do_rollback before it does any I/O. A context variable, not a
# thread-local: an async ROLLBACK awaits inside do_rollback, and other tasks' ROLLBACKs run on
# the same thread meanwhile; each reads its own target before its first await.
_next_rollback: contextvars.ContextVar[_Target | None] = contextvars.ContextVar(
    "dropsafe_next_rollback", default=None
)


class QuietRollback:
    """Absorbs a lost connection during ROLLBACK on one engine: invalidated, never raised."""

    def __init__(self, hooks: tuple[Hook, ...], dialect: Dialect) -> None:
        self._hooks = hooks
        self._dialect = dialect

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the events that say what the next ROLLBACK is for, by name."""
        return {"rollback": self._on_rollback, "reset": self._on_reset}

    def wrap_do_rollback(self) -> None:
        """Put the absorbing ``do_rollback`` on this engine's dialect instance (not its class).

        Whatever ``do_rollback`` the instance has now (the dialect's own, or someone's wrapper)
        is what runs inside.
        """
        original: Callable[[Any], None] = self._dialect.do_rollback

        def do_rollback(dbapi_connection: Any) -> None:  # noqa: ANN401 - a pool's proxied connection
            target = _next_rollback.get()
            _next_rollback.set(None)
            try:
                original(dbapi_connection)
            except Exception as exc:
                if not self._absorbed(target, dbapi_connection, exc):
                    raise

        # A documented Dialect method, replaced on this instance only: other engines, and the
        # dialect class, are untouched. harden() attaches one guard per engine, so never twice.
        self._dialect.do_rollback = do_rollback  # type: ignore[method-assign]

    # -- the events that fire right before do_rollback ---------------------------------------

    def _on_rollback(self, connection: Connection) -> None:
        _next_rollback.set(("rollback", weakref.ref(connection)))

    def _on_reset(
        self,
        dbapi_connection: Any,  # noqa: ANN401 - DBAPI connections are untyped
        entry: ConnectionPoolEntry,
        reset_state: PoolResetState,
    ) -> None:
        del dbapi_connection, reset_state
        _next_rollback.set(("reset", weakref.ref(entry)))

    # -- deciding -----------------------------------------------------------------------------

    def _absorbed(self, target: _Target | None, proxied: Any, error: Exception) -> bool:  # noqa: ANN401
        """Invalidate what the failed ROLLBACK was for, if it was a lost connection; say so."""
        if target is None or not self._lost(error, proxied):
            return False
        during, reference = target
        owner = reference()
        if during == "rollback":
            connection: Connection | None = owner
            # Only the Connection whose ROLLBACK this is (a stale target is ignored): its
            # public invalidate() checks the pool entry back in, invalidated, and leaves the
            # Connection to reconnect on its next use, once its transaction has ended.
            if connection is None or connection.closed or connection.invalidated:
                return False
            if connection.connection is not proxied:
                return False
            connection.invalidate(error)
        else:
            entry: ConnectionPoolEntry | None = owner
            if entry is None or entry.dbapi_connection is not proxied.dbapi_connection:
                return False
            entry.invalidate(error)
        text = describe_error(error)
        logger.debug("dropsafe: a ROLLBACK met a lost connection, invalidated it: %s", text)
        emit(self._hooks, RollbackConnectionLost(during, text))
        return True

    def _lost(self, error: Exception, proxied: Any) -> bool:  # noqa: ANN401
        if classify(error) in (ErrorKind.DISCONNECT, ErrorKind.FAILOVER):
            return True
        dbapi = self._dialect.loaded_dbapi
        try:
            return isinstance(error, dbapi.Error) and bool(
                self._dialect.is_disconnect(error, proxied, None)
            )
        except Exception:  # noqa: BLE001 - an unsure verdict keeps the error loud
            logger.debug("dropsafe could not tell whether a ROLLBACK lost its connection")
            return False
