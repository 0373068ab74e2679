"""Classify any database error into the one `ErrorKind` that decides what happens next.

Only errors a database driver raised (raw or wrapped by SQLAlchemy's `DBAPIError`) can be
retryable; the evidence is read in this order: the SQLSTATE, SQLAlchemy's disconnect verdict,
the low-level error's type, the message text last (never where a SQLSTATE exists). See
docs/guarantees.md. Where each driver keeps a SQLSTATE and what it says without one are the
drivers' facts (`DriverErrors`, one per file in ``dropsafe._drivers``), handed down here by the
registry when it is imported: this base module never imports the drivers (the layer rule), and
the package face imports the registry before any public name, so the table is full before the
first call.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy.exc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

__all__ = [
    "READ_ONLY_SQLSTATE",
    "DriverErrors",
    "ErrorKind",
    "classify",
    "error_chain",
    "is_driver_error",
    "learn_driver_errors",
    "server_refused_commit",
    "sqlstate_of",
    "turned_away",
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

# SQLAlchemy's DBAPI adapters for asyncio drivers define their own DBAPI error classes.
_ADAPTER_MODULES = ("sqlalchemy.dialects.", "sqlalchemy.connectors.")

# Errors of the socket and TLS layers (asyncio's TimeoutError is not an OSError before 3.11).
_LOW_LEVEL = (OSError, EOFError, asyncio.TimeoutError)

# Messages of any driver (the OS's, OpenSSL's, the server's own); each driver's own are in
# its `DriverErrors`.
_DISCONNECT_MESSAGES = (
    "ssl error: unexpected eof",
    "unexpected eof while reading",
    "connection not open",
    "connection is closed",
    "the connection is closed",
    "terminating connection",
    "connection reset by peer",
    "broken pipe",
    "connection timed out",
)
_FAILOVER_MESSAGES = (
    "connection refused",
    "server is in hot standby mode",
    "no route to host",
    "is not accepting connections",
)
# PgBouncer's answers to a client that needs a server while its last server login failed, and
# to the clients waiting when a login fails: the client's statement is still in PgBouncer's
# buffer, never given to a server (`turned_away`).
_TURNED_AWAY_MESSAGES = ("server login has been failing", "pgbouncer cannot connect to server")
_TRANSIENT_MESSAGES = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients already",
    "remaining connection slots are reserved",
    # PgBouncer, which reports its own trouble without a useful SQLSTATE:
    "database removed",  # KILL, or the database left its config
    *_TURNED_AWAY_MESSAGES,
    "no more connections allowed",
    "query_wait_timeout",
    "server conn crashed",
)


def _no_reading(error: BaseException) -> object:
    del error
    return None


@dataclass(frozen=True)
class DriverErrors:
    """What the classifier must know of one driver's exceptions; each driver file gives one."""

    #: The top-level package whose exception classes (and code) are the driver's.
    package: str
    #: Where its exceptions keep the server's SQLSTATE, and its untranslated severity.
    sqlstate: Callable[[BaseException], object] = _no_reading
    severity: Callable[[BaseException], object] = _no_reading
    #: Its client-side errors that carry no SQLSTATE and mean something for a retry, by class
    #: name (in ``package``).
    client_errors: Mapping[str, ErrorKind] = field(default_factory=dict)
    #: Its own texts for a lost connection, and for a server not there or not the primary.
    disconnect_messages: tuple[str, ...] = ()
    failover_messages: tuple[str, ...] = ()


class _Known:
    """The drivers' errors handed down so far (`learn_driver_errors`)."""

    errors: tuple[DriverErrors, ...] = ()
    packages: frozenset[str] = frozenset()
    disconnect_messages: tuple[str, ...] = _DISCONNECT_MESSAGES
    failover_messages: tuple[str, ...] = _FAILOVER_MESSAGES


def learn_driver_errors(errors: DriverErrors) -> None:
    """Add one driver's error facts (the drivers' registry calls it for each, at its import)."""
    if errors in _Known.errors:
        return
    _Known.errors = (*_Known.errors, errors)
    _Known.packages = frozenset(known.package for known in _Known.errors)
    # psycopg2 and psycopg 3 share libpq's texts: each kept once.
    _Known.disconnect_messages = tuple(
        dict.fromkeys((*_Known.disconnect_messages, *errors.disconnect_messages))
    )
    _Known.failover_messages = tuple(
        dict.fromkeys((*_Known.failover_messages, *errors.failover_messages))
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
    for error in error_chain(exc):
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
        if module.partition(".")[0] in _Known.packages or module.startswith(_ADAPTER_MODULES):
            return True
    return False


def _raised_inside_driver(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        if module.partition(".")[0] in _Known.packages:
            return True
        traceback = traceback.tb_next
    return False


def _classify(exc: BaseException) -> ErrorKind:
    if not is_driver_error(exc):
        return ErrorKind.PERMANENT
    # SQLAlchemy's verdict (its dialect's is_disconnect, possibly revised by handle_error).
    invalidated = isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
    evidence = list(error_chain(exc))
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
        (_Known.failover_messages, ErrorKind.FAILOVER),
        (_Known.disconnect_messages, ErrorKind.DISCONNECT),
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
    for known in _Known.errors:
        if known.package == package:
            return known.client_errors.get(type(error).__name__)
    return None


_SQLSTATE_LENGTH = 5


def _own_sqlstate(error: BaseException) -> str | None:
    # Every driver's reader, whatever the error's class: SQLAlchemy's asyncio adapters copy
    # the driver's SQLSTATE onto their own exception classes.
    for known in _Known.errors:
        value = known.sqlstate(error)
        if isinstance(value, str) and len(value) == _SQLSTATE_LENGTH:
            return value
    return None


def error_chain(exc: BaseException) -> Iterator[BaseException]:
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


def turned_away(error: BaseException, *more_texts: str) -> bool:
    """Whether a pooler closed the connection before it gave the statement to any server.

    Read from the texts of ``error``'s chain and ``more_texts`` (what the driver's connection
    kept: psycopg2's exception holds only libpq's last line). Such a statement ran nowhere: it
    may be sent again on a fresh connection once the pooler has a server again.
    """
    texts = [str(current).lower() for current in error_chain(error)]
    texts += [text.lower() for text in more_texts]
    return any(message in text for text in texts for message in _TURNED_AWAY_MESSAGES)


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
    for current in error_chain(error):
        for known in _Known.errors:
            value = known.severity(current)
            if isinstance(value, str):
                return value
    return None
