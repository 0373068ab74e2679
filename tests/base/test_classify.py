"""classify() on driver exceptions built the way the drivers build them (no server needed).

tests/base/test_classify_real_errors.py checks the same on errors real faults raise.
"""

import ssl

import asyncpg.exceptions
import pg8000.exceptions
import psycopg.errors
import psycopg2
import pytest
import sqlalchemy.exc

from dropsafe import ErrorKind, classify
from dropsafe._classify import sqlstate_of


def _wrapped(orig, cls=sqlalchemy.exc.OperationalError):
    return cls("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.SerializationFailure(), ErrorKind.TRANSIENT),
        (psycopg.errors.DeadlockDetected(), ErrorKind.TRANSIENT),
        (psycopg.errors.TooManyConnections(), ErrorKind.TRANSIENT),
        (psycopg.errors.CannotConnectNow(), ErrorKind.TRANSIENT),
        (psycopg.errors.AdminShutdown(), ErrorKind.DISCONNECT),
        (psycopg.errors.CrashShutdown(), ErrorKind.FAILOVER),
        (psycopg.errors.ReadOnlySqlTransaction(), ErrorKind.PERMANENT),
        (psycopg.errors.IdleInTransactionSessionTimeout(), ErrorKind.DISCONNECT),
        (psycopg.errors.IdleSessionTimeout(), ErrorKind.DISCONNECT),
        (psycopg.errors.DatabaseDropped(), ErrorKind.PERMANENT),
        (
            psycopg.errors.InvalidParameterValue("transaction ID 99 is in the future"),
            ErrorKind.PERMANENT,
        ),
        (psycopg.errors.UniqueViolation(), ErrorKind.PERMANENT),
        (psycopg.errors.SyntaxError(), ErrorKind.PERMANENT),
        (asyncpg.exceptions.SerializationError(), ErrorKind.TRANSIENT),
        (asyncpg.exceptions.AdminShutdownError(), ErrorKind.DISCONNECT),
        (asyncpg.exceptions.ReadOnlySQLTransactionError(), ErrorKind.PERMANENT),
        (asyncpg.exceptions.IdleInTransactionSessionTimeoutError(), ErrorKind.DISCONNECT),
        (asyncpg.exceptions.IdleSessionTimeoutError(), ErrorKind.DISCONNECT),
        # Client-side misuse: no SQLSTATE, and not a disconnect.
        (
            asyncpg.exceptions.InterfaceError("the server expects 1 argument, 0 were passed"),
            ErrorKind.PERMANENT,
        ),
        (asyncpg.exceptions.InterfaceError("connection is closed"), ErrorKind.DISCONNECT),
        (asyncpg.exceptions.TargetServerAttributeNotMatched("not primary"), ErrorKind.FAILOVER),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), ErrorKind.DISCONNECT),
        (asyncpg.exceptions.UniqueViolationError(), ErrorKind.PERMANENT),
        (pg8000.exceptions.DatabaseError({"C": "40P01", "M": "deadlock"}), ErrorKind.TRANSIENT),
        (pg8000.exceptions.DatabaseError({"C": "23505", "M": "duplicate"}), ErrorKind.PERMANENT),
        (pg8000.exceptions.DatabaseError({"C": "25P03", "M": "beendet"}), ErrorKind.DISCONNECT),
        # The SQLSTATE wins over the text, in any language.
        (pg8000.exceptions.DatabaseError({"C": "22023", "M": "broken pipe"}), ErrorKind.PERMANENT),
        (
            psycopg.errors.SyntaxError("server closed the connection unexpectedly"),
            ErrorKind.PERMANENT,
        ),
        (psycopg2.OperationalError("SSL SYSCALL error: EOF detected\n"), ErrorKind.DISCONNECT),
        (
            psycopg2.OperationalError("server closed the connection unexpectedly\n"),
            ErrorKind.DISCONNECT,
        ),
        (
            psycopg2.OperationalError(
                'connection to server at "127.0.0.1", port 1 failed: Connection refused'
            ),
            ErrorKind.FAILOVER,
        ),
        (
            psycopg2.OperationalError("FATAL:  the database system is starting up"),
            ErrorKind.TRANSIENT,
        ),
        (psycopg2.OperationalError("FATAL:  database removed"), ErrorKind.TRANSIENT),
    ],
)
def test_raw_and_wrapped_driver_errors(error, kind):
    assert classify(error) is kind
    assert classify(_wrapped(error)) is kind


LOW_LEVEL = [
    (ConnectionRefusedError(111, "refused"), ErrorKind.FAILOVER),
    (ConnectionResetError(104, "reset"), ErrorKind.DISCONNECT),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), ErrorKind.DISCONNECT),
    (TimeoutError("timed out"), ErrorKind.DISCONNECT),
    (BrokenPipeError(32, "broken pipe"), ErrorKind.DISCONNECT),
]


@pytest.mark.parametrize(("error", "kind"), LOW_LEVEL)
def test_low_level_errors_count_only_from_a_driver(error, kind):
    # Raised by the application (a Redis client, an HTTP call): its own error.
    assert classify(error) is ErrorKind.PERMANENT
    # Wrapped by SQLAlchemy, or the cause of a driver's error: the driver's.
    assert classify(_wrapped(error)) is kind
    try:
        raise pg8000.exceptions.InterfaceError("network error") from error
    except pg8000.exceptions.InterfaceError as driver_error:
        assert classify(driver_error) is kind


@pytest.mark.parametrize(("error", "kind"), LOW_LEVEL)
def test_low_level_errors_raised_inside_a_driver(error, kind):
    # asyncpg lets a refused or timed-out connect through unwrapped; what tells it apart from
    # the application's own OSError is where it was raised. (A fake frame of asyncpg's.)
    namespace = {"__name__": "asyncpg.connect_utils", "error": error}
    exec("def connect():\n    raise error\n", namespace)  # noqa: S102 - a frame in asyncpg
    with pytest.raises(type(error)) as caught:
        namespace["connect"]()
    assert classify(caught.value) is kind


@pytest.mark.parametrize(
    "error",
    [
        ValueError("not a database error"),
        ValueError("upstream said: broken pipe"),
        TimeoutError("payment API timed out"),
        ConnectionRefusedError(111, "Redis: connection refused"),
        RuntimeError("server closed the connection unexpectedly"),
        sqlalchemy.exc.ResourceClosedError("This Connection is closed"),
        sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"),
        sqlalchemy.exc.DisconnectionError("connection is dead"),
        sqlalchemy.exc.InvalidRequestError("This connection is closed"),
    ],
)
def test_the_applications_and_sqlalchemys_own_errors_are_permanent(error):
    assert classify(error) is ErrorKind.PERMANENT
    # Also when they carry a driver's error as their cause: they are not the driver's.
    try:
        raise error from psycopg.errors.AdminShutdown()
    except Exception as raised:
        assert classify(raised) is ErrorKind.PERMANENT


def test_read_only_is_a_failover_only_when_the_guard_found_a_standby():
    for orig in (
        psycopg.errors.ReadOnlySqlTransaction(),
        asyncpg.exceptions.ReadOnlySQLTransactionError(),
        pg8000.exceptions.DatabaseError({"C": "25006", "M": "read-only"}),
    ):
        user_error = sqlalchemy.exc.InternalError("INSERT", {}, orig)
        assert classify(user_error) is ErrorKind.PERMANENT
        standby = sqlalchemy.exc.InternalError("INSERT", {}, orig, connection_invalidated=True)
        assert classify(standby) is ErrorKind.FAILOVER


def test_sqlalchemys_disconnect_verdict_is_used_without_a_sqlstate():
    closed = asyncpg.exceptions.InterfaceError("connection was lost somehow")
    assert classify(_wrapped(closed, sqlalchemy.exc.InterfaceError)) is ErrorKind.PERMANENT
    verdict = sqlalchemy.exc.InterfaceError("SELECT 1", {}, closed, connection_invalidated=True)
    assert classify(verdict) is ErrorKind.DISCONNECT


def test_cause_chain_is_followed():
    try:
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError as inner:
            raise pg8000.exceptions.InterfaceError("network error") from inner
    except pg8000.exceptions.InterfaceError as outer:
        assert classify(outer) is ErrorKind.DISCONNECT


def test_a_lost_connection_during_commit_is_ambiguous():
    lost = psycopg2.OperationalError("server closed the connection unexpectedly")
    assert classify(lost, during_commit=True) is ErrorKind.COMMIT_UNKNOWN
    assert classify(psycopg.errors.AdminShutdown(), during_commit=True) is ErrorKind.COMMIT_UNKNOWN
    # Without the server's severity (an error made by hand) a refusal is not proven.
    assert classify(psycopg.errors.SerializationFailure(), during_commit=True) is (
        ErrorKind.COMMIT_UNKNOWN
    )
    # Not the database's error at all: never ambiguous, never retried.
    assert classify(ValueError("broken pipe"), during_commit=True) is ErrorKind.PERMANENT


def test_sqlstate_of_each_driver():
    assert sqlstate_of(psycopg.errors.AdminShutdown()) == "57P01"
    assert sqlstate_of(asyncpg.exceptions.AdminShutdownError()) == "57P01"
    assert sqlstate_of(pg8000.exceptions.DatabaseError({"C": "57P01"})) == "57P01"
    assert sqlstate_of(psycopg2.OperationalError("SSL SYSCALL error: EOF detected")) is None


def test_retryable_kinds():
    assert {kind for kind in ErrorKind if kind.retryable} == {
        ErrorKind.DISCONNECT,
        ErrorKind.TRANSIENT,
        ErrorKind.FAILOVER,
    }
