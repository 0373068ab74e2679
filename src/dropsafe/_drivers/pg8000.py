"""pg8000: a plain blocking socket, polled by file descriptor and bounded by its timeout.

Its errors carry the server's fields as a dict in ``args[0]`` (C: SQLSTATE, V: severity).
"""

from __future__ import annotations

import contextlib
import ssl
from typing import TYPE_CHECKING

from dropsafe._classify import DriverErrors
from dropsafe._drivers.base import (
    Capabilities,
    DBAPIConnection,
    Driver,
    Health,
    Tls,
    is_instance,
    timeout_argument,
)
from dropsafe._drivers.sockets import poll

if TYPE_CHECKING:
    import socket

    from sqlalchemy.engine import Dialect

    from dropsafe._drivers.base import ConnectArgs
    from dropsafe._policy import ConnectionPolicy

__all__ = ["Pg8000"]


def _field(error: BaseException, code: str) -> object:
    fields = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    return fields.get(code)


def _socket(dbapi_connection: DBAPIConnection) -> socket.socket:
    sock: socket.socket = dbapi_connection._usock  # noqa: SLF001 - pg8000 keeps it private
    return sock


class Pg8000(Driver):
    """pg8000, sync only."""

    name = "pg8000"
    dialect_drivers = ("pg8000",)
    extra = "pg8000"
    errors = DriverErrors(
        package="pg8000",
        sqlstate=lambda error: _field(error, "C"),
        severity=lambda error: _field(error, "V"),
        disconnect_messages=("network error",),
    )
    # pg8000 reports a connection that timed out and one the server closed with the same bare
    # "network error", and a timed-out one must not be replayed.
    capabilities = Capabilities(replays_first_statement=False)
    tls = Tls(needs_ssl_context=True)

    def owns(self, dbapi_connection: DBAPIConnection) -> bool:
        return is_instance(dbapi_connection, "pg8000.core", "CoreConnection")

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[object], cparams: ConnectArgs
    ) -> set[str]:
        del cargs
        # pg8000's timeout also bounds every later read: on_connect lifts it after connecting.
        return timeout_argument(cparams, policy)

    def socket_for_options(self, dbapi_connection: DBAPIConnection) -> socket.socket | None:
        return _socket(dbapi_connection)

    def after_connect(self, dbapi_connection: DBAPIConnection, added: set[str]) -> None:
        # The connect timeout dropsafe gave would otherwise bound every later read too.
        if "timeout" in added:
            _socket(dbapi_connection).settimeout(None)

    def socket_fd(self, dbapi_connection: DBAPIConnection) -> int | None:
        return int(_socket(dbapi_connection).fileno())

    def _reported_parameter(self, dbapi_connection: DBAPIConnection, name: str) -> str | None:
        value = getattr(dbapi_connection, "parameter_statuses", {}).get(name)
        return value if isinstance(value, str) else None

    def probe(self, dbapi_connection: DBAPIConnection) -> Health:
        sock = getattr(dbapi_connection, "_usock", None)
        return Health.CLOSED if sock is None else poll(sock)

    def ping(self, dialect: Dialect, dbapi_connection: DBAPIConnection, timeout: float) -> None:
        sock = _socket(dbapi_connection)
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            dialect.do_ping(dbapi_connection)
            dbapi_connection.rollback()  # pg8000 began a transaction for the ping
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)

    def tls_connect_args(self, ca_file: str) -> dict[str, object]:
        # pg8000 takes TLS only as an ssl_context (no sslmode in its URL).
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = False
        return {"ssl_context": context}
