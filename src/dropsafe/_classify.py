"""Classify any database error into the one `ErrorKind` that decides what happens next.

Only errors the database driver raised (psycopg2, psycopg 3, asyncpg, pg8000; raw or wrapped by
SQLAlchemy's `DBAPIError`) can be retryable: the application's own exceptions, SQLAlchemy's own
("This Connection is closed", a pool timeout) and a driver's client-side misuse errors are
`ErrorKind.PERMANENT`, whatever their text says. Within a driver's error the evidence is read in
this order: the SQLSTATE the server reported, SQLAlchemy's own disconnect verdict, the type of
the low-level error the driver wraps, and the message text last, only where no SQLSTATE
exists (servers speak other languages; the text of an error with a SQLSTATE is never read).
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from typing import TYPE_CHECKING

import sqlalchemy.exc

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "READ_ONLY_SQLSTATE",
    "ErrorKind",
    "classify",
    "is_driver_error",
    "server_refused_commit",
    "sqlstate_of",
]


class ErrorKind(str, enum.Enum):
    """What an error means for the unit of work that met it."""

    #: The connection is gone; the server did not report an error for the statement.
    DISCONNECT = "disconnect"
    #: The server refused this attempt for a reason that passes (serialization, deadlock, ...).
    TRANSIENT = "transient"
    #: The server is not (or no longer) the writable primary, or is unreachable: find another.
    FAILOVER = "failover"
    #: The connection failed during COMMIT: the transaction may or may not have committed.
    COMMIT_UNKNOWN = "commit-unknown"
    #: Retrying cannot help (constraint violations, syntax errors, bad input, the app's own
    #: errors, ...).
    PERMANENT = "permanent"

    @property
    def retryable(self) -> bool:
        """Whether running the whole unit of work again may succeed."""
        return self in (ErrorKind.DISCONNECT, ErrorKind.TRANSIENT, ErrorKind.FAILOVER)


#: 25006 (read_only_sql_transaction) is a failover only when the server itself is read-only
#: because it is in recovery (a standby). The pool's error handler (`dropsafe._engine.invalidation`)
#: establishes that from the connection and then marks SQLAlchemy's error
#: ``connection_invalidated``; otherwise 25006 is the user's own read-only transaction, or a
#: setting of the server: permanent.
READ_ONLY_SQLSTATE = "25006"

_SQLSTATE_KINDS: dict[str, ErrorKind] = {
    "40001": ErrorKind.TRANSIENT,  # serialization_failure
    "40P01": ErrorKind.TRANSIENT,  # deadlock_detected
    "53300": ErrorKind.TRANSIENT,  # too_many_connections
    "57P03": ErrorKind.TRANSIENT,  # cannot_connect_now (starting up, shutting down, recovering)
    "57P01": ErrorKind.DISCONNECT,  # admin_shutdown (terminated backend, fast shutdown)
    "57P02": ErrorKind.FAILOVER,  # crash_shutdown (another backend crashed; the server restarts)
    "57P04": ErrorKind.PERMANENT,  # database_dropped: it will not come back
    # The server ended an idle session; the transaction (if any) was rolled back, so running
    # the unit again on a new connection is safe.
    "25P03": ErrorKind.DISCONNECT,  # idle_in_transaction_session_timeout
    "57P05": ErrorKind.DISCONNECT,  # idle_session_timeout
    "08000": ErrorKind.DISCONNECT,  # connection_exception
    "08003": ErrorKind.DISCONNECT,  # connection_does_not_exist
    "08006": ErrorKind.DISCONNECT,  # connection_failure
    "08001": ErrorKind.FAILOVER,  # sqlclient_unable_to_establish_sqlconnection
    "08004": ErrorKind.FAILOVER,  # sqlserver_rejected_establishment_of_sqlconnection
}

# Packages whose exceptions are "raised by the database driver".
_DRIVER_PACKAGES = frozenset({"psycopg2", "psycopg", "asyncpg", "pg8000"})
# SQLAlchemy's DBAPI adapters for asyncio drivers define their own DBAPI error classes.
_ADAPTER_MODULES = ("sqlalchemy.dialects.", "sqlalchemy.connectors.")

# Errors of the socket and TLS layers (asyncio's TimeoutError is not an OSError before 3.11).
_LOW_LEVEL = (OSError, EOFError, asyncio.TimeoutError)

# Drivers' client-side errors that carry no SQLSTATE and mean something for a retry, by
# (package, class name). asyncpg's InterfaceError is not here: it is the caller's misuse (wrong
# number of arguments, another operation in progress) or a connection already closed, which
# SQLAlchemy's is_disconnect reports.
_CLIENT_ERROR_KINDS = {
    ("asyncpg", "TargetServerAttributeNotMatched"): ErrorKind.FAILOVER,
    ("psycopg", "ConnectionTimeout"): ErrorKind.FAILOVER,  # connect_timeout expired
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
    "timeout expired",  # libpq's connect_timeout
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


def classify(exc: BaseException, *, during_commit: bool = False) -> ErrorKind:
    """Return the `ErrorKind` of ``exc``; with ``during_commit``, a lost connection is ambiguous.

    Example::

        try:
            session.commit()
        except Exception as exc:
            if dropsafe.classify(exc, during_commit=True) is ErrorKind.COMMIT_UNKNOWN: ...
    """
    if during_commit and is_driver_error(exc) and not server_refused_commit(exc):
        # Only PostgreSQL's own refusal proves that nothing was committed; after anything
        # else (a lost connection, a pooler's error) the COMMIT may have taken effect.
        return ErrorKind.COMMIT_UNKNOWN
    return _classify(exc)


def sqlstate_of(exc: BaseException) -> str | None:
    """Return the SQLSTATE carried by ``exc`` or by what it wraps, if any."""
    for error in _chain(exc):
        state = _own_sqlstate(error)
        if state:
            return state
    return None


def is_driver_error(exc: BaseException) -> bool:
    """Whether the database driver raised ``exc`` (SQLAlchemy's `DBAPIError` wraps only those).

    A driver's own exception classes count, and an `OSError` (a refused or timed-out connect,
    an SSL failure) counts when it was raised inside a driver's code, as asyncpg lets them
    through unwrapped; the same `OSError` raised by the application (Redis, an HTTP client)
    does not.
    """
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return True
    if isinstance(exc, sqlalchemy.exc.StatementError):  # SQLAlchemy wrapped a non-DBAPI error
        return exc.orig is not None and is_driver_error(exc.orig)
    if _is_driver_class(type(exc)):
        return True
    return isinstance(exc, _LOW_LEVEL) and _raised_inside_driver(exc)


def _is_driver_class(cls: type[BaseException]) -> bool:
    for klass in cls.__mro__:
        module = klass.__module__
        if module.partition(".")[0] in _DRIVER_PACKAGES or module.startswith(_ADAPTER_MODULES):
            return True
    return False


def _raised_inside_driver(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        if module.partition(".")[0] in _DRIVER_PACKAGES:
            return True
        traceback = traceback.tb_next
    return False


def _classify(exc: BaseException) -> ErrorKind:
    if not is_driver_error(exc):
        return ErrorKind.PERMANENT
    # SQLAlchemy's verdict (its dialect's is_disconnect, possibly revised by handle_error).
    invalidated = isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
    evidence = list(_chain(exc))
    state = next(filter(None, map(_own_sqlstate, evidence)), None)
    if state is not None:
        return _kind_by_sqlstate(state, invalidated=invalidated)
    for error in evidence:
        kind = _kind_by_type(error)
        if kind is not None:
            return kind
    if invalidated:
        return ErrorKind.DISCONNECT
    text = " ".join(str(error) for error in evidence).lower()
    for messages, kind in (
        (_TRANSIENT_MESSAGES, ErrorKind.TRANSIENT),
        (_FAILOVER_MESSAGES, ErrorKind.FAILOVER),
        (_DISCONNECT_MESSAGES, ErrorKind.DISCONNECT),
    ):
        if any(message in text for message in messages):
            return kind
    return ErrorKind.PERMANENT


def _kind_by_sqlstate(state: str, *, invalidated: bool) -> ErrorKind:
    if state == READ_ONLY_SQLSTATE:
        return ErrorKind.FAILOVER if invalidated else ErrorKind.PERMANENT
    if state in _SQLSTATE_KINDS:
        return _SQLSTATE_KINDS[state]
    return ErrorKind.DISCONNECT if state.startswith("08") else ErrorKind.PERMANENT


def _kind_by_type(error: BaseException) -> ErrorKind | None:
    # Low-level errors a driver wraps (or let through, raised inside it).
    if isinstance(error, ConnectionRefusedError):
        return ErrorKind.FAILOVER
    if isinstance(
        error, (ConnectionError, ssl.SSLEOFError, TimeoutError, asyncio.TimeoutError, EOFError)
    ):
        return ErrorKind.DISCONNECT
    package = type(error).__module__.partition(".")[0]
    return _CLIENT_ERROR_KINDS.get((package, type(error).__name__))


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
        if isinstance(error, sqlalchemy.exc.StatementError):
            pending.append(error.orig)
        pending.append(error.__cause__)


# An ERROR in these SQLSTATE classes speaks of the connection or the server, not of the COMMIT.
_NOT_A_REFUSAL = ("08", "53", "57", "58", "XX")


def server_refused_commit(error: BaseException) -> bool:
    """Whether PostgreSQL itself answered the COMMIT with an error: then nothing was committed.

    Only an ERROR (not FATAL or PANIC, which end the session; a pooler in between sends its
    own errors as FATAL) with a SQLSTATE outside the classes that speak of the connection or
    the server (08, 53, 57, 58, XX) proves it: a deferred constraint, a serialization failure.
    Anything else may have followed a COMMIT that took effect, and is resolved by asking.
    """
    state = sqlstate_of(error)
    if state is None or state.startswith(_NOT_A_REFUSAL):
        return False
    return _severity_of(error) == "ERROR"


def _severity_of(error: BaseException) -> str | None:
    """Return the server's untranslated severity of ``error`` or of what it wraps, if any."""
    for current in _chain(error):
        diag = getattr(current, "diag", None)  # psycopg2, psycopg 3
        fields = current.args[0] if current.args and isinstance(current.args[0], dict) else {}
        for value in (
            getattr(diag, "severity_nonlocalized", None),
            getattr(current, "severity_en", None),  # asyncpg
            fields.get("V"),  # pg8000
        ):
            if isinstance(value, str):
                return value
    return None
