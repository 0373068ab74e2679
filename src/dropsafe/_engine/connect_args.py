"""Connect arguments and socket options, so that TCP finds a dead link in seconds, not minutes.

Half-open sockets are found by TCP, not by waiting: keepalives (which also keep NAT and
load-balancer state alive, removing the most common cause of silent drops), TCP_USER_TIMEOUT
and a connect timeout. Linux defaults otherwise leave a query on a dead link hanging for about
15 minutes. They go in as the driver's connect arguments where it takes them (libpq) and onto
the socket after connecting where it does not (asyncpg, pg8000); whatever the user set (in the
URL, ``connect_args``, a DSN, libpq's environment or service file) wins. With several hosts, a
connect starts where `HostOrder` says.
"""

from __future__ import annotations

import errno
import math
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Any

from dropsafe._engine.hosts import HostOrder
from dropsafe._log import SafeLogger
from dropsafe._policy import ConnectionPolicy, seconds
from dropsafe._process import renew_lock_in_child

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect, ExceptionContext
    from sqlalchemy.pool import ConnectionPoolEntry

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._drivers import Driver
    from dropsafe.events import Hook

__all__ = ["ConnectArguments", "tune_socket"]

logger = SafeLogger()


class ConnectArguments:
    """Applies one engine's `ConnectionPolicy` to each connect, and routes among its hosts."""

    def __init__(
        self, policy: ConnectionPolicy, driver: Driver, hooks: tuple[Hook, ...] = (), url: str = ""
    ) -> None:
        self._policy = policy
        self._driver = driver
        # Connect arguments dropsafe added, from do_connect to the pool's connect event.
        self._added: weakref.WeakKeyDictionary[ConnectionPoolEntry, set[str]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork
        # With several hosts, where connects start (never moved by connects in flight) and
        # which hosts they leave out for a while (those that stopped answering).
        self._host_order = HostOrder(driver, hooks, url)

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the engine and pool events this listens to, by name."""
        return {
            "do_connect": self._on_do_connect,
            "connect": self._on_connect,
            "handle_error": self._on_handle_error,
            "invalidate": self._on_invalidate,
        }

    def _on_do_connect(
        self,
        dialect: Dialect,
        entry: ConnectionPoolEntry | None,
        cargs: list[Any],
        cparams: dict[str, Any],
    ) -> None:
        del dialect
        added = self._driver.connect_defaults(self._policy, cargs, cparams)
        # No entry when the pool's creator is called directly: no pool event follows either.
        if entry is not None and _weakable(entry):
            with self._lock:
                self._added[entry] = added
        self._host_order.before_connect(cparams)

    def _on_connect(self, dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
        with self._lock:
            added = self._added.pop(entry, set()) if _weakable(entry) else set()
        native = self._driver.native(dbapi_connection)
        if native is None:
            return  # not a connection dropsafe can look into: nothing to tune
        try:
            sock = self._driver.socket_for_options(native)
            if sock is not None:
                tune_socket(sock, self._policy)
            self._driver.after_connect(native, added)
        except OSError as exc:
            # Keepalives are a safety net: a socket that refuses them still works.
            logger.warning("dropsafe could not tune a new connection's socket: %s", exc)
        self._host_order.connected(native)

    def _on_handle_error(self, context: ExceptionContext) -> None:
        if context.connection is None:  # getting a connection failed: a connect, if one ran
            self._host_order.connect_failed(context.original_exception)
        elif context.is_disconnect and _timed_out(context.original_exception):
            pooled = getattr(context.connection, "_dbapi_connection", None)
            native = self._driver.native(getattr(pooled, "dbapi_connection", None))
            if native is not None:
                self._host_order.timed_out(native)

    def _on_invalidate(
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry,
        exception: BaseException | None,
    ) -> None:
        # Every path that drops a connection TCP gave up on, also those that raise nothing
        # (a ROLLBACK absorbed on a lost connection, a pool reset at checkin).
        del entry
        if exception is not None and _timed_out(exception):
            native = self._driver.native(dbapi_connection)
            if native is not None:
                self._host_order.timed_out(native)


def tune_socket(sock: socket.socket, policy: ConnectionPolicy) -> None:
    """Set keepalives and TCP_USER_TIMEOUT on a TCP socket (a Unix socket needs none)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if policy.keepalive_idle is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", seconds(policy.keepalive_idle)),
            ("TCP_KEEPINTVL", seconds(policy.keepalive_interval)),
            ("TCP_KEEPCNT", policy.keepalive_count),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), math.ceil(value))
    if policy.tcp_user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        milliseconds = math.ceil(seconds(policy.tcp_user_timeout) * 1000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)


def _timed_out(error: BaseException) -> bool:
    """Whether TCP gave up on the connection under ``error`` (its peer stopped answering)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ETIMEDOUT:
            return True
        if "connection timed out" in str(current).lower():  # libpq has no errno to give
            return True
        current = current.__cause__ or current.__context__
    return False


def _weakable(entry: object) -> bool:
    """SQLAlchemy's pool entries take weak references; a stand-in from elsewhere may not."""
    return hasattr(type(entry), "__weakref__")
