"""What a failed connection means for the pool: recycle what the error proves dead, no more.

SQLAlchemy recycles the whole pool on any disconnect. dropsafe narrows that to what is dead:
a terminated backend takes its own connection only, while a restart, a crash, a failover or a
refused connect (the SQLSTATEs below, a server that turned read-only because it is now a
standby, or other idle connections found dead too) recycles every pooled connection. A user's
own read-only transaction (25006 on a primary) is the user's error: permanent, and it recycles
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from dropsafe._classify import READ_ONLY_SQLSTATE, ErrorKind, classify, sqlstate_of
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe.events import ConnectionInvalidated

if TYPE_CHECKING:
    from sqlalchemy.engine import ExceptionContext

    from dropsafe._drivers import Driver
    from dropsafe._engine.liveness import CheckoutCheck
    from dropsafe.events import Hook

__all__ = ["POOL_WIDE_SQLSTATES", "InvalidationScope"]

logger = SafeLogger()

#: SQLSTATEs after which every pooled connection is suspect, not only the one that saw it:
#: crash_shutdown, cannot_connect_now, and the two a connect fails with. (25006 is pool-wide
#: too, when the server is found in recovery: see `InvalidationScope._turned_standby`.)
POOL_WIDE_SQLSTATES = frozenset({"57P02", "57P03", "08001", "08004"})


class InvalidationScope:
    """Decides, at SQLAlchemy's ``handle_error``, how much of one engine's pool an error ends."""

    def __init__(self, hooks: tuple[Hook, ...], driver: Driver, check: CheckoutCheck) -> None:
        self._hooks = hooks
        self._driver = driver
        self._check = check

    def on_handle_error(self, context: ExceptionContext) -> None:
        """Mark a disconnect SQLAlchemy missed; keep the pool unless the error speaks for it.

        Only ever narrows SQLAlchemy's decision to recycle the pool: it keeps the pool on an
        interrupt (KeyboardInterrupt, a cancelled task), and this listener runs first, so a
        listener of the user's sees dropsafe's decision and can overrule it. An error that
        SQLAlchemy wrapped already was judged where it was raised (a unit's mark read before
        COMMIT, on its own connection: `dropsafe._unit.dialect_hooks`): left alone here.
        """
        if isinstance(context.original_exception, DBAPIError):
            return
        kind = classify(context.original_exception)
        if self._turned_standby(context):
            kind = ErrorKind.FAILOVER  # classify() then sees connection_invalidated: a failover too
        if kind in (ErrorKind.DISCONNECT, ErrorKind.FAILOVER) and not context.is_disconnect:
            context.is_disconnect = True
        if context.is_disconnect:
            pool_wide = (
                kind is ErrorKind.FAILOVER
                or sqlstate_of(context.original_exception) in POOL_WIDE_SQLSTATES
                or self._check.other_idle_connections_dead()
            )
            pool_wide = pool_wide and context.invalidate_pool_on_disconnect
            context.invalidate_pool_on_disconnect = pool_wide
            text = describe_error(context.original_exception)
            emit(self._hooks, ConnectionInvalidated(kind, pool_wide, text))

    def _turned_standby(self, context: ExceptionContext) -> bool:
        """Whether a 25006 (read-only transaction) came from a server in recovery.

        Only then is it a failover. On a primary it is the user's own ``SET TRANSACTION READ
        ONLY`` (or the server's settings): their error, which must recycle nothing.
        """
        if sqlstate_of(context.original_exception) != READ_ONLY_SQLSTATE:
            return False
        connection = context.connection
        if connection is None or connection.invalidated:
            return False
        try:
            native = self._driver.native(connection.connection.dbapi_connection)
            return native is not None and self._driver.in_hot_standby(native) is True
        except Exception:
            logger.debug("dropsafe could not tell whether the server is a standby", exc_info=True)
            return False
