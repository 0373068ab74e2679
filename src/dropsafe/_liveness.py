"""The guard on an engine: a free look at each connection on checkout, a ping only when needed.

A busy pool pays nothing: a socket polled with a zero timeout (or the driver's closed flag)
says whether a FIN, an RST or the server's goodbye arrived while the connection sat idle. Only
then, or after ``Policy.ping_after_idle``, is a real round trip spent. A connection found dead
is replaced by raising SQLAlchemy's `DisconnectionError` from the ``checkout`` event; when other
idle connections are dead too (a restart, a failover), the whole pool is recycled at once.

A connection dropsafe cannot look into (a ``creator=`` that returns a wrapper or another
driver's object) is never judged dead by a look: it is pinged when it has sat idle longer than
``Policy.ping_after_idle``, as ``pool_pre_ping`` would, with the dialect's own ``do_ping``; and
since dropsafe cannot tell whether it is alive, a disconnect elsewhere recycles the pool as
plain SQLAlchemy does.
Known wrappers (the AWS Advanced Python Wrapper's ``target_connection``, ``__wrapped__``
proxies) are looked through to the driver's connection.

dropsafe's per-connection state lives here, weakly keyed on SQLAlchemy's pool entry: nothing in
the user's ``.info`` dictionaries, and nothing that keeps a connection the pool let go of alive.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy.exc
from sqlalchemy import event

from dropsafe._classify import (
    POOL_WIDE_SQLSTATES,
    READ_ONLY_SQLSTATE,
    ErrorKind,
    classify,
    sqlstate_of,
)
from dropsafe._drivers import Driver, Health
from dropsafe._hooks import emit
from dropsafe._hosts import HostOrder
from dropsafe._policy import Policy, seconds
from dropsafe._redaction import describe_error
from dropsafe.events import ConnectionInvalidated, DeadConnectionReplaced, PingSucceeded

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect, Engine, ExceptionContext
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

__all__ = ["ConnectionGuard"]

logger = logging.getLogger("dropsafe")

# Attributes through which known wrappers reach the driver's connection: the AWS Advanced
# Python Wrapper (target_connection), wrapt and functools-style proxies, common hand-made ones.
_WRAPPER_ATTRIBUTES = ("target_connection", "__wrapped__", "_wrapped", "_connection", "_conn")
_UNWRAP_DEPTH = 3


@dataclass
class _EntryState:
    """What the guard knows about the connection a pool entry holds now."""

    idle_since: float
    fresh: bool = True  # made for the coming checkout: its handshake just proved it
    idle: bool = False  # checked in, in the pool


class ConnectionGuard:
    """Everything dropsafe attaches to one engine; one guard per engine, no shared state."""

    def __init__(self, policy: Policy, driver: Driver, dialect: Dialect) -> None:
        self.policy = policy
        self.driver = driver
        self._dialect = dialect
        self._ping_after_idle = seconds(policy.pool.ping_after_idle)
        self._ping_timeout = seconds(policy.pool.ping_timeout)
        # Weakly keyed on the pool entry: an entry the pool drops (dispose(close=False), a
        # collected pool) takes its state along, and its connection is closed as without us.
        self._states: weakref.WeakKeyDictionary[ConnectionPoolEntry, _EntryState] = (
            weakref.WeakKeyDictionary()
        )
        # Connect arguments dropsafe added, from do_connect to the pool's connect event.
        self._added: weakref.WeakKeyDictionary[ConnectionPoolEntry, set[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        # With several hosts, where connects start (never moved by connects in flight).
        self._host_order = HostOrder(driver)
        self._pre_ping = False
        # Set once a connection dropsafe cannot look into was made (a creator= of unknown
        # objects): this pool then gets SQLAlchemy's own pool-wide recycle on a disconnect.
        self._opaque = False

    def attach(self, engine: Engine) -> None:
        """Listen to the engine's connect, pool and error events."""
        # The user's pool_pre_ping already pays a round trip at each checkout: no second one.
        self._pre_ping = bool(getattr(engine.pool, "_pre_ping", False))
        event.listen(engine, "do_connect", self._on_do_connect)
        event.listen(engine, "handle_error", self._on_handle_error)
        self._run_first(engine, "handle_error", self._on_handle_error)
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

    @staticmethod
    def _run_first(engine: Engine, identifier: str, listener: Callable[..., None]) -> None:
        """Move ``listener``, just added, to the front of the engine's listeners.

        Listeners of the user's, added before or after harden(), then see dropsafe's decision
        and can overrule it (is_disconnect, invalidate_pool_on_disconnect). ``insert=True``
        would say so, but SQLAlchemy drops it for handle_error, whose listeners live on the
        engine's dialect; this reorders that dialect's own list (listeners on the Dialect
        class still run before every engine's own, as SQLAlchemy runs them).
        """
        listeners = getattr(getattr(engine.dialect.dispatch, identifier), "listeners", None)
        if isinstance(listeners, deque) and listeners and listeners[-1] == listener:
            listeners.rotate(1)
        else:
            logger.debug("dropsafe could not put its %s listener first", identifier)

    # -- connecting ------------------------------------------------------------------------

    def _on_do_connect(
        self,
        dialect: Dialect,
        entry: ConnectionPoolEntry | None,
        cargs: list[Any],
        cparams: dict[str, Any],
    ) -> None:
        del dialect
        added = self.driver.connect_defaults(self.policy.connection, cargs, cparams)
        # No entry when the pool's creator is called directly: no pool event follows either.
        if entry is not None:
            self._remember(self._added, entry, added)
        self._host_order.before_connect(cparams)

    def _on_connect(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401
        with self._lock:
            added = self._added.pop(entry, set()) if _weakable(entry) else set()
        self._remember(self._states, entry, _EntryState(idle_since=time.monotonic()))
        native = self._native(dbapi_connection)
        if native is None:
            self._opaque = True
        else:
            try:
                self.driver.on_connect(native, self.policy.connection, added)
            except OSError as exc:
                # Keepalives are a safety net: a socket that refuses them still works.
                logger.warning("dropsafe could not tune a new connection's socket: %s", exc)
            self._host_order.connected(native)

    # -- checkout and checkin --------------------------------------------------------------

    def _on_checkin(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401
        if dbapi_connection is None:
            return  # invalidated while checked out: the pool reconnects it on next use
        with self._lock:
            state = self._state(entry)
            if state is not None:
                state.idle_since = time.monotonic()
                state.idle = True

    def _on_checkout(
        self,
        dbapi_connection: Any,  # noqa: ANN401
        entry: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
    ) -> None:
        del proxy
        now = time.monotonic()
        with self._lock:
            state = self._state(entry)
            if state is None:  # an entry made before harden(), or one we cannot key on
                state = _EntryState(idle_since=now, fresh=False)
                self._remember(self._states, entry, state, locked=True)
            state.idle = False
            fresh, state.fresh = state.fresh, False
            idle_for = now - state.idle_since
        native = self._native(dbapi_connection)
        health = Health.UNKNOWN if native is None else self._probe(native)
        # A connection made for this checkout was just proven by its handshake; the user's
        # pool_pre_ping has just proven this one.
        recent = fresh or self._pre_ping or idle_for <= self._ping_after_idle
        if recent and health in (Health.ALIVE, Health.UNKNOWN):
            return
        reason = f"probe found the connection {health.value}"
        if health is not Health.DEAD:
            try:
                self._ping(dbapi_connection, native)
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
        """Mark the entry not idle: the pool closes, detaches or invalidates its connection."""
        del dbapi_connection
        with self._lock:
            state = self._state(entry)
            if state is not None:
                state.idle = False

    def _forget_invalidated(
        self,
        dbapi_connection: Any,  # noqa: ANN401
        entry: ConnectionPoolEntry,
        exception: BaseException | None,
    ) -> None:
        del exception
        self._forget(dbapi_connection, entry)

    def _other_idle_connections_dead(self) -> bool:
        """Look (for free) at every idle connection: another one dead means a server event.

        One that dropsafe cannot look into counts as dead, and so does a pool that has had
        one: SQLAlchemy's own decision (recycle the whole pool on a disconnect) stands wherever
        dropsafe cannot prove it unneeded.
        """
        if self._opaque:
            return True
        with self._lock:
            idle = [
                (entry, entry.dbapi_connection)
                for entry, state in self._states.items()
                if state.idle and entry.dbapi_connection is not None
            ]
        for entry, connection in idle:
            native = self._native(connection)
            if native is not None and self._probe(native) in (Health.ALIVE, Health.SUSPECT):
                continue
            # The snapshot may be stale: the pool announces a close, detach or invalidation
            # before it acts, so a connection it is closing is no longer idle here, and only a
            # connection still idle, still the same one, is evidence of a server event.
            with self._lock:
                state = self._states.get(entry)
                if state is not None and state.idle and entry.dbapi_connection is connection:
                    return True
        return False

    # -- looking into connections ----------------------------------------------------------

    def _native(self, dbapi_connection: Any) -> Any:  # noqa: ANN401 - DBAPI connections are untyped
        """Return the driver's own connection inside ``dbapi_connection``, or None if unknown."""
        candidate = dbapi_connection
        for _ in range(_UNWRAP_DEPTH + 1):
            if candidate is None:
                return None
            if self.driver.owns(candidate):
                return candidate
            candidate = _unwrap_once(candidate)
        return None

    def _probe(self, native: Any) -> Health:  # noqa: ANN401
        try:
            return self.driver.probe(native)
        except Exception:  # a look that fails proves nothing: ping instead
            logger.debug("dropsafe could not look into a connection", exc_info=True)
            return Health.UNKNOWN

    def _ping(self, dbapi_connection: Any, native: Any) -> None:  # noqa: ANN401
        """One round trip: the driver's bounded ping, or the dialect's own for unknown objects."""
        if native is not None:
            self.driver.ping(self._dialect, native, self._ping_timeout)
        elif not self._dialect.do_ping(dbapi_connection):
            raise sqlalchemy.exc.DisconnectionError("the dialect's ping found it disconnected")

    # -- per-entry state -------------------------------------------------------------------

    def _state(self, entry: ConnectionPoolEntry) -> _EntryState | None:
        return self._states.get(entry) if _weakable(entry) else None

    def _remember(
        self,
        table: weakref.WeakKeyDictionary[ConnectionPoolEntry, Any],
        entry: ConnectionPoolEntry,
        value: object,
        *,
        locked: bool = False,
    ) -> None:
        if not _weakable(entry):
            return
        if locked:
            table[entry] = value
            return
        with self._lock:
            table[entry] = value

    # -- errors ----------------------------------------------------------------------------

    def _on_handle_error(self, context: ExceptionContext) -> None:
        if context.connection is None:  # getting a connection failed: a connect, if one ran
            self._host_order.connect_failed()
        kind = classify(context.original_exception)
        if self._turned_standby(context):
            kind = ErrorKind.FAILOVER  # classify() then sees connection_invalidated: a failover too
        if kind in (ErrorKind.DISCONNECT, ErrorKind.FAILOVER) and not context.is_disconnect:
            context.is_disconnect = True
        if context.is_disconnect:
            # SQLAlchemy recycles the whole pool on any disconnect; recycle only what is dead.
            pool_wide = (
                kind is ErrorKind.FAILOVER
                or sqlstate_of(context.original_exception) in POOL_WIDE_SQLSTATES
                or self._other_idle_connections_dead()
            )
            # Only ever narrow SQLAlchemy's decision: it keeps the pool on an interrupt
            # (KeyboardInterrupt, a cancelled task), and dropsafe's listener runs first.
            pool_wide = pool_wide and context.invalidate_pool_on_disconnect
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
            native = self._native(connection.connection.dbapi_connection)
            return native is not None and self.driver.in_hot_standby(native) is True
        except Exception:
            logger.debug("dropsafe could not tell whether the server is a standby", exc_info=True)
            return False


def _weakable(entry: object) -> bool:
    """SQLAlchemy's pool entries take weak references; a stand-in from elsewhere may not."""
    return hasattr(type(entry), "__weakref__")


def _unwrap_once(wrapper: Any) -> Any:  # noqa: ANN401
    """Return the object ``wrapper`` wraps through one known attribute, or None."""
    for name in _WRAPPER_ATTRIBUTES:
        try:
            inner = getattr(wrapper, name, None)
        except Exception:  # noqa: BLE001, S112 - a property that fails is not a way in
            continue
        if inner is not None and inner is not wrapper:
            return inner
    return None
