"""A ROLLBACK that meets a lost connection is no error: the server has aborted that transaction.

This engine's own dialect instance gets a ``do_rollback`` that runs the original and, when the
connection was lost, invalidates what the ROLLBACK was for (a pool entry, named by the pool's
``reset`` event just before it; or the Connection, found in the frames that called it) and
emits `RollbackConnectionLost` instead of raising. Any other error stays loud; a COMMIT is
never touched. Why a dialect method and not an event, and what that costs: docs/guarantees.md,
"A ROLLBACK on a lost connection is not an error".
"""

from __future__ import annotations

import contextvars
import inspect
import weakref
from typing import TYPE_CHECKING, Any, Literal

from dropsafe._classify import ErrorKind, classify
from dropsafe._dbapi import ask
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe.events import RollbackConnectionLost

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, PoolResetState

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe.events import Hook

__all__ = ["QuietRollback"]

logger = SafeLogger()

# The pool entry whose reset is the next do_rollback in this thread (or greenlet, or task): set
# by the reset event that fires right before it, taken by do_rollback before it does any I/O.
# A context variable, not a thread-local: an async ROLLBACK awaits inside do_rollback, and
# other tasks' ROLLBACKs run on the same thread meanwhile; each reads its own before its first
# await.
_next_reset: contextvars.ContextVar[weakref.ReferenceType[Any] | None] = contextvars.ContextVar(
    "dropsafe_next_reset", default=None
)

#: How many frames above do_rollback to look for the Connection rolling back: SQLAlchemy's
#: _rollback_impl calls it directly; a few more leave room for a wrapper of someone else's.
_CALLER_FRAMES = 4


class QuietRollback:
    """Absorbs a lost connection during ROLLBACK on one engine: invalidated, never raised."""

    def __init__(self, hooks: tuple[Hook, ...], dialect: Dialect) -> None:
        self._hooks = hooks
        self._dialect = dialect

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the pool event that says a pool entry's reset is the next ROLLBACK, by name."""
        return {"reset": self._on_reset}

    def wrap_do_rollback(self) -> None:
        """Put the absorbing ``do_rollback`` on this engine's dialect instance (not its class).

        Whatever ``do_rollback`` the instance has now (the dialect's own, or someone's wrapper)
        is what runs inside.
        """
        original: Callable[[Any], None] = self._dialect.do_rollback

        def do_rollback(dbapi_connection: DBAPIConnection) -> None:
            reset = _next_reset.get()
            _next_reset.set(None)
            try:
                original(dbapi_connection)
            except Exception as exc:
                # The frames that called this one hold the Connection (see _rolling_back).
                if not self._absorbed(reset, dbapi_connection, exc, inspect.currentframe()):
                    raise

        # A documented Dialect method, replaced on this instance only (an attribute of the
        # instance shadows the class's method): other engines, and the dialect class, are
        # untouched. harden() attaches one guard per engine, so never twice.
        vars(self._dialect)["do_rollback"] = do_rollback

    # -- the event that fires right before a pool reset's do_rollback -------------------------

    def _on_reset(
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry,
        reset_state: PoolResetState,
    ) -> None:
        del dbapi_connection, reset_state
        _next_reset.set(weakref.ref(entry))

    # -- deciding -----------------------------------------------------------------------------

    def _absorbed(
        self,
        reset: weakref.ReferenceType[Any] | None,
        proxied: PoolProxiedConnection,
        error: Exception,
        do_rollback: FrameType | None,
    ) -> bool:
        """Invalidate what the failed ROLLBACK was for, if it was a lost connection; say so.

        ``do_rollback``: the frame of the failed call, below the frames that called it.
        """
        if not self._lost(error, proxied):
            return False
        entry: ConnectionPoolEntry | None = None if reset is None else reset()
        # A reset event that no ROLLBACK followed (its transaction was already reset) leaves a
        # stale entry behind: only the entry of this very connection counts.
        if entry is not None and entry.dbapi_connection is proxied.dbapi_connection:
            during: Literal["rollback", "reset"] = "reset"
            entry.invalidate(error)
        else:
            connection = _rolling_back(proxied, None if do_rollback is None else do_rollback.f_back)
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

    def _lost(self, error: Exception, proxied: PoolProxiedConnection) -> bool:
        if classify(error) in (ErrorKind.DISCONNECT, ErrorKind.FAILOVER):
            return True
        dialect = self._dialect
        return ask(  # an unsure verdict keeps the error loud
            lambda: (
                isinstance(error, dialect.loaded_dbapi.Error)
                and bool(dialect.is_disconnect(error, proxied, None))
            ),
            unknown=False,
            what="whether a ROLLBACK lost its connection",
        )


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
