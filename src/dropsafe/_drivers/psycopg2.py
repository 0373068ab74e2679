"""psycopg2: libpq underneath (libpq.py), its errors' ``pgcode``, its transaction flags."""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING

from dropsafe._classify import DriverErrors
from dropsafe._drivers import libpq, psycopg2_first_flight, psycopg2_rollback
from dropsafe._drivers.base import (
    Capabilities,
    ConnectArgs,
    DBAPIConnection,
    DeferredRollback,
    Tls,
    XidQuestion,
    XidReading,
    is_instance,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Psycopg2"]

_PQTRANS_IDLE = 0  # libpq's PGTransactionStatusType: PQTRANS_IDLE

# The xid read rides the statement's own query string (simple protocol): psycopg2 returns the
# last statement's result only, so the read comes first and answers as a NOTICE. No ``%`` in it
# (psycopg2 formats the whole string when there are parameters); a line of its own, so that an
# error's context line ("LINE 2: ...") still shows the app's statement alone.
# The tag carries a token of this process's: a NOTICE of the app's (a trigger echoing a row's
# text, a user's) could otherwise spell the tag and hand the resolver an xid of its choosing.
_NOTICE_TAG = f"dropsafe-xid {secrets.token_hex(8)} "
_READ_FIRST = (
    "DO $dropsafe$BEGIN RAISE NOTICE USING MESSAGE = '" + _NOTICE_TAG + "' "
    "OPERATOR(pg_catalog.||) pg_catalog.json_build_array({columns})::pg_catalog.text; "
    "END$dropsafe$;\n"
)


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
    capabilities = Capabilities(reads_xid_in_flight=True, xid_read_runs_do_block=True)
    # psycopg2's own rollback() in a worker thread, its end awaited before the next use.
    deferred_rollback = DeferredRollback(
        psycopg2_rollback.send_rollback, psycopg2_rollback.settle, psycopg2_rollback.close_settled
    )

    def first_flight_connect_args(self, cparams: ConnectArgs) -> None:
        # A connection class of dropsafe's (psycopg2 keeps its transaction in C): where the
        # app gave none, and not for psycopg2's asynchronous connections (always autocommit).
        if not {"connection_factory", "async", "async_"} & cparams.keys():
            cls = psycopg2_first_flight.connection_class()
            if cls is not None:
                cparams["connection_factory"] = cls

    def begin_in_first_flight(self, dbapi_connection: DBAPIConnection) -> bool:
        # BEGIN in the query string of the first statement: one flight, not two.
        return psycopg2_first_flight.uses_first_flight(self.native(dbapi_connection))

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
        # "SSL connection has been closed unexpectedly" after a pooler's FATAL goodbye. After
        # the last notice: an immediate shutdown's goodbye is a WARNING just before the close.
        text = dbapi_connection.info.error_message
        text = text if isinstance(text, str) else ""
        notices = getattr(dbapi_connection, "notices", None)
        if type(notices) is list and notices and isinstance(notices[-1], str):
            return notices[-1] + text
        return text

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

    def send_reading_xid(
        self,
        send: Callable[[str], None],
        dbapi_connection: DBAPIConnection,
        statement: str,
        question: XidQuestion,
    ) -> XidReading | None:
        # The NOTICE is taken out of ``connection.notices`` (the app never sees it). None where
        # the server sent none (``client_min_messages`` above NOTICE); nothing read where the
        # app replaced the list with a container of its own (its append could see the NOTICE).
        notices = dbapi_connection.notices
        if type(notices) is not list:
            send(statement)
            return None
        send(_READ_FIRST.format(columns=question.before) + statement)
        for index in range(len(notices) - 1, -1, -1):
            text = notices[index]
            at = text.find(_NOTICE_TAG) if isinstance(text, str) else -1
            if at >= 0:
                del notices[index]
                values = json.loads(text[at + len(_NOTICE_TAG) :])
                # One comprehension: a generator and a helper were two calls per value.
                texts = tuple([None if value is None else str(value) for value in values])
                return XidReading(texts, assigned=True)
        return None

    def backend_pid(self, dbapi_connection: DBAPIConnection) -> int | None:
        pid = dbapi_connection.info.backend_pid  # libpq's PQbackendPID: no round trip
        return pid if isinstance(pid, int) and pid > 0 else None
