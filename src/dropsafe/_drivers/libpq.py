"""What psycopg2 and psycopg 3 share: libpq's connect parameters, socket, hosts and messages.

The two drivers' own files (psycopg2.py, psycopg.py) hold only what differs between them.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dropsafe._drivers.base import DBAPIConnection, Driver, Health, Server
from dropsafe._drivers.sockets import SocketPoll, borrow_socket, poll, socket_fd_of
from dropsafe._policy import ConnectionPolicy, seconds
from dropsafe._socket_shutdown import shut_down_at

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect

    from dropsafe._drivers.base import ConnectArgs

__all__ = [
    "DISCONNECT_MESSAGES",
    "FAILOVER_MESSAGES",
    "LIBPQ_ENVIRONMENT",
    "LIBPQ_KEYS",
    "Libpq",
    "diag_severity",
]

#: The connect parameters dropsafe sets for libpq, where the user set none.
LIBPQ_KEYS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "connect_timeout",
)
#: The environment variables libpq reads for dropsafe's keys (PQconndefaults: only this one;
#: keepalives and tcp_user_timeout have none).
LIBPQ_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}
#: libpq's messages (either driver) for a lost connection, and for a server that is not
#: there or not the primary: read only where no SQLSTATE exists (`dropsafe._classify`).
DISCONNECT_MESSAGES = (
    "server closed the connection unexpectedly",
    "ssl syscall error",
    "ssl connection has been closed unexpectedly",
    "could not receive data from server",
    "could not send data to server",
    "lost synchronization with server",
)
FAILOVER_MESSAGES = (
    "session is read-only",  # target_session_attrs=read-write met a standby
    "could not connect to server",
    "timeout expired",  # connect_timeout
    "server does not support",  # target_session_attrs found no primary
)
_DSN_SERVICE = re.compile(r"(?:^|[\s?&])service\s*=\s*'?([^\s'&]+)")
_DSN_KEY = re.compile(r"(?:^|[\s?&])(" + "|".join(LIBPQ_KEYS) + r")\s*=")
_MULTI_HOST = 2


class Libpq(Driver):
    """psycopg2 and psycopg 3: libpq connection parameters, socket polled by file descriptor."""

    def server_of(self, dbapi_connection: DBAPIConnection) -> Server | None:
        info = _own(dbapi_connection).info
        host, port = info.host, info.port
        return None if not host or host.startswith("/") else Server(str(host), int(port))

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[object], cparams: ConnectArgs
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

    def after_connect(self, dbapi_connection: DBAPIConnection, added: set[str]) -> None:
        del added
        # libpq sets TCP_USER_TIMEOUT only when keepalives are on: with the user's keepalives=0
        # the tcp_user_timeout asked for (dropsafe's or the user's) is silently not applied,
        # and a request on a dead link waits out TCP's retransmissions (about 15 minutes).
        # Whatever the connection's parameters ask for, its socket gets.
        connection = _own(dbapi_connection)
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
        sock = borrow_socket(fd)
        if sock is None:
            return
        try:
            if sock.getsockopt(socket.IPPROTO_TCP, option) == 0:
                sock.setsockopt(socket.IPPROTO_TCP, option, int(wanted))
        except OSError:  # a Unix socket: no TCP options
            return
        finally:
            sock.detach()

    def _reported_parameter(self, dbapi_connection: DBAPIConnection, name: str) -> str | None:
        connection = _own(dbapi_connection)
        if hasattr(connection, "get_parameter_status"):  # psycopg2
            value = connection.get_parameter_status(name)
        else:  # psycopg 3
            value = connection.info.parameter_status(name)
        return value if isinstance(value, str) else None

    def socket_fd(self, dbapi_connection: DBAPIConnection) -> int | None:
        # psycopg's async connection sits in SQLAlchemy's adapter; both drivers say fileno().
        return int(_own(dbapi_connection).fileno())

    def fileno_reader(self, dbapi_connection: DBAPIConnection) -> Callable[[], int | None]:
        # The driver's own method (a C call on psycopg2; psycopg 3's raises once closed).
        fileno: Callable[[], int | None] = _own(dbapi_connection).fileno
        return fileno

    def probe(self, dbapi_connection: DBAPIConnection) -> Health:
        connection = _own(dbapi_connection)
        if connection.closed or getattr(connection, "broken", False):
            return Health.CLOSED
        return poll(connection)

    def prober(self, dbapi_connection: DBAPIConnection) -> Callable[[], Health]:
        connection = _own(dbapi_connection)
        # Its closed flag (and psycopg 3's broken; psycopg2 says closed = 2) read by the look
        # itself before its poll: no wrapper, a call fewer at every checkout.
        has_broken = hasattr(connection, "broken")
        return SocketPoll(connection, ("closed", "broken") if has_broken else ("closed",))

    def ping(self, dialect: Dialect, dbapi_connection: DBAPIConnection, timeout: float) -> None:
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

    def hosts(self, cparams: ConnectArgs) -> list[tuple[str, str]]:
        hosts = str(cparams.get("host", "")).split(",")
        if len(hosts) < _MULTI_HOST:
            return []
        ports = str(cparams.get("port", "")).split(",")
        ports = ports * len(hosts) if len(ports) == 1 else ports
        return list(zip(hosts, ports, strict=False))

    def set_hosts(self, cparams: ConnectArgs, pairs: list[tuple[str, str]]) -> None:
        cparams["host"] = ",".join(host for host, _ in pairs)
        cparams["port"] = ",".join(port for _, port in pairs)


def _own(dbapi_connection: DBAPIConnection) -> DBAPIConnection:
    """Return psycopg's connection inside SQLAlchemy's async adapter, or the connection itself."""
    return getattr(dbapi_connection, "_connection", dbapi_connection)


def _libpq_keys_set_outside(cparams: ConnectArgs, dsn_texts: list[str]) -> set[str]:
    """Return dropsafe's libpq keys that the environment or the chosen service file sets."""
    found = {key for key, variable in LIBPQ_ENVIRONMENT.items() if variable in os.environ}
    service = cparams.get("service") or next(
        (match.group(1) for text in dsn_texts if (match := _DSN_SERVICE.search(text))), None
    )
    service = service or os.environ.get("PGSERVICE")
    if service:
        found |= set(_service_keys(str(service))) & set(LIBPQ_KEYS)
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


def diag_severity(error: BaseException) -> object:
    """Return the server's untranslated severity of a psycopg2 or psycopg 3 error, if it has one."""
    return getattr(getattr(error, "diag", None), "severity_nonlocalized", None)
