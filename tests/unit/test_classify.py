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
from dropsafe.classify import sqlstate_of


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
        (psycopg.errors.ReadOnlySqlTransaction(), Kind.FAILOVER),
        (psycopg.errors.UniqueViolation(), Kind.PERMANENT),
        (psycopg.errors.SyntaxError(), Kind.PERMANENT),
        (asyncpg.exceptions.SerializationError(), Kind.TRANSIENT),
        (asyncpg.exceptions.AdminShutdownError(), Kind.DISCONNECT),
        (asyncpg.exceptions.ReadOnlySQLTransactionError(), Kind.FAILOVER),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), Kind.DISCONNECT),
        (asyncpg.exceptions.UniqueViolationError(), Kind.PERMANENT),
        (pg8000.exceptions.DatabaseError({"C": "40P01", "M": "deadlock"}), Kind.TRANSIENT),
        (pg8000.exceptions.DatabaseError({"C": "23505", "M": "duplicate"}), Kind.PERMANENT),
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
        (ConnectionRefusedError(111, "refused"), Kind.FAILOVER),
        (ConnectionResetError(104, "reset"), Kind.DISCONNECT),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), Kind.DISCONNECT),
        (ValueError("not a database error"), Kind.PERMANENT),
    ],
)
def test_raw_and_wrapped_errors(error, kind):
    assert classify(error) is kind
    assert classify(_wrapped(error)) is kind


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
    # The server answered the COMMIT with an error of its own: it did not commit.
    assert classify(psycopg.errors.SerializationFailure(), during_commit=True) is Kind.TRANSIENT
    assert classify(psycopg.errors.UniqueViolation(), during_commit=True) is Kind.PERMANENT


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
