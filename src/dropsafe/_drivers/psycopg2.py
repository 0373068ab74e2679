"""psycopg2: libpq underneath (libpq.py), its errors' ``pgcode``, its transaction flags."""

from __future__ import annotations

from dropsafe._classify import DriverErrors
from dropsafe._drivers import libpq
from dropsafe._drivers.base import DBAPIConnection, Tls, is_instance

__all__ = ["Psycopg2"]

_PQTRANS_IDLE = 0  # libpq's PGTransactionStatusType: PQTRANS_IDLE


def _pgcode(error: BaseException) -> object:
    return getattr(error, "pgcode", None)


class Psycopg2(libpq.Libpq):
    """psycopg2, sync only."""

    name = "psycopg2"
    dialect_drivers = ("psycopg2",)
    extra = "psycopg2"
    errors = DriverErrors(
        package="psycopg2",
        sqlstate=_pgcode,
        severity=libpq.diag_severity,
        disconnect_messages=(*libpq.DISCONNECT_MESSAGES, "connection already closed"),
        failover_messages=libpq.FAILOVER_MESSAGES,
    )
    tls = Tls(url_parameters={"sslmode": "require"}, off_url_parameters={"sslmode": "disable"})

    def owns(self, dbapi_connection: DBAPIConnection) -> bool:
        return is_instance(dbapi_connection, "psycopg2.extensions", "connection")

    def transaction_idle(self, dbapi_connection: DBAPIConnection) -> bool | None:
        # libpq's PQTRANS_IDLE, psycopg2.extensions.TRANSACTION_STATUS_IDLE: a constant of the
        # protocol, read without importing psycopg2 here (this runs at every first statement).
        return bool(dbapi_connection.get_transaction_status() == _PQTRANS_IDLE)

    def gone(self, dbapi_connection: DBAPIConnection) -> bool | None:
        # 0 open; 1 closed by the app; 2 found broken by libpq.
        return bool(dbapi_connection.closed)

    def last_error_text(self, dbapi_connection: DBAPIConnection) -> str:
        # libpq's whole message (PQerrorMessage): psycopg2's exception keeps only its last line,
        # "SSL connection has been closed unexpectedly" after a pooler's FATAL goodbye.
        text = dbapi_connection.info.error_message
        return text if isinstance(text, str) else ""

    def reported_parameter(self, dbapi_connection: DBAPIConnection, name: str) -> str | None:
        # get_parameter_status() refuses a connection libpq found broken; info still answers.
        value = dbapi_connection.info.parameter_status(name)
        return value if isinstance(value, str) else None

    def transaction_characteristics(
        self, dbapi_connection: DBAPIConnection
    ) -> tuple[object, ...] | None:
        # set_session() and these attributes make the BEGIN psycopg2 sends.
        connection = dbapi_connection
        return (
            connection.isolation_level,
            connection.readonly,
            connection.deferrable,
            connection.autocommit,
        )
