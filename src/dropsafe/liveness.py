"""The guard on an engine: a free look at each connection on checkout, a ping only when needed.

A busy pool pays nothing: a socket polled with a zero timeout (or the driver's closed flag)
says whether a FIN, an RST or the server's goodbye arrived while the connection sat idle. Only
then, or after ``Policy.ping_after_idle``, is a real round trip spent. A connection found dead
is replaced by raising SQLAlchemy's `DisconnectionError` from the ``checkout`` event; when other
idle connections are dead too (a restart, a failover), the whole pool is recycled at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy.exc
from sqlalchemy import event

from dropsafe.classify import POOL_WIDE_SQLSTATES, READ_ONLY_SQLSTATE, Kind, classify, sqlstate_of
from dropsafe.drivers import Driver, Health
from dropsafe.events import ConnectionInvalidated, DeadConnectionReplaced, PingSucceeded, emit
from dropsafe.hosts import HostOrder
from dropsafe.policy import Policy, seconds
from dropsafe.redaction import describe_error

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect, Engine, ExceptionContext
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

__all__ = ["ConnectionGuard"]

logger = logging.getLogger("dropsafe")

_ADDED = "dropsafe.added_connect_args"
_IDLE_SINCE = "dropsafe.idle_since"
_FRESH = "dropsafe.fresh"


class ConnectionGuard:
    """Everything dropsafe attaches to one engine; one guard per engine, no shared state."""

    def __init__(self, policy: Policy, driver: Driver, dialect: Dialect) -> None:
        self.policy = policy
        self.driver = driver
        self._dialect = dialect
        self._ping_after_idle = seconds(policy.ping_after_idle)
        self._ping_timeout = seconds(policy.ping_timeout)
        self._idle: dict[int, Any] = {}  # id(pool entry) -> DBAPI connection, while checked in
        self._lock = threading.Lock()
        # With several hosts, where connects start (never moved by connects in flight).
        self._host_order = HostOrder(driver)

    def attach(self, engine: Engine) -> None:
        """Listen to the engine's connect, pool and error events."""
        event.listen(engine, "do_connect", self._on_do_connect)
        event.listen(engine, "handle_error", self._on_handle_error)
        pool_events: dict[str, Callable[..., None]] = {
            "connect": self._on_connect,
            "checkout": self._on_checkout,
            "checkin": self._on_checkin,
            "close": self._forget,
            "detach": self._forget,
            "invalidate": self._forget_invalidated,
            "soft_invalidate": self._forget_invalidated,
        }
        for name, listener in pool_events.items():
            event.listen(engine, name, listener)

    # -- connecting ------------------------------------------------------------------------

    def _on_do_connect(
        self,
        dialect: Dialect,
        entry: ConnectionPoolEntry,
        cargs: list[Any],
        cparams: dict[str, Any],
    ) -> None:
        del dialect
        entry.info[_ADDED] = self.driver.connect_defaults(self.policy, cargs, cparams)
        self._host_order.before_connect(cparams)

    def _on_connect(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401
        try:
            self.driver.on_connect(dbapi_connection, self.policy, entry.info.pop(_ADDED, set()))
        except OSError as exc:
            # Keepalives are a safety net: a socket that refuses them still works.
            logger.warning("dropsafe could not tune a new connection's socket: %s", exc)
        entry.info[_IDLE_SINCE] = time.monotonic()
        entry.info[_FRESH] = True
        self._host_order.connected(dbapi_connection)

    # -- checkout and checkin --------------------------------------------------------------

    def _on_checkin(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401
        if dbapi_connection is None:
            return
        entry.info[_IDLE_SINCE] = time.monotonic()
        with self._lock:
            self._idle[id(entry)] = dbapi_connection

    def _on_checkout(
        self,
        dbapi_connection: Any,  # noqa: ANN401
        entry: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
    ) -> None:
        del proxy
        self._forget(dbapi_connection, entry)
        health = self.driver.probe(dbapi_connection)
        now = time.monotonic()
        idle_for = now - entry.info.get(_IDLE_SINCE, now)
        # A connection made for this checkout was just proven by its handshake.
        fresh = entry.info.pop(_FRESH, False)
        if health is Health.ALIVE and (fresh or idle_for <= self._ping_after_idle):
            return
        reason = f"probe found the connection {health.value}"
        if health is not Health.DEAD:
            try:
                self.driver.ping(self._dialect, dbapi_connection, self._ping_timeout)
            except Exception as exc:  # noqa: BLE001 - any failure of the ping means replace it
                reason = f"ping failed: {describe_error(exc)}"
            else:
                why: Literal["idle", "suspect"] = "suspect" if health is Health.SUSPECT else "idle"
                emit(self.policy.hooks, PingSucceeded(time.monotonic() - now, why))
                return
        pool_wide = self._other_idle_connections_dead()
        emit(self.policy.hooks, DeadConnectionReplaced(reason, pool_wide=pool_wide))
        if pool_wide:
            raise sqlalchemy.exc.InvalidatePoolError(reason)
        raise sqlalchemy.exc.DisconnectionError(reason)

    def _forget(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401
        del dbapi_connection
        with self._lock:
            self._idle.pop(id(entry), None)

    def _forget_invalidated(
        self,
        dbapi_connection: Any,  # noqa: ANN401
        entry: ConnectionPoolEntry,
        exception: BaseException | None,
    ) -> None:
        del exception
        self._forget(dbapi_connection, entry)

    def _other_idle_connections_dead(self) -> bool:
        """Look (for free) at every idle connection: more than one dead means a server event."""
        with self._lock:
            idle = list(self._idle.values())
        return any(self.driver.probe(connection) is Health.DEAD for connection in idle)

    # -- errors ----------------------------------------------------------------------------

    def _on_handle_error(self, context: ExceptionContext) -> None:
        if context.connection is None:  # getting a connection failed: a connect, if one ran
            self._host_order.connect_failed()
        kind = classify(context.original_exception)
        if self._turned_standby(context):
            kind = Kind.FAILOVER  # classify() then sees connection_invalidated: a failover too
        if kind in (Kind.DISCONNECT, Kind.FAILOVER) and not context.is_disconnect:
            context.is_disconnect = True
        if context.is_disconnect:
            # SQLAlchemy recycles the whole pool on any disconnect; recycle only what is dead.
            pool_wide = (
                kind is Kind.FAILOVER
                or sqlstate_of(context.original_exception) in POOL_WIDE_SQLSTATES
                or self._other_idle_connections_dead()
            )
            context.invalidate_pool_on_disconnect = pool_wide
            text = describe_error(context.original_exception)
            emit(self.policy.hooks, ConnectionInvalidated(kind, pool_wide, text))

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
            dbapi_connection = connection.connection.dbapi_connection
            return self.driver.in_hot_standby(dbapi_connection) is True
        except Exception:
            logger.debug("dropsafe could not tell whether the server is a standby", exc_info=True)
            return False
