"""psycopg 3: libpq underneath (libpq.py), sync and asyncio faces, no prepare behind a pooler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import AdaptedConnection

from dropsafe._classify import DriverErrors, ErrorKind
from dropsafe._drivers import (
    libpq,
    psycopg_async_rollback,
    psycopg_first_flight,
    psycopg_rollback,
)
from dropsafe._drivers.base import (
    Capabilities,
    DBAPIConnection,
    DeferredRollback,
    Tls,
    XidReading,
    driver_connection,
    is_instance,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._drivers.base import ConnectArgs, XidQuestion
    from dropsafe._policy import ConnectionPolicy

__all__ = ["Psycopg"]


_PQTRANS_IDLE = 0  # libpq's PGTransactionStatusType: PQTRANS_IDLE (psycopg.pq.TransactionStatus)


def _sqlstate(error: BaseException) -> object:
    return getattr(error, "sqlstate", None)


class Psycopg(libpq.Libpq):
    """psycopg 3, sync (``postgresql+psycopg``) and asyncio (SQLAlchemy's ``psycopg_async``)."""

    name = "psycopg"
    dialect_drivers = ("psycopg", "psycopg_async")
    asyncio = True
    extra = "psycopg"
    errors = DriverErrors(
        package="psycopg",
        sqlstate=_sqlstate,
        severity=libpq.diag_severity,
        client_errors={"ConnectionTimeout": ErrorKind.FAILOVER},  # connect_timeout expired
        disconnect_messages=(
            *libpq.DISCONNECT_MESSAGES,
            "the connection is lost",
            "consuming input failed",
        ),
        failover_messages=libpq.FAILOVER_MESSAGES,
    )
    # libpq 14's pipeline mode; the xid read in a statement's flight (psycopg_first_flight).
    capabilities = Capabilities(pipelines=True, reads_xid_in_flight=True)
    # A ROLLBACK sent beneath psycopg, its reply read before the connection's next use.
    deferred_rollback = DeferredRollback(psycopg_rollback.send_rollback, psycopg_rollback.settle)
    async_deferred_rollback = DeferredRollback(
        psycopg_async_rollback.send_rollback, psycopg_async_rollback.settle
    )
    tls = Tls(url_parameters={"sslmode": "require"}, off_url_parameters={"sslmode": "disable"})

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[object], cparams: ConnectArgs
    ) -> set[str]:
        added = super().connect_defaults(policy, cargs, cparams)
        # psycopg 3 prepares a statement run 5 times on a connection, under a name (_pg3_0...)
        # that the next transaction's server connection may not have, or have from another
        # client: behind a transaction-mode pooler it must never prepare.
        if policy.pooler == "transaction" and "prepare_threshold" not in cparams:
            cparams["prepare_threshold"] = None
            added.add("prepare_threshold")
        return added

    def begin_in_first_flight(self, dbapi_connection: DBAPIConnection) -> bool:
        # BEGIN sent in a pipeline with the transaction's first statement: one flight, not two.
        return psycopg_first_flight.install(driver_connection(dbapi_connection))

    def send_reading_xid(
        self,
        send: Callable[[str], None],
        dbapi_connection: DBAPIConnection,
        statement: str,
        question: XidQuestion,
    ) -> XidReading | None:
        # ``question.after`` in the statement's pipeline, before its one Sync: no flight more.
        native = driver_connection(dbapi_connection)
        values = psycopg_first_flight.send_reading_xid(send, native, statement, question.after)
        return None if values is None else XidReading(values, assigned=False)

    def backend_pid(self, dbapi_connection: DBAPIConnection) -> int | None:
        pgconn: Any = getattr(driver_connection(dbapi_connection), "pgconn", None)
        pid = getattr(pgconn, "backend_pid", 0)
        return pid if isinstance(pid, int) and pid > 0 else None

    def owns(self, dbapi_connection: DBAPIConnection) -> bool:
        if isinstance(dbapi_connection, AdaptedConnection):  # psycopg_async
            dbapi_connection = dbapi_connection.driver_connection
        return is_instance(dbapi_connection, "psycopg", "BaseConnection")

    def transaction_idle(self, dbapi_connection: DBAPIConnection) -> bool | None:
        # psycopg_async's adapter opens no transaction of its own: the driver's status is all.
        # Read from the documented ``pgconn`` (libpq's PQtransactionStatus, an int): ``info``'s
        # property makes a TransactionStatus enum of it, a Python call at every first statement.
        native = driver_connection(dbapi_connection)
        return bool(native.pgconn.transaction_status == _PQTRANS_IDLE)

    def gone(self, dbapi_connection: DBAPIConnection) -> bool | None:
        native = driver_connection(dbapi_connection)
        return bool(native.closed or native.broken)

    def last_error_text(self, dbapi_connection: DBAPIConnection) -> str:
        # libpq's whole message, kept after the connection closed: a later operation raises
        # only "the connection is lost", without the server's FATAL that ended it.
        text = getattr(driver_connection(dbapi_connection).info, "error_message", "")
        return text if isinstance(text, str) else ""

    def transaction_characteristics(
        self, dbapi_connection: DBAPIConnection
    ) -> tuple[object, ...] | None:
        # The attributes (set_* awaited on an async connection) that make psycopg's BEGIN.
        native = driver_connection(dbapi_connection)
        return (native.isolation_level, native.read_only, native.deferrable, native.autocommit)
