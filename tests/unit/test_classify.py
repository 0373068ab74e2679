"""classify() on driver exceptions built the way the drivers build them (no server needed).

tests/integration/test_classify_real_errors.py checks the same on errors real faults raise.
"""

import ssl

import asyncpg.exceptions
import pg8000.exceptions
import psycopg.errors
import psycopg2
import pytest
import sqlalchemy.exc

from dropsafe import Kind, classify
from dropsafe._classify import sqlstate_of


def _wrapped(orig, cls=sqlalchemy.exc.OperationalError):
    return cls("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (psycopg.errors.SerializationFailure(), Kind.TRANSIENT),
        (psycopg.errors.DeadlockDetected(), Kind.TRANSIENT),
        (psycopg.errors.TooManyConnections(), Kind.TRANSIENT),
        (psycopg.errors.CannotConnectNow(), Kind.TRANSIENT),
        (psycopg.errors.AdminShutdown(), Kind.DISCONNECT),
        (psycopg.errors.CrashShutdown(), Kind.FAILOVER),
        (psycopg.errors.ReadOnlySqlTransaction(), Kind.PERMANENT),
        (psycopg.errors.IdleInTransactionSessionTimeout(), Kind.DISCONNECT),
        (psycopg.errors.IdleSessionTimeout(), Kind.DISCONNECT),
        (psycopg.errors.DatabaseDropped(), Kind.PERMANENT),
        (
            psycopg.errors.InvalidParameterValue("transaction ID 99 is in the future"),
            Kind.PERMANENT,
        ),
        (psycopg.errors.UniqueViolation(), Kind.PERMANENT),
        (psycopg.errors.SyntaxError(), Kind.PERMANENT),
        (asyncpg.exceptions.SerializationError(), Kind.TRANSIENT),
        (asyncpg.exceptions.AdminShutdownError(), Kind.DISCONNECT),
        (asyncpg.exceptions.ReadOnlySQLTransactionError(), Kind.PERMANENT),
        (asyncpg.exceptions.IdleInTransactionSessionTimeoutError(), Kind.DISCONNECT),
        (asyncpg.exceptions.IdleSessionTimeoutError(), Kind.DISCONNECT),
        # Client-side misuse: no SQLSTATE, and not a disconnect.
        (
            asyncpg.exceptions.InterfaceError("the server expects 1 argument, 0 were passed"),
            Kind.PERMANENT,
        ),
        (asyncpg.exceptions.InterfaceError("connection is closed"), Kind.DISCONNECT),
        (asyncpg.exceptions.TargetServerAttributeNotMatched("not primary"), Kind.FAILOVER),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), Kind.DISCONNECT),
        (asyncpg.exceptions.UniqueViolationError(), Kind.PERMANENT),
        (pg8000.exceptions.DatabaseError({"C": "40P01", "M": "deadlock"}), Kind.TRANSIENT),
        (pg8000.exceptions.DatabaseError({"C": "23505", "M": "duplicate"}), Kind.PERMANENT),
        (pg8000.exceptions.DatabaseError({"C": "25P03", "M": "beendet"}), Kind.DISCONNECT),
        # The SQLSTATE wins over the text, in any language.
        (pg8000.exceptions.DatabaseError({"C": "22023", "M": "broken pipe"}), Kind.PERMANENT),
        (psycopg.errors.SyntaxError("server closed the connection unexpectedly"), Kind.PERMANENT),
        (psycopg2.OperationalError("SSL SYSCALL error: EOF detected\n"), Kind.DISCONNECT),
        (
            psycopg2.OperationalError("server closed the connection unexpectedly\n"),
            Kind.DISCONNECT,
        ),
        (
            psycopg2.OperationalError(
                'connection to server at "127.0.0.1", port 1 failed: Connection refused'
            ),
            Kind.FAILOVER,
        ),
        (psycopg2.OperationalError("FATAL:  the database system is starting up"), Kind.TRANSIENT),
        (psycopg2.OperationalError("FATAL:  database removed"), Kind.TRANSIENT),
    ],
)
def test_raw_and_wrapped_driver_errors(error, kind):
    assert classify(error) is kind
    assert classify(_wrapped(error)) is kind


LOW_LEVEL = [
    (ConnectionRefusedError(111, "refused"), Kind.FAILOVER),
    (ConnectionResetError(104, "reset"), Kind.DISCONNECT),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), Kind.DISCONNECT),
    (TimeoutError("timed out"), Kind.DISCONNECT),
    (BrokenPipeError(32, "broken pipe"), Kind.DISCONNECT),
]


@pytest.mark.parametrize(("error", "kind"), LOW_LEVEL)
def test_low_level_errors_count_only_from_a_driver(error, kind):
    # Raised by the application (a Redis client, an HTTP call): its own error.
    assert classify(error) is Kind.PERMANENT
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
    assert classify(error) is Kind.PERMANENT
    # Also when they carry a driver's error as their cause: they are not the driver's.
    try:
        raise error from psycopg.errors.AdminShutdown()
    except Exception as raised:
        assert classify(raised) is Kind.PERMANENT


def test_read_only_is_a_failover_only_when_the_guard_found_a_standby():
    for orig in (
        psycopg.errors.ReadOnlySqlTransaction(),
        asyncpg.exceptions.ReadOnlySQLTransactionError(),
        pg8000.exceptions.DatabaseError({"C": "25006", "M": "read-only"}),
    ):
        user_error = sqlalchemy.exc.InternalError("INSERT", {}, orig)
        assert classify(user_error) is Kind.PERMANENT
        standby = sqlalchemy.exc.InternalError("INSERT", {}, orig, connection_invalidated=True)
        assert classify(standby) is Kind.FAILOVER


def test_sqlalchemys_disconnect_verdict_is_used_without_a_sqlstate():
    closed = asyncpg.exceptions.InterfaceError("connection was lost somehow")
    assert classify(_wrapped(closed, sqlalchemy.exc.InterfaceError)) is Kind.PERMANENT
    verdict = sqlalchemy.exc.InterfaceError("SELECT 1", {}, closed, connection_invalidated=True)
    assert classify(verdict) is Kind.DISCONNECT


def test_cause_chain_is_followed():
    try:
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError as inner:
            raise pg8000.exceptions.InterfaceError("network error") from inner
    except pg8000.exceptions.InterfaceError as outer:
        assert classify(outer) is Kind.DISCONNECT


def test_a_lost_connection_during_commit_is_ambiguous():
    lost = psycopg2.OperationalError("server closed the connection unexpectedly")
    assert classify(lost, during_commit=True) is Kind.COMMIT_UNKNOWN
    assert classify(psycopg.errors.AdminShutdown(), during_commit=True) is Kind.COMMIT_UNKNOWN
    # Without the server's severity (an error made by hand) a refusal is not proven.
    assert classify(psycopg.errors.SerializationFailure(), during_commit=True) is (
        Kind.COMMIT_UNKNOWN
    )
    # Not the database's error at all: never ambiguous, never retried.
    assert classify(ValueError("broken pipe"), during_commit=True) is Kind.PERMANENT


def test_sqlstate_of_each_driver():
    assert sqlstate_of(psycopg.errors.AdminShutdown()) == "57P01"
    assert sqlstate_of(asyncpg.exceptions.AdminShutdownError()) == "57P01"
    assert sqlstate_of(pg8000.exceptions.DatabaseError({"C": "57P01"})) == "57P01"
    assert sqlstate_of(psycopg2.OperationalError("SSL SYSCALL error: EOF detected")) is None


def test_retryable_kinds():
    assert {kind for kind in Kind if kind.retryable} == {
        Kind.DISCONNECT,
        Kind.TRANSIENT,
        Kind.FAILOVER,
    }
