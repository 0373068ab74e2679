"""Classify any database error into the one `Kind` that decides what happens next.

SQLSTATE first, then the connection's own state, then the exception's type, and the message
text last, for SQLAlchemy-wrapped and raw errors of psycopg2, psycopg 3, asyncpg and pg8000.
"""

from __future__ import annotations

import enum
import ssl
from typing import TYPE_CHECKING

import sqlalchemy.exc

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Kind", "classify", "sqlstate_of"]


class Kind(str, enum.Enum):
    """What an error means for the unit of work that met it."""

    #: The connection is gone; the server did not report an error for the statement.
    DISCONNECT = "disconnect"
    #: The server refused this attempt for a reason that passes (serialization, deadlock, ...).
    TRANSIENT = "transient"
    #: The server is not (or no longer) the writable primary, or is unreachable: find another.
    FAILOVER = "failover"
    #: The connection failed during COMMIT: the transaction may or may not have committed.
    COMMIT_UNKNOWN = "commit-unknown"
    #: Retrying cannot help (constraint violations, syntax errors, bad input, ...).
    PERMANENT = "permanent"

    @property
    def retryable(self) -> bool:
        """Whether running the whole unit of work again may succeed."""
        return self in (Kind.DISCONNECT, Kind.TRANSIENT, Kind.FAILOVER)


_SQLSTATE_KINDS: dict[str, Kind] = {
    "40001": Kind.TRANSIENT,  # serialization_failure
    "40P01": Kind.TRANSIENT,  # deadlock_detected
    "53300": Kind.TRANSIENT,  # too_many_connections
    "57P03": Kind.TRANSIENT,  # cannot_connect_now (starting up, shutting down, recovering)
    "57P01": Kind.DISCONNECT,  # admin_shutdown (terminated backend, fast shutdown)
    "57P02": Kind.FAILOVER,  # crash_shutdown (another backend crashed; the server restarts)
    "25006": Kind.FAILOVER,  # read_only_sql_transaction (this node is a standby now)
    "08000": Kind.DISCONNECT,  # connection_exception
    "08003": Kind.DISCONNECT,  # connection_does_not_exist
    "08006": Kind.DISCONNECT,  # connection_failure
    "08001": Kind.FAILOVER,  # sqlclient_unable_to_establish_sqlconnection
    "08004": Kind.FAILOVER,  # sqlserver_rejected_establishment_of_sqlconnection
}

# SQLSTATEs after which every pooled connection is suspect, not only the one that saw it.
POOL_WIDE_SQLSTATES = frozenset({"57P02", "57P03", "25006", "08001", "08004"})

# asyncpg's client-side errors, which carry no SQLSTATE.
_ASYNCPG_KINDS = {
    "ConnectionDoesNotExistError": Kind.DISCONNECT,
    "ConnectionFailureError": Kind.DISCONNECT,
    "InterfaceError": Kind.DISCONNECT,
    "TargetServerAttributeNotMatched": Kind.FAILOVER,
}
_DISCONNECT_MESSAGES = (
    "server closed the connection unexpectedly",
    "ssl syscall error",
    "ssl connection has been closed unexpectedly",
    "ssl error: unexpected eof",
    "unexpected eof while reading",
    "connection already closed",
    "connection not open",
    "connection is closed",
    "the connection is closed",
    "the connection is lost",
    "connection was closed in the middle of operation",
    "could not receive data from server",
    "could not send data to server",
    "terminating connection",
    "consuming input failed",
    "network error",
    "connection reset by peer",
    "broken pipe",
    "connection timed out",
    "lost synchronization with server",
)
_FAILOVER_MESSAGES = (
    "connection refused",
    "session is read-only",  # libpq, target_session_attrs=read-write met a standby
    "server is in hot standby mode",
    "none of the hosts match the target attribute",  # asyncpg, target_session_attrs
    "could not connect to server",
    "read-only transaction",
    "no route to host",
    "server does not support",  # target_session_attrs found no primary
    "is not accepting connections",
)
_TRANSIENT_MESSAGES = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients already",
    "remaining connection slots are reserved",
    # PgBouncer, which reports its own trouble without a useful SQLSTATE:
    "database removed",  # KILL, or the database left its config
    "pgbouncer cannot connect to server",
    "server login has been failing",
    "no more connections allowed",
    "query_wait_timeout",
    "server conn crashed",
)


def classify(exc: BaseException, *, during_commit: bool = False) -> Kind:
    """Return the `Kind` of ``exc``; with ``during_commit``, a lost connection is ambiguous.

    Example::

        try:
            session.commit()
        except Exception as exc:
            if dropsafe.classify(exc, during_commit=True) is Kind.COMMIT_UNKNOWN: ...
    """
    kind = _classify(exc)
    if during_commit and kind in (Kind.DISCONNECT, Kind.FAILOVER):
        # The server may have committed before the reply was lost. A server-reported
        # error (a SQLSTATE of its own) means it did not commit.
        state = sqlstate_of(exc)
        if state is None or state in ("57P01", "57P02", "08000", "08003", "08006"):
            return Kind.COMMIT_UNKNOWN
    return kind


def sqlstate_of(exc: BaseException) -> str | None:
    """Return the SQLSTATE carried by ``exc`` or by what it wraps, if any."""
    for error in _chain(exc):
        state = _own_sqlstate(error)
        if state:
            return state
    return None


def _classify(exc: BaseException) -> Kind:  # noqa: PLR0911 - one return per kind of evidence
    state = sqlstate_of(exc)
    if state is not None:
        if state in _SQLSTATE_KINDS:
            return _SQLSTATE_KINDS[state]
        if state.startswith("08"):
            return Kind.DISCONNECT
        return Kind.PERMANENT
    for error in _chain(exc):
        kind = _kind_by_type(error)
        if kind is not None:
            return kind
    text = " ".join(str(error) for error in _chain(exc)).lower()
    for messages, kind in (
        (_TRANSIENT_MESSAGES, Kind.TRANSIENT),
        (_FAILOVER_MESSAGES, Kind.FAILOVER),
        (_DISCONNECT_MESSAGES, Kind.DISCONNECT),
    ):
        if any(message in text for message in messages):
            return kind
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return Kind.DISCONNECT
    return Kind.PERMANENT


def _kind_by_type(error: BaseException) -> Kind | None:
    if isinstance(error, sqlalchemy.exc.DisconnectionError):
        return Kind.DISCONNECT
    if isinstance(error, ConnectionRefusedError):
        return Kind.FAILOVER
    if isinstance(error, (ConnectionError, ssl.SSLEOFError, TimeoutError, EOFError)):
        return Kind.DISCONNECT
    if type(error).__module__.startswith("asyncpg"):
        return _ASYNCPG_KINDS.get(type(error).__name__)
    return None


def _own_sqlstate(error: BaseException) -> str | None:
    # psycopg 3 and asyncpg: .sqlstate; psycopg2: .pgcode; pg8000: a dict of fields in args[0].
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(error, attribute, None)
        if isinstance(value, str) and len(value) == 5:  # noqa: PLR2004 - SQLSTATEs are 5 chars
            return value
    if error.args and isinstance(error.args[0], dict):
        value = error.args[0].get("C")
        if isinstance(value, str) and len(value) == 5:  # noqa: PLR2004
            return value
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc``, what a SQLAlchemy error wraps, and their causes, each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        if isinstance(error, sqlalchemy.exc.DBAPIError):
            pending.append(error.orig)
        pending.append(error.__cause__)
