"""Per-driver facts, so that nothing else in dropsafe needs to know which driver it talks to.

Each supported DBAPI driver (psycopg2, psycopg 3, asyncpg, pg8000) gets one `Driver`: which
connect arguments carry dropsafe's connection settings, how to recognise its connection (also
inside known wrappers), where its socket is, how to look at that socket without a round trip,
how to ping within a timeout, how it takes a multi-host list, and what the server reported to
it. What dropsafe does with these facts lives elsewhere: the checkout check in
`dropsafe._engine.liveness`, connect arguments and socket options in
`dropsafe._engine.connect_args`, the deadline on a wait in `dropsafe._drivers.deadline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import math
import os
import re
import select
import socket
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.util import concurrency as _sa_concurrency

from dropsafe._errors import ConfigurationError
from dropsafe._policy import ConnectionPolicy, seconds
from dropsafe._process import unpatched
from dropsafe._socket_shutdown import shut_down_at

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import Dialect

__all__ = [
    "SUPPORTED",
    "SUPPORTED_DRIVERS",
    "Driver",
    "Health",
    "Server",
    "bytes_sent",
    "driver_for",
    "is_supported",
    "socket_fd",
    "socket_fd_of",
    "tcp_bytes_sent",
]

_LIBPQ_KEYS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "connect_timeout",
)
# Runs a coroutine from SQLAlchemy's greenlet; SQLAlchemy 2.1 renamed await_only to await_.
_await: Callable[[Awaitable[Any]], Any] = (
    getattr(_sa_concurrency, "await_", None) or _sa_concurrency.await_only
)
# The environment variables libpq reads for dropsafe's keys (PQconndefaults: only this one;
# keepalives and tcp_user_timeout have none).
_LIBPQ_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}
_DSN_SERVICE = re.compile(r"(?:^|[\s?&])service\s*=\s*'?([^\s'&]+)")
_DSN_KEY = re.compile(r"(?:^|[\s?&])(" + "|".join(_LIBPQ_KEYS) + r")\s*=")
# Attributes through which known wrappers reach the driver's connection: the AWS Advanced
# Python Wrapper (target_connection), wrapt and functools-style proxies, common hand-made ones.
_WRAPPER_ATTRIBUTES = ("target_connection", "__wrapped__", "_wrapped", "_connection", "_conn")
_UNWRAP_DEPTH = 3
# Readable means data or EOF waits; the others mean the peer hung up or the socket failed.
# The interpreter's own poll, whichever import order: gevent's (after ``monkey.patch_all()``)
# never reports a hang-up, so every dead idle connection would cost a ping; eventlet's has none.
_real_poll = unpatched("select", "poll")
_POLL_DEAD = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
_POLL_MASK = select.POLLIN | _POLL_DEAD
# struct tcp_info (linux/tcp.h, Linux 4.19+): u32 tcpi_notsent_bytes at 144, u64
# tcpi_bytes_sent at 200 and tcpi_bytes_retrans at 208. The layout only grows at its end, so
# these offsets hold on later kernels.
_TCP_INFO_NOTSENT = struct.Struct("=I")
_TCP_INFO_NOTSENT_AT = 144
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_BYTES_AT = 200
_TCP_INFO_LENGTH = 256
_PQTRANS_IDLE = 0  # libpq's PGTransactionStatusType: PQTRANS_IDLE
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux only


@dataclass(frozen=True)
class Server:
    """Where a connection went: with several hosts, the one that answered as wanted."""

    host: str
    port: int


class Health(enum.Enum):
    """What a look at an idle connection's socket, without a round trip, saw."""

    #: Open, and nothing arrived while it sat idle.
    QUIET = "quiet"
    #: Something arrived while idle: the server's goodbye (an ERROR before it closes), or a
    #: notice or notification. Only a ping tells which.
    DATA_WAITING = "data waiting"
    #: The driver says it is closed, or the socket says the peer hung up or it failed.
    CLOSED = "closed"
    #: No look was possible: not this driver's connection (a wrapper dropsafe does not know,
    #: a creator's own type), or the look itself failed. It is pinged after idle.
    UNSEEN = "unseen"


class Driver:
    """What dropsafe needs to know about one DBAPI driver; subclasses fill it in."""

    name: ClassVar[str]

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[Any], cparams: dict[str, Any]
    ) -> set[str]:
        """Add dropsafe's connect arguments where the user set none; return the keys added."""
        del policy, cargs, cparams
        return set()

    def socket_for_options(self, dbapi_connection: Any) -> socket.socket | None:  # noqa: ANN401 - DBAPI connections are untyped
        """Return the socket dropsafe must set TCP options on itself, after connecting.

        None where the connect arguments already set them (libpq takes keepalives and
        ``tcp_user_timeout`` as parameters), or where there is no socket to tune.
        """
        del dbapi_connection
        return None

    def after_connect(self, dbapi_connection: Any, added: set[str]) -> None:  # noqa: ANN401
        """Undo what a connect argument dropsafe ``added`` would do beyond the connect."""
        del dbapi_connection, added

    def owns(self, dbapi_connection: Any) -> bool:  # noqa: ANN401
        """Whether ``dbapi_connection`` is this driver's own, that `probe` can look into."""
        del dbapi_connection
        return False

    def native(self, dbapi_connection: Any) -> Any:  # noqa: ANN401
        """Return this driver's own connection inside ``dbapi_connection``, or None if unknown.

        Known wrappers (the AWS Advanced Python Wrapper's ``target_connection``,
        ``__wrapped__`` proxies) are looked through, at most three deep: the search runs at
        every checkout.
        """
        candidate = dbapi_connection
        for _ in range(_UNWRAP_DEPTH + 1):
            if candidate is None:
                return None
            if self.owns(candidate):
                return candidate
            candidate = _unwrap_once(candidate)
        return None

    def socket_fd(self, dbapi_connection: Any) -> int | None:  # noqa: ANN401
        """Return the file descriptor of the socket of a connection that `owns` accepts."""
        raise NotImplementedError

    def probe(self, dbapi_connection: Any) -> Health:  # noqa: ANN401
        """Look at an idle connection without a round trip (only one that `owns` accepts)."""
        raise NotImplementedError

    def prober(self, dbapi_connection: Any) -> Callable[[], Health]:  # noqa: ANN401
        """Return `probe` for one connection, with what can be found once already found.

        Made once per connection (the checkout check keeps it), called at each checkout.
        """
        return functools.partial(self.probe, dbapi_connection)

    def server_of(self, dbapi_connection: Any) -> Server | None:  # noqa: ANN401
        """Return the host and port a new connection reached (None on a Unix socket)."""
        del dbapi_connection
        return None

    def in_hot_standby(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        """Whether the server is in recovery (a standby), as it last reported; None if unknown.

        PostgreSQL 14+ reports ``in_hot_standby`` to every client at connect and whenever it
        changes (a promotion), so this costs no round trip.
        """
        value = self._reported_parameter(dbapi_connection, "in_hot_standby")
        return None if value is None else value == "on"

    def _reported_parameter(self, dbapi_connection: Any, name: str) -> str | None:  # noqa: ANN401
        """Return a parameter the server reported (ParameterStatus), if the driver keeps it."""
        del dbapi_connection, name
        return None

    def reported_parameter(self, dbapi_connection: Any, name: str) -> str | None:  # noqa: ANN401
        """Return a parameter the server last reported, also on a connection found lost.

        The first-statement replay compares a lost connection's with a fresh one's
        (`dropsafe._engine.session_state`). Raises where the driver cannot say.
        """
        return self._reported_parameter(dbapi_connection, name)

    def transaction_characteristics(self, dbapi_connection: Any) -> tuple[object, ...] | None:  # noqa: ANN401
        """Return what the driver begins transactions with: isolation, read only, deferrable, ....

        Set on the driver's connection, they last for its life and no statement shows them;
        readable without a round trip, also on a connection found lost. None where unknown.
        """
        del dbapi_connection
        return None

    def hosts(self, cparams: dict[str, Any]) -> list[tuple[str, str]]:
        """Return the (host, port) pairs of a multi-host target; empty for a single host."""
        del cparams
        return []

    def set_hosts(self, cparams: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
        """Write ``pairs`` back as the multi-host target, in the form the driver takes."""
        del cparams, pairs

    def ping(self, dialect: Dialect, dbapi_connection: Any, timeout: float) -> None:  # noqa: ANN401
        """Make one round trip, bounded by ``timeout``; raise if it fails."""
        raise NotImplementedError

    def transaction_idle(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        """Whether no transaction is open on the connection, as the driver knows it locally.

        False once anything (the app's own cursor, a COPY, a listener) began one; None when
        the driver does not say. Read without a round trip: the first-statement replay asks
        it before it sends, since a statement sent into an open transaction is not its first.
        """
        del dbapi_connection
        return None

    def gone(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        """Whether the driver has found the connection lost (closed under it); None if unknown.

        Read after an error: a SQLSTATE of class 08 is also what a server answers on a healthy
        connection (dblink, postgres_fdw failing to reach their remote), so only this tells a
        lost connection from a reply.
        """
        del dbapi_connection
        return None


class _Libpq(Driver):
    """psycopg2 and psycopg 3: libpq connection parameters, socket polled by file descriptor."""

    def server_of(self, dbapi_connection: Any) -> Server | None:  # noqa: ANN401
        info = getattr(dbapi_connection, "_connection", dbapi_connection).info
        host, port = info.host, info.port
        return None if not host or host.startswith("/") else Server(str(host), int(port))

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[Any], cparams: dict[str, Any]
    ) -> set[str]:
        texts = [text for text in [*cargs, cparams.get("dsn"), cparams.get("conninfo")] if text]
        in_dsn = {
            match.group(1)
            for text in texts
            if isinstance(text, str)
            for match in _DSN_KEY.finditer(text)
        }
        # What libpq takes from the environment or a service file is the user's too.
        in_dsn |= _libpq_keys_set_outside(cparams, [t for t in texts if isinstance(t, str)])
        wanted: dict[str, int] = {
            # libpq rounds connect_timeout down and treats 1 as 2.
            "connect_timeout": max(2, math.ceil(seconds(policy.connect_timeout))),
        }
        if policy.keepalive_idle is not None:
            wanted |= {
                "keepalives": 1,
                "keepalives_idle": math.ceil(seconds(policy.keepalive_idle)),
                "keepalives_interval": math.ceil(seconds(policy.keepalive_interval)),
                "keepalives_count": policy.keepalive_count,
            }
        if policy.tcp_user_timeout is not None:
            wanted["tcp_user_timeout"] = math.ceil(seconds(policy.tcp_user_timeout) * 1000)
        added = set()
        for key, value in wanted.items():
            if key not in cparams and key not in in_dsn:
                cparams[key] = value
                added.add(key)
        return added

    def after_connect(self, dbapi_connection: Any, added: set[str]) -> None:  # noqa: ANN401
        del added
        # libpq sets TCP_USER_TIMEOUT only when keepalives are on: with the user's keepalives=0
        # the tcp_user_timeout asked for (dropsafe's or the user's) is silently not applied,
        # and a request on a dead link waits out TCP's retransmissions (about 15 minutes).
        # Whatever the connection's parameters ask for, its socket gets.
        connection = getattr(dbapi_connection, "_connection", dbapi_connection)
        if hasattr(connection, "get_dsn_parameters"):  # psycopg2
            wanted = connection.get_dsn_parameters().get("tcp_user_timeout")
        else:  # psycopg 3
            wanted = connection.info.get_parameters().get("tcp_user_timeout")
        if not wanted or not str(wanted).isdigit() or int(wanted) == 0:
            return
        fd = socket_fd_of(self, dbapi_connection)
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if fd is None or option is None:
            return
        # A socket object on libpq's own fd, detached (never closed) when done.
        sock = _borrow_socket(fd)
        if sock is None:
            return
        try:
            if sock.getsockopt(socket.IPPROTO_TCP, option) == 0:
                sock.setsockopt(socket.IPPROTO_TCP, option, int(wanted))
        except OSError:  # a Unix socket: no TCP options
            return
        finally:
            sock.detach()

    def _reported_parameter(self, dbapi_connection: Any, name: str) -> str | None:  # noqa: ANN401
        connection = getattr(dbapi_connection, "_connection", dbapi_connection)
        if hasattr(connection, "get_parameter_status"):  # psycopg2
            value = connection.get_parameter_status(name)
        else:  # psycopg 3
            value = connection.info.parameter_status(name)
        return value if isinstance(value, str) else None

    def socket_fd(self, dbapi_connection: Any) -> int | None:  # noqa: ANN401
        # psycopg's async connection sits in SQLAlchemy's adapter; both drivers say fileno().
        return int(getattr(dbapi_connection, "_connection", dbapi_connection).fileno())

    def probe(self, dbapi_connection: Any) -> Health:  # noqa: ANN401
        connection = getattr(dbapi_connection, "_connection", dbapi_connection)
        if connection.closed or getattr(connection, "broken", False):
            return Health.CLOSED
        return _poll(connection)

    def prober(self, dbapi_connection: Any) -> Callable[[], Health]:  # noqa: ANN401
        connection = getattr(dbapi_connection, "_connection", dbapi_connection)
        has_broken = hasattr(connection, "broken")  # psycopg 3's; psycopg2 says closed = 2
        poll = _SocketPoll(connection)

        def probe() -> Health:
            if connection.closed or (has_broken and connection.broken):
                return Health.CLOSED
            return poll()

        return probe

    def ping(self, dialect: Dialect, dbapi_connection: Any, timeout: float) -> None:  # noqa: ANN401
        # libpq has no per-call timeout, and tcp_user_timeout never fires while the server's
        # kernel still acknowledges (a stopped or hung backend): only the client can end the
        # wait. A cancel request would wait on that same hung backend, so the socket is shut
        # down instead; the connection is then broken and the pool replaces it.
        fd = socket_fd_of(self, dbapi_connection)
        with shut_down_at(fd, time.monotonic() + timeout) as deadline:
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:
                if deadline.expired:
                    raise TimeoutError(f"no answer to the ping within {timeout:g}s") from exc
                raise
        if deadline.expired:  # answered as the deadline struck: the socket is shut down anyway
            raise TimeoutError(f"no answer to the ping within {timeout:g}s")

    def hosts(self, cparams: dict[str, Any]) -> list[tuple[str, str]]:
        hosts = str(cparams.get("host", "")).split(",")
        if len(hosts) < 2:  # noqa: PLR2004 - one host: nothing to reorder
            return []
        ports = str(cparams.get("port", "")).split(",")
        ports = ports * len(hosts) if len(ports) == 1 else ports
        return list(zip(hosts, ports, strict=False))

    def set_hosts(self, cparams: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
        cparams["host"] = ",".join(host for host, _ in pairs)
        cparams["port"] = ",".join(port for _, port in pairs)


class _Psycopg2(_Libpq):
    name = "psycopg2"

    def owns(self, dbapi_connection: Any) -> bool:  # noqa: ANN401
        return _is_instance(dbapi_connection, "psycopg2.extensions", "connection")

    def transaction_idle(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        # libpq's PQTRANS_IDLE, psycopg2.extensions.TRANSACTION_STATUS_IDLE: a constant of the
        # protocol, read without importing psycopg2 here (this runs at every first statement).
        return bool(dbapi_connection.get_transaction_status() == _PQTRANS_IDLE)

    def gone(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        # 0 open; 1 closed by the app; 2 found broken by libpq.
        return bool(dbapi_connection.closed)

    def reported_parameter(self, dbapi_connection: Any, name: str) -> str | None:  # noqa: ANN401
        # get_parameter_status() refuses a connection libpq found broken; info still answers.
        value = dbapi_connection.info.parameter_status(name)
        return value if isinstance(value, str) else None

    def transaction_characteristics(self, dbapi_connection: Any) -> tuple[object, ...] | None:  # noqa: ANN401
        # set_session() and these attributes make the BEGIN psycopg2 sends.
        connection = dbapi_connection
        return (
            connection.isolation_level,
            connection.readonly,
            connection.deferrable,
            connection.autocommit,
        )


class _Psycopg(_Libpq):
    name = "psycopg"

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[Any], cparams: dict[str, Any]
    ) -> set[str]:
        added = super().connect_defaults(policy, cargs, cparams)
        # psycopg 3 prepares a statement run 5 times on a connection, under a name (_pg3_0...)
        # that the next transaction's server connection may not have, or have from another
        # client: behind a transaction-mode pooler it must never prepare.
        if policy.pooler == "transaction" and "prepare_threshold" not in cparams:
            cparams["prepare_threshold"] = None
            added.add("prepare_threshold")
        return added

    def owns(self, dbapi_connection: Any) -> bool:  # noqa: ANN401
        if isinstance(dbapi_connection, AdaptedConnection):  # psycopg_async
            dbapi_connection = dbapi_connection.driver_connection
        return _is_instance(dbapi_connection, "psycopg", "BaseConnection")

    def transaction_idle(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        # psycopg_async's adapter opens no transaction of its own: the driver's status is all.
        native = _driver_connection(dbapi_connection)
        status = getattr(sys.modules.get("psycopg.pq"), "TransactionStatus", None)
        idle = getattr(status, "IDLE", None)
        if idle is None:
            return None
        return bool(native.info.transaction_status == idle)

    def gone(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        native = _driver_connection(dbapi_connection)
        return bool(native.closed or native.broken)

    def transaction_characteristics(self, dbapi_connection: Any) -> tuple[object, ...] | None:  # noqa: ANN401
        # The attributes (set_* awaited on an async connection) that make psycopg's BEGIN.
        native = _driver_connection(dbapi_connection)
        return (native.isolation_level, native.read_only, native.deferrable, native.autocommit)


class _Asyncpg(Driver):
    """asyncpg: the protocol's closed state, and the socket for what the loop has not read yet."""

    name = "asyncpg"

    def owns(self, dbapi_connection: Any) -> bool:  # noqa: ANN401
        return isinstance(dbapi_connection, AdaptedConnection) and _is_instance(
            dbapi_connection.driver_connection, "asyncpg", "Connection"
        )

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[Any], cparams: dict[str, Any]
    ) -> set[str]:
        del cargs
        # One budget for all hosts in turn (libpq gives each host its own): a vanished first
        # host eats it all, so after a failed attempt the guard starts from the next host.
        added = _timeout_argument(cparams, policy)
        if policy.pooler == "transaction":
            added |= _no_lasting_statements(cparams)
        return added

    def socket_for_options(self, dbapi_connection: Any) -> socket.socket | None:  # noqa: ANN401
        return dbapi_connection._connection._transport.get_extra_info("socket")  # type: ignore[no-any-return]  # noqa: SLF001

    def socket_fd(self, dbapi_connection: Any) -> int | None:  # noqa: ANN401
        sock = dbapi_connection._connection._transport.get_extra_info("socket")  # noqa: SLF001
        return None if sock is None else int(sock.fileno())

    def server_of(self, dbapi_connection: Any) -> Server | None:  # noqa: ANN401
        address = dbapi_connection._connection._addr  # noqa: SLF001
        return Server(str(address[0]), int(address[1])) if isinstance(address, tuple) else None

    def _reported_parameter(self, dbapi_connection: Any, name: str) -> str | None:  # noqa: ANN401
        settings = dbapi_connection._connection.get_settings()  # noqa: SLF001
        value = getattr(settings, name, None)
        return value if isinstance(value, str) else None

    def hosts(self, cparams: dict[str, Any]) -> list[tuple[str, str]]:
        hosts, ports = cparams.get("host"), cparams.get("port")
        if not isinstance(hosts, list) or not isinstance(ports, list):
            return []
        return [(str(host), str(port)) for host, port in zip(hosts, ports, strict=False)]

    def set_hosts(self, cparams: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
        cparams["host"] = [host for host, _ in pairs]
        cparams["port"] = [int(port) for _, port in pairs]

    def transaction_idle(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        # SQLAlchemy's adapter sends its BEGIN itself, lazily, at the first statement it is
        # given, and keeps its asyncpg Transaction (private: ``_transaction`` in SQLAlchemy
        # 2.1, a ``_started`` flag in 2.0; a SQLAlchemy with neither gets no replay). The
        # app's own work on the asyncpg connection shows in is_in_transaction().
        if hasattr(dbapi_connection, "_transaction"):
            started = dbapi_connection._transaction is not None  # noqa: SLF001
        elif isinstance(getattr(dbapi_connection, "_started", None), bool):
            started = dbapi_connection._started  # noqa: SLF001
        else:
            return None
        return not started and not dbapi_connection.driver_connection.is_in_transaction()

    def gone(self, dbapi_connection: Any) -> bool | None:  # noqa: ANN401
        return bool(dbapi_connection.driver_connection.is_closed())

    def transaction_characteristics(self, dbapi_connection: Any) -> tuple[object, ...] | None:  # noqa: ANN401
        # SQLAlchemy's adapter makes asyncpg's transaction(isolation=, readonly=, deferrable=)
        # from these (its isolation "autocommit" is the autocommit flag); an adapter without
        # them is one dropsafe does not know.
        names = ("isolation_level", "readonly", "deferrable")
        if not all(hasattr(dbapi_connection, name) for name in names):
            return None
        return tuple(getattr(dbapi_connection, name) for name in names)

    def probe(self, dbapi_connection: Any) -> Health:  # noqa: ANN401
        connection = dbapi_connection._connection  # noqa: SLF001
        if connection.is_closed():
            return Health.CLOSED
        # The event loop may not have run since the peer hung up: look at the socket too.
        sock = connection._transport.get_extra_info("socket")  # noqa: SLF001
        return Health.QUIET if sock is None else _poll(sock)

    def prober(self, dbapi_connection: Any) -> Callable[[], Health]:  # noqa: ANN401
        connection = dbapi_connection._connection  # noqa: SLF001
        sock = connection._transport.get_extra_info("socket")  # noqa: SLF001
        poll = None if sock is None else _SocketPoll(sock)

        def probe() -> Health:
            if connection.is_closed():
                return Health.CLOSED
            # The event loop may not have run since the peer hung up: look at the socket too.
            return Health.QUIET if poll is None else poll()

        return probe

    def ping(self, dialect: Dialect, dbapi_connection: Any, timeout: float) -> None:  # noqa: ANN401
        del dialect
        connection = dbapi_connection._connection  # noqa: SLF001
        # execute() without arguments uses the simple query protocol: one round trip, and no
        # prepared statement for a transaction-mode pooler to lose.
        try:
            _await(asyncio.wait_for(connection.execute("SELECT 1"), timeout))
        except BaseException:
            # The pool replaces it; closing it politely would wait on the hung server again
            # (SQLAlchemy gives a graceful close 2 s), so abort it now.
            connection.terminate()
            raise


class _Pg8000(Driver):
    """pg8000: a plain blocking socket, polled by file descriptor and bounded by its timeout."""

    name = "pg8000"

    def owns(self, dbapi_connection: Any) -> bool:  # noqa: ANN401
        return _is_instance(dbapi_connection, "pg8000.core", "CoreConnection")

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[Any], cparams: dict[str, Any]
    ) -> set[str]:
        del cargs
        # pg8000's timeout also bounds every later read: on_connect lifts it after connecting.
        return _timeout_argument(cparams, policy)

    def socket_for_options(self, dbapi_connection: Any) -> socket.socket | None:  # noqa: ANN401
        return dbapi_connection._usock  # type: ignore[no-any-return]  # noqa: SLF001

    def after_connect(self, dbapi_connection: Any, added: set[str]) -> None:  # noqa: ANN401
        # The connect timeout dropsafe gave would otherwise bound every later read too.
        if "timeout" in added:
            dbapi_connection._usock.settimeout(None)  # noqa: SLF001

    def socket_fd(self, dbapi_connection: Any) -> int | None:  # noqa: ANN401
        return int(dbapi_connection._usock.fileno())  # noqa: SLF001

    def _reported_parameter(self, dbapi_connection: Any, name: str) -> str | None:  # noqa: ANN401
        value = getattr(dbapi_connection, "parameter_statuses", {}).get(name)
        return value if isinstance(value, str) else None

    def probe(self, dbapi_connection: Any) -> Health:  # noqa: ANN401
        sock = getattr(dbapi_connection, "_usock", None)
        return Health.CLOSED if sock is None else _poll(sock)

    def ping(self, dialect: Dialect, dbapi_connection: Any, timeout: float) -> None:  # noqa: ANN401
        sock = dbapi_connection._usock  # noqa: SLF001
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            dialect.do_ping(dbapi_connection)
            dbapi_connection.rollback()  # pg8000 began a transaction for the ping
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)


_DRIVERS: dict[str, type[Driver]] = {
    "psycopg2": _Psycopg2,
    "psycopg": _Psycopg,
    "psycopg_async": _Psycopg,
    "asyncpg": _Asyncpg,
    "pg8000": _Pg8000,
}
SUPPORTED_DRIVERS = ("psycopg2", "psycopg", "asyncpg", "pg8000")
#: For error messages: what a URL may start with.
SUPPORTED = ", ".join(f"postgresql+{name}" for name in SUPPORTED_DRIVERS)


def is_supported(driver_name: str) -> bool:
    """Whether dropsafe knows SQLAlchemy's driver ``driver_name`` (psycopg_async included)."""
    return driver_name in _DRIVERS


def driver_for(dialect: Dialect) -> Driver:
    """Return the `Driver` for an engine's dialect; raise `ConfigurationError` if unsupported."""
    if dialect.name != "postgresql":
        raise ConfigurationError(
            f"dropsafe guards PostgreSQL engines only, not {dialect.name!r}; supported: {SUPPORTED}"
        )
    driver = _DRIVERS.get(str(dialect.driver))
    if driver is None:
        raise ConfigurationError(f"unsupported driver {dialect.driver!r}; supported: {SUPPORTED}")
    return driver()


_EVERY_DRIVER = tuple(driver() for driver in dict.fromkeys(_DRIVERS.values()))


def socket_fd(dbapi_connection: Any) -> int | None:  # noqa: ANN401 - DBAPI connections are untyped
    """Return the file descriptor of any supported driver's connection (or of one it wraps).

    For code that holds a DBAPI connection but not its engine; None if no driver knows it or
    it has no socket (closed).
    """
    # A driver's own connection first (what SQLAlchemy hands out unless a creator= wraps it):
    # this runs at every bounded statement, and looking through wrappers costs more.
    for driver in _EVERY_DRIVER:
        if driver.owns(dbapi_connection):
            return socket_fd_of(driver, dbapi_connection)
    for driver in _EVERY_DRIVER:
        native = driver.native(dbapi_connection)
        if native is not None:
            return socket_fd_of(driver, native)
    return None


def bytes_sent(driver: Driver, native: Any) -> int | None:  # noqa: ANN401 - DBAPI connections are untyped
    """Return the data bytes written so far to the connection's TCP socket; None if unknown.

    Sent, or queued in the kernel and not sent yet; retransmissions are not counted: the
    number grows only when the client writes something.
    The first-statement replay compares it at checkout and before the first statement: a
    driver's connection used around SQLAlchemy in between (a session SET committed there)
    leaves no other trace a client can read without a round trip. One getsockopt, from the
    kernel (TCP_INFO); None on a Unix socket, on a kernel before 4.19, or without a socket.
    """
    fd = socket_fd_of(driver, native)
    return None if fd is None else tcp_bytes_sent(fd)


def _borrow_socket(fd: int) -> socket.socket | None:
    """Return a socket object on a driver's fd, to be detached, never closed; None if closed.

    The fd may be closed already (a driver that found its connection lost) or -1 (asyncpg's
    closed transport): Python refuses both when the object is made (EBADF, ValueError).
    """
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except (OSError, ValueError):
        return None


def tcp_bytes_sent(fd: int) -> int | None:
    """`bytes_sent` of the socket with file descriptor ``fd`` (the driver's, left open)."""
    if _TCP_INFO is None:
        return None
    # A socket object on the driver's own fd, detached (never closed) when done: no dup(2) and
    # close(2) around the one getsockopt, which runs twice per checkout that sends a statement.
    sock = _borrow_socket(fd)
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)
    except OSError:  # not TCP (a Unix socket)
        return None
    finally:
        sock.detach()
    if len(info) < _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size:
        return None
    sent, retransmitted = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_AT)
    (queued,) = _TCP_INFO_NOTSENT.unpack_from(info, _TCP_INFO_NOTSENT_AT)
    return int(sent - retransmitted + queued)


def socket_fd_of(driver: Driver, native: Any) -> int | None:  # noqa: ANN401
    """Return the fd of the socket of a connection ``driver`` owns, or None (closed, unknown)."""
    try:
        return driver.socket_fd(native)
    except Exception:  # noqa: BLE001 - a closed connection may not say its socket
        return None


def _libpq_keys_set_outside(cparams: dict[str, Any], dsn_texts: list[str]) -> set[str]:
    """Return dropsafe's libpq keys that the environment or the chosen service file sets."""
    found = {key for key, variable in _LIBPQ_ENVIRONMENT.items() if variable in os.environ}
    service = cparams.get("service") or next(
        (match.group(1) for text in dsn_texts if (match := _DSN_SERVICE.search(text))), None
    )
    service = service or os.environ.get("PGSERVICE")
    if service:
        found |= set(_service_keys(str(service))) & set(_LIBPQ_KEYS)
    return found


def _service_keys(service: str) -> list[str]:
    """Return the keys a libpq service file sets for ``service`` (libpq's search order).

    The user's file (PGSERVICEFILE, else ~/.pg_service.conf) first; the system file
    (PGSYSCONFDIR/pg_service.conf) only when the service is not in the user's.
    """
    user_file = os.environ.get("PGSERVICEFILE")
    candidates = [Path(user_file) if user_file else Path("~/.pg_service.conf").expanduser()]
    if "PGSYSCONFDIR" in os.environ:
        candidates.append(Path(os.environ["PGSYSCONFDIR"]) / "pg_service.conf")
    for path in candidates:
        keys = _read_service(path, service)
        if keys is not None:
            return keys
    return []


def _read_service(path: Path, service: str) -> list[str] | None:
    """Return the keys of ``[service]`` in the file at ``path``; None if it is not there."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    keys: list[str] | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if keys is not None:
                break  # the section ended
            if line.rstrip("]")[1:].strip() == service:
                keys = []
            continue
        if keys is not None and "=" in line:
            keys.append(line.partition("=")[0].strip())
    return keys


def _timeout_argument(cparams: dict[str, Any], policy: ConnectionPolicy) -> set[str]:
    """Set the driver's ``timeout`` argument to the connect timeout, unless the user set it."""
    if "timeout" in cparams:
        return set()
    cparams["timeout"] = seconds(policy.connect_timeout)
    return {"timeout"}


def _no_lasting_statements(cparams: dict[str, Any]) -> set[str]:
    """Keep asyncpg's prepared statements inside one transaction, under names no one else has.

    Behind a transaction-mode pooler each transaction may run on another server connection,
    shared with other clients. asyncpg names statements ``__asyncpg_stmt_N__``, counting per
    client connection, and keeps them for reuse: two clients then collide on one server
    connection ("already exists"), and a kept statement is missing on the next one ("does not
    exist"). So: no statement cache in asyncpg (its own queries go unnamed), none in
    SQLAlchemy's adapter, and a unique name for each statement SQLAlchemy prepares (it prepares
    inside the transaction that runs it). What the user set wins.
    """
    wanted: dict[str, object] = {
        "statement_cache_size": 0,  # asyncpg's cache
        "prepared_statement_cache_size": 0,  # SQLAlchemy's adapter's cache
        "prepared_statement_name_func": _unique_statement_name,
    }
    added = set()
    for key, value in wanted.items():
        if key not in cparams:
            cparams[key] = value
            added.add(key)
    return added


def _unique_statement_name() -> str:
    return f"__dropsafe_{uuid.uuid4().hex}__"


def _is_instance(candidate: object, module: str, name: str) -> bool:
    """``isinstance(candidate, module.name)`` if the driver is imported (if not, it cannot be)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(candidate, cls)


def _poll(source: Any) -> Health:  # noqa: ANN401 - anything with fileno()
    """Poll ``source``'s socket with a zero timeout; one that cannot be polled is dead."""
    poller = _real_poll()
    try:
        poller.register(source.fileno(), _POLL_MASK)
        events = poller.poll(0)
    except Exception:  # noqa: BLE001 - a connection that cannot say its fd is not usable
        return Health.CLOSED
    return _health_of(events)


def _health_of(events: list[tuple[int, int]]) -> Health:
    """Read a zero-timeout poll's answer for one socket."""
    if not events:
        return Health.QUIET
    revents = events[0][1]
    if revents & (_POLL_DEAD | select.POLLNVAL):
        return Health.CLOSED
    return Health.DATA_WAITING


class _SocketPoll:
    """`_poll` for one connection's socket, its poll object made once (asked at each checkout).

    The descriptor is asked of the connection at each look, never remembered: a connection
    that lost its socket says so there (or raises), and a number the kernel gave to another
    socket since would be looked at otherwise.
    """

    __slots__ = ("_fd", "_poller", "_source")

    def __init__(self, source: Any) -> None:  # noqa: ANN401 - anything with fileno()
        self._source = source
        self._poller = _real_poll()
        self._fd = -1

    def __call__(self) -> Health:
        try:
            fd = self._source.fileno()
            if fd != self._fd:
                if self._fd >= 0:
                    self._poller.unregister(self._fd)
                    self._fd = -1
                self._poller.register(fd, _POLL_MASK)
                self._fd = fd
            events = self._poller.poll(0)
        except Exception:  # noqa: BLE001 - a connection that cannot say its fd is not usable
            return Health.CLOSED
        return _health_of(events)


def _driver_connection(connection: Any) -> Any:  # noqa: ANN401 - DBAPI connections are untyped
    """Return the driver's connection inside SQLAlchemy's async adapter, or ``connection``."""
    if isinstance(connection, AdaptedConnection):
        return connection.driver_connection
    return connection


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
