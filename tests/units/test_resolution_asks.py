"""`resolve_commit` asking a real server: the unit's COMMIT and the transactions the app ended.

The same asking serves both, with two differences that these tests pin (and their messages,
word for word): the COMMIT's backend is fenced where it still holds its transaction, an earlier
transaction's never is (its backend went on to send the COMMIT: "in progress" is unknown); and
only the COMMIT's xid is reported as a `CommitResolved` event.
"""

from __future__ import annotations

import contextlib
import time

import psycopg2
import pytest
import sqlalchemy as sa
from commit_faults import libpq_url

from dropsafe import CommitOutcomeUnknown
from dropsafe._commit_truth.pending_commit import PendingCommit
from dropsafe._commit_truth.resolution import APP_COMMITTED, APP_ENDED_UNKNOWN, resolve_commit
from dropsafe._commit_truth.server_life import ServerLife
from dropsafe._commit_truth.server_sql import SERVER_LIFE_SQL

pytestmark = [pytest.mark.shares_server, pytest.mark.timeout(60)]

ERROR = ConnectionResetError(104, "reset")
NEVER_SENT = "the unit's own COMMIT was never sent"
AROUND = "but the work had ended a transaction of its own around SQLAlchemy"


def _lost(xid):
    return f"the connection failed during COMMIT of transaction {xid}, which did not"


def _committed_message(lost, xid):
    return (
        f"{lost}; {AROUND} (the DBAPI connection's commit(), or a COMMIT statement), and that "
        f"one (xid {xid}) committed: part of the work is durable, so it was neither run again "
        "nor acknowledged. Leave the COMMIT to dropsafe (session.flush() sends statements "
        "early; two commits are two units of work)"
    )


def _unknown_message(lost, xid, reason):
    return f"{lost}; {AROUND} (xid {xid}), and whether that one committed cannot be known: {reason}"


@pytest.fixture
def engine(postgres_server, disposing):
    return disposing(sa.create_engine(postgres_server.url("psycopg2")))


@pytest.fixture
def connections(postgres_server):
    """Opens psycopg2 connections (each with a transaction of its own), closed at the end."""
    opened = []

    def connect():
        connection = psycopg2.connect(libpq_url(postgres_server))
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        with contextlib.suppress(psycopg2.Error):
            connection.close()


def _transaction(connect, end):
    """A transaction with an xid, ended by ``end`` ("commit", "rollback") or left open (None)."""
    connection = connect()
    cursor = connection.cursor()
    cursor.execute(
        f"SELECT pg_catalog.txid_current(), pg_catalog.pg_backend_pid(), {SERVER_LIFE_SQL}"
    )
    xid, pid, *life = cursor.fetchone()
    pending = PendingCommit(xid, pid, ServerLife.read(*life))
    if end is not None:
        getattr(connection, end)()
    return pending, connection


def _alive(connection):
    try:
        connection.cursor().execute("SELECT 1")
    except psycopg2.OperationalError:
        return False
    return True


def _resolve(engine, pending, events, *, app_ended=False, earlier=(), timeout=2.0):
    pending = PendingCommit(
        pending.xid, pending.backend_pid, pending.server_life, earlier=tuple(earlier)
    )
    return resolve_commit(
        engine,
        pending,
        ERROR,
        timeout=timeout,
        deadline=time.monotonic() + timeout,
        hooks=(events.append,),
        app_ended=app_ended,
    )


def test_a_commit_held_by_its_idle_backend_is_fenced_and_its_earlier_committed_one_raises(
    engine, connections
):
    earlier, _ = _transaction(connections, "commit")
    pending, holder = _transaction(connections, None)  # its COMMIT was lost on the way
    events = []
    with pytest.raises(CommitOutcomeUnknown) as raised:
        _resolve(engine, pending, events, earlier=[pending, earlier])
    assert (raised.value.reason, raised.value.xid) == (APP_COMMITTED, earlier.xid)
    assert str(raised.value) == _committed_message(_lost(pending.xid), earlier.xid)
    assert raised.value.__cause__ is ERROR
    assert [(event.xid, event.outcome) for event in events] == [(pending.xid, "aborted")]
    assert not _alive(holder)  # fenced


def test_an_earlier_transaction_still_open_is_unknown_and_never_fenced(engine, connections):
    pending, _ = _transaction(connections, "rollback")
    aborted, _ = _transaction(connections, "rollback")
    earlier, holder = _transaction(connections, None)
    events = []
    started = time.monotonic()
    with pytest.raises(CommitOutcomeUnknown) as raised:
        _resolve(engine, pending, events, earlier=[aborted, earlier], timeout=10.0)
    assert time.monotonic() - started < 5, "unknown at its first answer, not at the deadline"
    assert (raised.value.reason, raised.value.xid) == (APP_ENDED_UNKNOWN, earlier.xid)
    reason = f"xid {earlier.xid} is still in progress"
    assert str(raised.value) == _unknown_message(_lost(pending.xid), earlier.xid, reason)
    assert [(event.xid, event.outcome) for event in events] == [(pending.xid, "aborted")]
    assert _alive(holder)  # not fenced


def test_earlier_transactions_that_aborted_leave_the_commit_aborted(engine, connections):
    pending, _ = _transaction(connections, "rollback")
    earlier = [_transaction(connections, "rollback")[0] for _ in range(2)]
    events = []
    assert _resolve(engine, pending, events, earlier=earlier) == "aborted"
    assert [(event.xid, event.outcome) for event in events] == [(pending.xid, "aborted")]


def test_the_app_s_own_commit_that_committed_raises(engine, connections):
    pending, _ = _transaction(connections, "commit")
    events = []
    with pytest.raises(CommitOutcomeUnknown) as raised:
        _resolve(engine, pending, events, app_ended=True)
    assert (raised.value.reason, raised.value.xid) == (APP_COMMITTED, pending.xid)
    assert str(raised.value) == _committed_message(NEVER_SENT, pending.xid)
    assert [(event.xid, event.outcome) for event in events] == [(pending.xid, "committed")]


def test_the_app_s_own_commit_held_by_its_idle_backend_is_fenced(engine, connections):
    pending, holder = _transaction(connections, None)
    earlier, _ = _transaction(connections, "commit")
    events = []
    with pytest.raises(CommitOutcomeUnknown) as raised:
        _resolve(engine, pending, events, app_ended=True, earlier=[earlier])
    assert (raised.value.reason, raised.value.xid) == (APP_COMMITTED, earlier.xid)
    assert str(raised.value) == _committed_message(NEVER_SENT, earlier.xid)
    assert [(event.xid, event.outcome) for event in events] == [(pending.xid, "aborted")]
    assert not _alive(holder)


def test_the_app_s_own_commit_whose_outcome_cannot_be_known_raises(engine, connections):
    pending, _ = _transaction(connections, "commit")
    other = ServerLife("1111111111111111111", *list(vars(pending.server_life).values())[1:])
    pending = PendingCommit(pending.xid, pending.backend_pid, other)
    events = []
    with pytest.raises(CommitOutcomeUnknown) as raised:
        _resolve(engine, pending, events, app_ended=True)
    assert (raised.value.reason, raised.value.xid) == (APP_ENDED_UNKNOWN, pending.xid)
    reason = "a server of another database cluster answered"
    assert str(raised.value) == _unknown_message(NEVER_SENT, pending.xid, reason)
    assert raised.value.__cause__ is ERROR
    assert [(event.xid, event.outcome) for event in events] == [(pending.xid, "unknown")]
