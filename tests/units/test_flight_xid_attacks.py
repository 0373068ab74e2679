"""Attacks on a verified unit's xid read in its first writing statement's flight (issue 28).

The mark, read right before COMMIT, saw everything the transaction did; the read in flight sees
it at its first write. Each test here is a history between that read and the COMMIT that the
mark saw for free, against real servers with real faults (a COMMIT reply lost in the kernel, a
crash restart once the COMMIT is done, a cut through the chaos proxy while it runs). Where the
read in flight breaks the promise, the test is a strict xfail saying what happened; run with
``PoolPolicy(read_xid_in_flight=False)`` (the mark, as before issue 28) the same history holds,
which the ``mark`` cases show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

import psycopg2
import pytest
import sqlalchemy as sa
from commit_faults import (
    SLOW_COMMIT_SCHEMA,
    Recorder,
    Unit,
    WhenCommitRuns,
    backend_pid,
    crash_once_the_commit_is_done,
    libpq_url,
    local_port,
    lose_the_first_reply,
    resolving_policy,
    rows,
    url_of,
    wait_until,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import dropsafe
from dropsafe._commit_truth.resolution import APP_COMMITTED
from dropsafe._unit import recording
from dropsafe.testing import PgBouncer, PostgresServer

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]
ALL_FACES = [*DRIVERS, "psycopg-async"]

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]


@pytest.fixture
def marks(monkeypatch):
    """The marks the units send (one item each): `recording._mark`, counted."""
    sent = []
    mark = recording._mark

    def counted(conn, attempt):
        sent.append(1)
        return mark(conn, attempt)

    monkeypatch.setattr(recording, "_mark", counted)
    return sent


def _policy(recorder, reads):
    """``resolving_policy``, the xid read in flight (``reads``) or by the mark (as before 28)."""
    return dataclasses.replace(
        resolving_policy(recorder), pool=dropsafe.PoolPolicy(read_xid_in_flight=reads)
    )


def _crashed_after_commit(server, kernel_blackhole, driver, steps, *, reads):
    """`crash_once_the_commit_is_done`, the xid read in flight (``reads``) or by the mark."""
    pool = dropsafe.PoolPolicy(read_xid_in_flight=reads)
    return crash_once_the_commit_is_done(server, kernel_blackhole, driver, steps, pool=pool)


# -- synchronous_commit turned off where no statement's text names it ---------------------------

CRASH_SETTINGS = {"wal_writer_delay": "10s"}  # the unflushed commit record stays in memory


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ALL_FACES)
def test_synchronous_commit_off_by_a_bound_setting_name_leaves_a_crashed_commit_unknown(
    kernel_blackhole, driver, reads
):
    """INSERT (the read), ``SELECT set_config(:name, :value, true)`` with synchronous_commit
    as the bound name (a generic "apply these settings" helper), NOTIFY; a crash once the
    COMMIT is done. The statement's text does not name the setting, nor does any function of
    the database: before the fix (XidInFlight.note_statement notes a set_config whose name is
    not a literal) the xid read 'aborted' and the unit ran again, its NOTIFY sent twice,
    every face; the mark read current_setting() at COMMIT: unknown, run once."""
    steps = [
        "INSERT INTO ledger VALUES (4)",
        ("SELECT set_config(:name, :value, true)", {"name": "synchronous_commit", "value": "off"}),
        "SELECT pg_notify('dropsafe_test', 'relaxed')",
    ]
    with PostgresServer(settings=CRASH_SETTINGS) as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        crashed = _crashed_after_commit(server, kernel_blackhole, driver, steps, reads=reads)
    assert crashed == ("unknown", 1, ["unknown"])  # CommitOutcomeUnknown raised, run once


@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_literal_setting_name_after_the_read_lets_a_crashed_commit_run_again(driver):
    """``set_config('app.tenant', :id, true)`` (row-level security's usual shape) names its
    setting: it is not noted as turning synchronous_commit off. A crash while the COMMIT runs
    (it waited for its WAL: never acknowledged) is then resolved 'aborted' and the unit runs
    again, as with the mark; noted, it would end as CommitOutcomeUnknown."""
    recorder = Recorder()
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(read_xid_in_flight=True),
        unit=dropsafe.UnitPolicy(commit_status_timeout=30, deadline=60),
        hooks=(recorder,),
    )
    steps = [
        "SET LOCAL test.commit_sleep = '3'",
        "INSERT INTO ledger VALUES (1)",
        ("SELECT set_config('app.tenant', :id, true)", {"id": "7"}),
    ]
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        bystander = psycopg2.connect(libpq_url(server))
        bystander_pid = bystander.get_backend_pid()
        watcher = WhenCommitRuns(server, lambda: os.kill(bystander_pid, signal.SIGKILL))
        unit = Unit(driver, url_of(server, driver), steps, policy=policy)
        try:
            outcome = unit.run()
        finally:
            watcher.join(timeout=60)
            with contextlib.suppress(psycopg2.Error):
                bystander.close()
        written = rows(server, 1)
    assert (outcome, unit.calls, recorder.outcomes(), written) == ("done", 2, ["aborted"], 1)


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ALL_FACES)
def test_the_reading_statement_itself_turning_synchronous_commit_off_leaves_it_unknown(
    kernel_blackhole, driver, reads
):
    """The unit's first write turns synchronous_commit off itself (a subquery's set_config).

    psycopg2 and asyncpg read before the statement (a DO block in front of it; a Parse, Bind,
    Execute in front of its Bind), so the read says 'on';
    the statement that carries the read was not looked at for the name (only the statements
    after it were): the crash's 'aborted' ran the unit again and notified twice, before the fix
    in XidInFlight.send (the carrying statement's text is checked too).
    """
    steps = [
        (
            "INSERT INTO ledger SELECT 4 FROM "
            "(SELECT set_config('synchronous_commit', 'off', true)) AS relaxed"
        ),
        "SELECT pg_notify('dropsafe_test', 'relaxed')",
    ]
    with PostgresServer(settings=CRASH_SETTINGS) as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        crashed = _crashed_after_commit(server, kernel_blackhole, driver, steps, reads=reads)
    assert crashed == ("unknown", 1, ["unknown"])


# -- the transaction ended around SQLAlchemy, then written again without it ---------------------


def _run_with_the_commit_lost(unit, kernel_blackhole):
    """Run ``unit``, its first COMMIT blackholed both ways (it never reaches the server):
    "acknowledged", or the reason of the `CommitOutcomeUnknown` it raised."""
    holes = contextlib.ExitStack()
    try:
        with holes:
            unit.run(before_commit=lose_the_first_reply(holes, kernel_blackhole, "both"))
    except dropsafe.CommitOutcomeUnknown as unknown:
        return unknown.reason
    return "acknowledged"


def _raw_commit_then_raw_write(session):
    """COMMIT through the DBAPI connection, then a write through a raw cursor: SQLAlchemy sees
    neither (the engine's ``commit`` event does not fire: nothing refuses it)."""
    dbapi_connection = session.connection().connection.dbapi_connection
    dbapi_connection.commit()
    cursor = dbapi_connection.cursor()
    cursor.execute("INSERT INTO ledger VALUES (2)")
    cursor.close()


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_raw_dbapi_commit_then_a_raw_write_is_never_acknowledged_missing(
    request, kernel_blackhole, driver, reads
):
    """INSERT 1 (xid A read in flight), the DBAPI connection's own commit() (A committed;
    SQLAlchemy's commit event does not fire), INSERT 2 through a raw cursor (xid B: the
    connection is in a transaction again), then the unit's COMMIT lost before it reached the
    server. Never run twice, never acknowledged with a write missing: row 1 exactly once, and
    row 2 there or the unit raised.

    Before session 14 (the socket's bytes sent counted after each statement through
    SQLAlchemy: more at COMMIT, the read is dropped) it was resolved by A ('committed') and
    acknowledged, row 2 missing. Until session 15 the dropped read was forgotten: the COMMIT
    was resolved by B ('aborted') and the unit ran again, row 1 twice. Now the dropped A is
    asked about too when B aborted: committed, the unit raises `CommitOutcomeUnknown` (the app
    committed inside the unit), run once. The mark reads nothing before the COMMIT: it has no A
    to ask about, and the unit runs again (strict xfail: docs/guarantees.md, "A unit whose
    function commits around SQLAlchemy")."""
    if not reads:
        request.applymarker(
            pytest.mark.xfail(
                strict=True, reason="the mark reads no xid before the app's own commit()"
            )
        )
    recorder = Recorder()
    steps = ["INSERT INTO ledger VALUES (1)", _raw_commit_then_raw_write]
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        unit = Unit(driver, url_of(server, driver), steps, policy=_policy(recorder, reads))
        outcome = _run_with_the_commit_lost(unit, kernel_blackhole)
        written = [rows(server, 1), rows(server, 2)]
    assert (unit.calls, written[0]) == (1, 1), (outcome, recorder.outcomes())
    assert outcome != "acknowledged" or written[1] == 1, recorder.outcomes()
    if reads:
        assert (outcome, recorder.outcomes(), written[1]) == (APP_COMMITTED, ["aborted"], 0)


def _lose_the_mark(holes, kernel_blackhole):
    """``before_commit`` for ``Unit.run``: the first COMMIT's mark (read inside ``do_commit``,
    after every engine ``commit`` listener) blackholed both ways: it never reaches the server,
    and the unit's COMMIT is never sent."""

    def install(engine):
        @sa.event.listens_for(engine, "commit")
        def cut_off(connection):
            if not holes._exit_callbacks:
                holes.enter_context(kernel_blackhole(local_port(connection), direction="both"))

    return install


@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_raw_dbapi_commit_then_a_raw_write_whose_mark_is_lost_is_never_run_again(
    kernel_blackhole, driver
):
    """INSERT 1 (xid A read in flight), the DBAPI connection's commit() (A committed), a raw
    INSERT 2 (xid B), then the mark read before the unit's COMMIT lost: the COMMIT is never
    sent. Before session 16 that was an ordinary failure (the read A, held but no longer
    standing, was asked about only with a COMMIT that was sent): the unit ran again, row 1
    twice (the explorer's ``raw_commit_then_raw_write:psycopg2:request_lost:6:flight``). Now
    A is asked about before a rerun: committed by the app, `CommitOutcomeUnknown`, run once."""
    recorder = Recorder()
    steps = ["INSERT INTO ledger VALUES (1)", _raw_commit_then_raw_insert(2)]
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        unit = Unit(driver, url_of(server, driver), steps, policy=_policy(recorder, reads=True))
        holes = contextlib.ExitStack()
        outcome = "acknowledged"
        try:
            with holes:
                unit.run(before_commit=_lose_the_mark(holes, kernel_blackhole))
        except dropsafe.CommitOutcomeUnknown as unknown:
            outcome = unknown.reason
        written = [rows(server, 1), rows(server, 2)]
    assert (outcome, unit.calls, written) == (APP_COMMITTED, 1, [1, 0]), recorder.outcomes()


def _raw_commit_only(session):
    """The DBAPI connection's own commit(), nothing after: the unit's COMMIT commits nothing."""
    session.connection().connection.dbapi_connection.commit()


@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_raw_dbapi_commit_then_nothing_is_never_run_again_when_the_units_commit_is_lost(
    kernel_blackhole, driver
):
    """INSERT 1 (xid A read in flight), the DBAPI connection's commit() (A committed), nothing
    after; the unit's COMMIT (of an empty transaction: the mark reads no xid) lost before it
    reached the server. Before session 16 a COMMIT with no xid was harmless to redo, and A,
    dropped, was carried only by a mark that read an xid: the unit ran again, row 1 twice.
    Now A is asked about before the rerun: committed, `CommitOutcomeUnknown`, run once."""
    recorder = Recorder()
    steps = ["INSERT INTO ledger VALUES (1)", _raw_commit_only]
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        unit = Unit(driver, url_of(server, driver), steps, policy=_policy(recorder, reads=True))
        outcome = _run_with_the_commit_lost(unit, kernel_blackhole)
        written = rows(server, 1)
    assert (outcome, unit.calls, written) == (APP_COMMITTED, 1, 1), recorder.outcomes()


FAILING_COMMIT_SCHEMA = """
CREATE FUNCTION conflict_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF current_setting('test.commit_conflict', true) = 'on' THEN
    RAISE EXCEPTION 'a conflict found at COMMIT' USING ERRCODE = '40001';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER conflict_at_commit AFTER INSERT ON ledger
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION conflict_at_commit();
"""


def _raw_commit_then_a_write_whose_commit_conflicts(runs):
    """The DBAPI connection's commit(), then a raw INSERT 2 whose COMMIT fails with a
    serialization failure (retryable, certainly not committed) on the first run only."""

    def step(session):
        runs.append(1)
        dbapi_connection = session.connection().connection.dbapi_connection
        dbapi_connection.commit()
        cursor = dbapi_connection.cursor()
        if len(runs) == 1:
            cursor.execute("SET LOCAL test.commit_conflict = 'on'")
        cursor.execute("INSERT INTO ledger VALUES (2)")
        cursor.close()

    return step


@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_raw_dbapi_commit_then_a_unit_commit_that_surely_failed_is_never_run_again(driver):
    """INSERT 1 (xid A read in flight), the DBAPI connection's commit() (A committed), a raw
    INSERT 2, then the unit's COMMIT refused by the server with a serialization failure: no
    fault, no doubt about B, and a failure a unit retries. Before session 16 the unit ran
    again (A was asked about only after a COMMIT whose outcome was unknown): row 1 twice. Now
    A is asked about before any rerun: committed by the app, `CommitOutcomeUnknown`."""
    recorder = Recorder()
    runs = []
    steps = ["INSERT INTO ledger VALUES (1)", _raw_commit_then_a_write_whose_commit_conflicts(runs)]
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA + FAILING_COMMIT_SCHEMA)
        unit = Unit(driver, url_of(server, driver), steps, policy=_policy(recorder, reads=True))
        outcome = "acknowledged"
        try:
            unit.run()
        except dropsafe.CommitOutcomeUnknown as unknown:
            outcome = unknown.reason
        written = [rows(server, 1), rows(server, 2)]
    assert (outcome, unit.calls, written) == (APP_COMMITTED, 1, [1, 0]), recorder.outcomes()


def _raw_commit_whose_reply_is_lost(holes, kernel_blackhole, direction):
    """A step: the DBAPI connection's own commit(), its reply (``to``) or its request
    (``both``) lost in the kernel, the first run only; the driver's error escapes the unit."""

    def step(session):
        connection = session.connection()
        if not holes._exit_callbacks:
            holes.enter_context(kernel_blackhole(local_port(connection), direction=direction))
        connection.connection.dbapi_connection.commit()

    return step


@pytest.mark.parametrize("direction", ["to", "both"], ids=["reply_lost", "request_lost"])
@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_raw_dbapi_commit_lost_inside_the_unit_is_never_run_again_if_it_committed(
    kernel_blackhole, driver, direction
):
    """INSERT 1 (xid A read in flight), then the DBAPI connection's own commit(), its reply
    lost (the server committed A) or its request (it did not): the driver's error escapes the
    function, before the unit's own COMMIT. Before the fix the unit ran again as after any
    lost connection: row 1 twice where A had committed (every face: 4 of 4 reply_lost). Now
    A is asked about before a rerun: committed, `CommitOutcomeUnknown` (the app committed
    inside the unit), run once; aborted (fenced), the unit runs again, row 1 once."""
    recorder = Recorder()
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        holes = contextlib.ExitStack()
        steps = [
            "INSERT INTO ledger VALUES (1)",
            _raw_commit_whose_reply_is_lost(holes, kernel_blackhole, direction),
        ]
        policy = _policy(recorder, reads=True)
        unit = Unit(driver, url_of(server, driver), steps, policy=policy)
        outcome = "acknowledged"
        try:
            with holes:
                unit.run()
        except dropsafe.CommitOutcomeUnknown as unknown:
            outcome = unknown.reason
        written = rows(server, 1)
    if direction == "to":
        assert (outcome, unit.calls, written) == (APP_COMMITTED, 1, 1), recorder.outcomes()
    else:
        assert (outcome, unit.calls, written) == ("acknowledged", 2, 1), recorder.outcomes()


def _raw_commit_then_raw_insert(value):
    """`_raw_commit_then_raw_write` of ``value``, through the DBAPI connection every face has
    (SQLAlchemy's adapter on the async ones: its commit() and cursor go straight to asyncpg or
    psycopg, never through the dialect's do_execute)."""

    def step(session):
        dbapi_connection = session.connection().connection.dbapi_connection
        dbapi_connection.commit()
        cursor = dbapi_connection.cursor()
        cursor.execute(f"INSERT INTO ledger VALUES ({int(value)})")
        cursor.close()

    return step


THEN = {
    "nothing": [],
    # through SQLAlchemy after the raw write: its bytes counted would hide the raw ones
    "select": ["SELECT 1"],
    "insert": ["INSERT INTO ledger VALUES (3)"],  # reads the xid again: the new transaction's
}


@pytest.mark.shares_server
@pytest.mark.parametrize("replay_transaction", [False, True], ids=["unit", "transcript"])
@pytest.mark.parametrize("then", sorted(THEN))
@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_raw_commit_and_write_then_statements_through_sqlalchemy_are_resolved_by_the_new_xid(
    postgres_server, kernel_blackhole, driver, then, replay_transaction
):
    """INSERT 1 (xid A read in flight), the DBAPI connection's commit() and a raw INSERT 2 (xid
    B), then nothing, a SELECT or an INSERT 3 through SQLAlchemy, and the COMMIT lost before
    it reached the server: resolved by B (fenced, 'aborted'), never by A alone ('committed':
    acknowledged, rows 2 and 3 missing). A, dropped, is asked about too: committed by the app,
    so the unit raises `CommitOutcomeUnknown` and is not run again (until session 15 it ran
    again: row 1 twice). With the transaction replay on, the transcript keeps the read and a
    lost COMMIT's own resolution (`UnsentCommit`) asks by it: the same. Every face, asyncpg's
    and psycopg's async adapters too."""
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    steps = ["INSERT INTO ledger VALUES (1)", _raw_commit_then_raw_insert(2), *THEN[then]]
    policy = dataclasses.replace(
        resolving_policy(recorder),
        pool=dropsafe.PoolPolicy(read_xid_in_flight=True, replay_transaction=replay_transaction),
    )
    unit = Unit(driver, url_of(server, driver), steps, policy=policy)
    outcome = _run_with_the_commit_lost(unit, kernel_blackhole)
    written = [rows(server, 1), rows(server, 2), rows(server, 3)]
    assert (outcome, unit.calls, recorder.outcomes(), written) == (
        APP_COMMITTED,
        1,
        ["aborted"],
        [1, 0, 0],
    )


def _a_duplicate_in_a_savepoint(session):
    """A savepoint whose INSERT fails (a duplicate key), rolled back: the unit goes on."""
    savepoint = session.begin_nested()
    try:
        session.execute(sa.text("INSERT INTO once VALUES (5)"))
    except sa.exc.IntegrityError:
        savepoint.rollback()
    else:
        pytest.fail("the duplicate key was accepted")


@pytest.mark.shares_server
@pytest.mark.parametrize("replay_transaction", [False, True], ids=["unit", "transcript"])
@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_statement_that_failed_in_a_savepoint_keeps_the_read(
    postgres_server, kernel_blackhole, driver, replay_transaction, marks
):
    """INSERT 1 (the read), a savepoint whose INSERT fails and is rolled back, a SELECT (no
    write after: nothing would read again), the COMMIT's reply lost: resolved 'committed' by
    the read, no mark sent. The failed statement's bytes are the engine's: counted after it as
    any statement's, never taken for bytes sent around SQLAlchemy (before that count, the read
    was dropped and the mark paid its round trip: 1 mark, psycopg2)."""
    server = postgres_server
    server.execute(
        SLOW_COMMIT_SCHEMA + "CREATE TABLE once (v int PRIMARY KEY); INSERT INTO once VALUES (5);"
    )
    recorder = Recorder()
    steps = ["INSERT INTO ledger VALUES (1)", _a_duplicate_in_a_savepoint, "SELECT 1"]
    resolved = _lost_reply_unit(
        server, kernel_blackhole, driver, steps, recorder, replay_transaction=replay_transaction
    )
    assert (resolved, rows(server, 1), len(marks)) == (("acknowledged", 1, ["committed"]), 1, 0)


# -- savepoints: the xid read inside one, the savepoint rolled back -----------------------------


@pytest.mark.shares_server
@pytest.mark.parametrize("nested", ["text", "begin_nested"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_first_write_in_a_savepoint_rolled_back_is_resolved_by_the_top_transaction(
    postgres_server, chaos_proxy, driver, nested
):
    """The first write (the read) inside a savepoint that is rolled back, then the real write.

    The xid read inside a subtransaction must be the top transaction's (the one COMMIT ends),
    so a COMMIT cut while the server runs it is resolved as committed, run once.
    """
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(read_xid_in_flight=True),
        unit=dropsafe.UnitPolicy(commit_status_timeout=30, deadline=60),
        hooks=(recorder,),
    )

    def in_a_rolled_back_savepoint(session):
        savepoint = session.begin_nested()
        session.execute(sa.text("INSERT INTO ledger VALUES (7)"))
        savepoint.rollback()

    if nested == "text":
        steps = [
            "SAVEPOINT before_seven",
            "INSERT INTO ledger VALUES (7)",
            "ROLLBACK TO SAVEPOINT before_seven",
        ]
    else:
        steps = [in_a_rolled_back_savepoint]
    steps += ["SET LOCAL test.commit_sleep = '2'", "INSERT INTO ledger VALUES (1)"]
    watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
    unit = Unit(driver, chaos_proxy.route(server.url(driver)), steps, policy=policy)
    assert unit.run() == "done"
    watcher.join(timeout=30)
    assert (rows(server, 1), rows(server, 7), unit.calls) == (1, 0, 1)
    assert recorder.outcomes() == ["committed"]


# -- a pooler the policy was not told of (PgBouncer in session mode, pooler=None) ---------------


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_commit_lost_behind_an_undeclared_session_pooler_is_fenced_and_run_again(
    postgres_server, kernel_blackhole, driver, reads, pool_mode
):
    """Behind PgBouncer in session mode with ConnectionPolicy.pooler left None, a COMMIT lost
    before it reached the server leaves the backend idle in its transaction: fenced, 'aborted',
    run again. Before the fix (the read in flight reads pg_backend_pid() with the xid) its pid
    was the driver's, PgBouncer's BackendKeyData (a random number): the fence terminated
    nothing, and the xid stayed 'in progress' until commit_status_timeout:
    CommitOutcomeUnknown. PgBouncer's random pid is read by the driver half as a positive
    number (before the fix the read in flight then stood), half not (the mark read): the
    engine's one connection is made until it is positive, so the attack is the same every
    run. In transaction mode too (each transaction may run on another backend: the pid read
    with the xid is the one its transaction ran on; before, 'unknown' there as well)."""
    recorder = Recorder()
    postgres_server.execute(SLOW_COMMIT_SCHEMA)
    holes = contextlib.ExitStack()
    calls = []

    def unit(session):
        calls.append(1)
        session.execute(sa.text("INSERT INTO ledger VALUES (1)"))

    with PgBouncer(postgres_server, pool_mode=pool_mode) as bouncer:
        engine = dropsafe.create_engine(
            bouncer.url(driver), policy=_policy(recorder, reads), pool_size=1, max_overflow=0
        )
        try:
            for _ in range(40):  # each try a new client of PgBouncer: 2**-40 all non-positive
                # A unit first: a connection made once the engine ran one learns at connect
                # what the read needs (its server's life; on psycopg2, leave to run DO).
                dropsafe.run_transaction(
                    sessionmaker(engine), lambda s: s.execute(sa.text("SELECT 1"))
                )
                with engine.connect() as connection:
                    if backend_pid(connection) > 0:
                        break
                engine.dispose()
            else:
                pytest.fail("PgBouncer never handed out a positive pid")
            lose_the_first_reply(holes, kernel_blackhole, "both")(engine)
            outcome = "unknown"
            with contextlib.suppress(dropsafe.CommitOutcomeUnknown), holes:
                dropsafe.run_transaction(sessionmaker(engine), unit)
                outcome = "acknowledged"
        finally:
            engine.dispose()
    assert (outcome, len(calls), recorder.outcomes(), rows(postgres_server, 1)) == (
        "acknowledged",
        2,
        ["aborted"],
        1,
    )


# -- a first write that writes no WAL, then a NOTIFY; a crash once the COMMIT is done ----------

# A view whose INSTEAD OF trigger writes only a value not there yet (an idempotent "put"): the
# INSERT counts its row, and writes nothing when the value is there. Its body neither notifies
# nor names synchronous_commit (the resolver's question about the server's code says no).
ONCE_VIEW = """
CREATE VIEW ledger_once AS SELECT v FROM ledger;
CREATE FUNCTION ledger_once_put() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NOT EXISTS (SELECT FROM ledger WHERE v = NEW.v) THEN
    INSERT INTO ledger VALUES (NEW.v);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER ledger_once_put INSTEAD OF INSERT ON ledger_once
  FOR EACH ROW EXECUTE FUNCTION ledger_once_put();
INSERT INTO ledger VALUES (4);
"""
# Hint bits set and a checkpoint taken now: the unit's read of the page writes no WAL of its own.
QUIET_PAGES = "SELECT count(*) FROM ledger; CHECKPOINT"


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_first_write_that_wrote_nothing_then_a_notify_leaves_a_crashed_commit_unknown(
    kernel_blackhole, driver, reads
):
    """The unit's first write is an INSERT into a view whose INSTEAD OF trigger wrote nothing
    (the value was there: rowcount 1, no WAL), then a NOTIFY. psycopg2 and asyncpg read the xid
    BEFORE the statement, so the read gave the transaction its xid with synchronous_commit on
    and, the rowcount being 1, did not mark it asynchronous; its COMMIT waited for no WAL (none
    written before the commit record), the crash lost it. Before the fix the xid read 'aborted'
    and the unit ran again ('acknowledged', 2, ['aborted']): NOTIFY sent twice. Now a unit that
    may notify is unflushed (`recording._unflushed_if_notifying`): unknown, run once."""
    steps = ["INSERT INTO ledger_once VALUES (4)", "SELECT pg_notify('dropsafe_test', 'put')"]
    with PostgresServer(settings=CRASH_SETTINGS) as server:
        server.execute(SLOW_COMMIT_SCHEMA + ONCE_VIEW)
        server.execute(QUIET_PAGES)
        crashed = _crashed_after_commit(server, kernel_blackhole, driver, steps, reads=reads)
    assert crashed == ("unknown", 1, ["unknown"])


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_an_unlogged_write_then_a_notify_leaves_a_crashed_commit_unknown(
    kernel_blackhole, driver, reads
):
    """Found while attacking issue 28, but older than it (the mark too): a unit whose only write
    is to an UNLOGGED table, then a NOTIFY. The write takes an xid but writes no WAL, so
    PostgreSQL's COMMIT waits for no flush (RecordTransactionCommit: no WAL before the record);
    the crash lost the commit record after the NOTIFY could be heard. Before the fix the xid
    read 'aborted' (an xid, synchronous_commit on) and the unit ran again: NOTIFY sent twice."""
    steps = ["INSERT INTO scratch VALUES (1)", "SELECT pg_notify('dropsafe_test', 'scratch')"]
    with PostgresServer(settings=CRASH_SETTINGS) as server:
        server.execute(SLOW_COMMIT_SCHEMA + "CREATE UNLOGGED TABLE scratch (v int);")
        crashed = _crashed_after_commit(server, kernel_blackhole, driver, steps, reads=reads)
    assert crashed == ("unknown", 1, ["unknown"])


# -- the unit's connection lost under it: the unit runs again on a fresh connection ---------


def _terminate_backend(server, connection):
    """Terminate ``connection``'s backend from the server, and wait until it is gone."""
    pid = backend_pid(connection)
    server.execute(f"SELECT pg_terminate_backend({pid}, 10000)")
    wait_until(
        lambda: not server.execute(f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"),
        10,
        "the backend to exit",
    )


def _terminate_own_backend_once(server):
    """A step: the unit's backend terminated (and gone) before its next step; its first run
    only."""
    done = []

    def step(session):
        if not done:
            done.append(1)
            _terminate_backend(server, session.connection())

    return step


def _lost_reply_unit(server, kernel_blackhole, driver, steps, recorder, **pool):
    """Run a unit of ``steps`` whose first COMMIT reply is lost (the server did it): its
    outcome, its runs, the resolver's outcomes. ``pool``: PoolPolicy fields (the read in
    flight on unless said)."""
    pool.setdefault("read_xid_in_flight", True)
    policy = dataclasses.replace(resolving_policy(recorder), pool=dropsafe.PoolPolicy(**pool))
    unit = Unit(driver, url_of(server, driver), steps, policy=policy)
    holes = contextlib.ExitStack()
    outcome = "unknown"
    with contextlib.suppress(dropsafe.CommitOutcomeUnknown), holes:
        unit.run(before_commit=lose_the_first_reply(holes, kernel_blackhole))
        outcome = "acknowledged"
    return outcome, unit.calls, recorder.outcomes()


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_unit_whose_connection_died_mid_transaction_is_resolved_by_the_new_xid(
    postgres_server, kernel_blackhole, driver
):
    """INSERT 1 (xid A read in flight), the backend terminated, INSERT 2, with the transaction
    replay on: the unit's attempt fails there and the unit runs again on a fresh connection
    (xid B; the transaction replay stays out of a unit, TransactionReplayed never emitted),
    then the COMMIT's reply is lost. A (aborted with its backend) would have it run a third
    time, or, kept by a transcript across the attempts, acknowledged with rows missing.
    """
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    steps = [
        "INSERT INTO ledger VALUES (1)",
        _terminate_own_backend_once(server),
        "INSERT INTO ledger VALUES (2)",
    ]
    recorder = Recorder()
    resolved = _lost_reply_unit(
        server, kernel_blackhole, driver, steps, recorder, replay_transaction=True
    )
    assert (resolved, rows(server, 1), rows(server, 2)) == (
        ("acknowledged", 2, ["committed"]),
        1,
        1,
    )


@pytest.mark.shares_server
@pytest.mark.parametrize("replay_transaction", [False, True], ids=["first", "transaction"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_first_write_lost_with_its_connection_then_run_again_is_resolved_by_the_new_xid(
    postgres_server, kernel_blackhole, driver, replay_transaction
):
    """The unit's backend ends after its checkout, before its first statement: that INSERT,
    which carries the read, fails on the lost connection; the unit runs again on a fresh one
    (no FirstStatementReplayed inside a unit: the unit's own retry), and that COMMIT's reply is
    lost. Whatever the lost connection's attempt read must not resolve it: the fresh
    transaction is committed, its row there once."""
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    steps = [_terminate_own_backend_once(server), "INSERT INTO ledger VALUES (1)"]
    resolved = _lost_reply_unit(
        server, kernel_blackhole, driver, steps, recorder, replay_transaction=replay_transaction
    )
    assert (resolved, rows(server, 1)) == (("acknowledged", 2, ["committed"]), 1)


# -- the transaction ended around SQLAlchemy by a raw ROLLBACK, then written again --------------


def _raw_rollback_then_slow_raw_write(session):
    """ROLLBACK through the DBAPI connection, then a write (with a 2 s COMMIT) through a raw
    cursor: a new transaction SQLAlchemy never sees begin."""
    dbapi_connection = session.connection().connection.dbapi_connection
    dbapi_connection.rollback()
    cursor = dbapi_connection.cursor()
    cursor.execute("SET LOCAL test.commit_sleep = '2'")
    cursor.execute("INSERT INTO ledger VALUES (1)")
    cursor.close()


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_raw_dbapi_rollback_then_a_raw_write_is_resolved_by_the_new_transaction(
    postgres_server, chaos_proxy, driver, reads
):
    """INSERT 7 (xid A read in flight), the DBAPI connection's own rollback() (A aborted; no
    SQLAlchemy event), INSERT 1 through a raw cursor (xid B), the COMMIT cut while the server
    ran it: the server committed B. Before the fix (bytes sent around SQLAlchemy drop the
    read) the resolver asked about A, read 'aborted', and the unit ran again: row 1 twice."""
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    policy = dropsafe.Policy(
        unit=dropsafe.UnitPolicy(commit_status_timeout=30, deadline=60),
        pool=dropsafe.PoolPolicy(read_xid_in_flight=reads),
        hooks=(recorder,),
    )
    steps = ["INSERT INTO ledger VALUES (7)", _raw_rollback_then_slow_raw_write]
    watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
    unit = Unit(driver, chaos_proxy.route(server.url(driver)), steps, policy=policy)
    assert unit.run() == "done"
    watcher.join(timeout=30)
    assert (rows(server, 1), rows(server, 7), unit.calls, recorder.outcomes()) == (
        1,
        0,
        1,
        ["committed"],
    )


def _raw_rollback_then_raw_write(session):
    """ROLLBACK through the DBAPI connection, then a write through a raw cursor."""
    dbapi_connection = session.connection().connection.dbapi_connection
    dbapi_connection.rollback()
    cursor = dbapi_connection.cursor()
    cursor.execute("INSERT INTO ledger VALUES (2)")
    cursor.close()


@pytest.mark.shares_server
@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_raw_dbapi_rollback_then_a_raw_write_whose_commit_is_lost_runs_again(
    postgres_server, kernel_blackhole, driver, reads
):
    """INSERT 7 (xid A read in flight), the DBAPI connection's own rollback() (A aborted),
    INSERT 2 through a raw cursor (xid B), the COMMIT lost before it reached the server: B
    aborted, and A, dropped and asked about too, aborted: nothing of the unit is durable, and
    it runs again whole (the dropped read must not turn a rollback into an error): row 2
    once, row 7 never (the app rolls it back in each run)."""
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    steps = ["INSERT INTO ledger VALUES (7)", _raw_rollback_then_raw_write]
    unit = Unit(driver, url_of(server, driver), steps, policy=_policy(recorder, reads))
    holes = contextlib.ExitStack()
    with holes:
        assert unit.run(before_commit=lose_the_first_reply(holes, kernel_blackhole, "both"))
    assert (unit.calls, recorder.outcomes(), rows(server, 2), rows(server, 7)) == (
        2,
        ["aborted"],
        1,
        0,
    )


# -- the role changed inside the unit: may it still run the read? -------------------------------

TENANT = """
CREATE ROLE tenant NOLOGIN;
GRANT INSERT, SELECT ON ledger TO tenant;
REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
"""


@pytest.mark.parametrize(
    ("driver", "reads"),
    [
        pytest.param("psycopg2", True, id="psycopg2-in_flight"),
        pytest.param("psycopg2", False, id="psycopg2-mark"),
        pytest.param("psycopg", True, id="psycopg-in_flight"),
        pytest.param("asyncpg", True, id="asyncpg-in_flight"),
    ],
)
def test_a_unit_that_sets_a_role_without_plpgsql_writes_as_before(driver, reads):
    """'SET LOCAL ROLE tenant' (row-level security's usual shape) to a role without USAGE on
    plpgsql (REVOKE ... FROM PUBLIC, a common hardening), then the unit's first INSERT:
    psycopg2's read is a DO block in front of it. Before the fix the leave was learned at
    connect for the session's user alone, and the app's INSERT failed with 'permission denied
    for language plpgsql' (42501, not retried). Now it is learned for every role the user may
    become (`server_facts._DO_BLOCKS`): none here, the mark reads the xid."""
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA + TENANT)
        unit = Unit(
            driver,
            server.url(driver),
            ["SET LOCAL ROLE tenant", "INSERT INTO ledger VALUES (1)"],
            policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(read_xid_in_flight=reads)),
        )
        assert unit.run() == "done"
        assert (rows(server, 1), unit.calls) == (1, 1)


def _set_role_at_connect(engine):
    """The app's own pool listener, added after dropsafe's: each new session as ``tenant``."""

    @sa.event.listens_for(engine, "connect")
    def as_tenant(dbapi_connection, record):
        del record
        cursor = dbapi_connection.cursor()
        cursor.execute("SET ROLE tenant")
        cursor.close()
        dbapi_connection.commit()


@pytest.mark.parametrize(
    "reads",
    [
        pytest.param(True, id="in_flight"),
        pytest.param(False, id="mark"),
    ],
)
def test_a_session_whose_role_the_app_sets_at_connect_writes_as_before(reads):
    """The app's own 'connect' listener (added after dropsafe's, as any app's is) runs SET ROLE
    tenant, a role without USAGE on plpgsql. Before the fix dropsafe learned at connect, before
    it, that the session may run DO blocks, so psycopg2's read went in front of every unit's
    first write and each failed with 42501. Now the leave covers every role the session's user
    may become: no DO block on such a server, the mark."""
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA + TENANT)
        unit = Unit(
            "psycopg2",
            server.url("psycopg2"),
            ["INSERT INTO ledger VALUES (1)"],
            policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(read_xid_in_flight=reads)),
        )
        assert unit.run(before_commit=_set_role_at_connect) == "done"
        assert (rows(server, 1), unit.calls) == (1, 1)


# -- the ORM's flush at COMMIT as the unit's only write -----------------------------------------


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "orm_ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    v: Mapped[int]


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", DRIVERS)
def test_an_orm_flush_at_commit_as_the_only_write_is_resolved_by_its_xid(
    postgres_server, kernel_blackhole, driver, marks
):
    """The function only adds an object: its INSERT is sent by the flush inside the unit's
    COMMIT (after the function returned), and carries the read (no mark sent: the COMMIT
    listener runs after the flush); that COMMIT's reply is lost. Resolved committed by the
    flush's xid, run once."""
    server = postgres_server
    server.execute("CREATE TABLE orm_ledger (id serial PRIMARY KEY, v int NOT NULL)")
    recorder = Recorder()
    steps = [lambda session: session.add(_Row(v=1))]
    resolved = _lost_reply_unit(
        server, kernel_blackhole, driver, steps, recorder, read_xid_in_flight=True
    )
    count = server.execute("SELECT count(*) FROM orm_ledger WHERE v = 1")[0][0]
    assert (resolved, int(count), len(marks)) == (("acknowledged", 1, ["committed"]), 1, 0)


# -- an executemany (not read), then a single write (read) --------------------------------------


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", ALL_FACES)
def test_an_executemany_then_a_single_write_is_resolved_by_the_single_writes_read(
    postgres_server, kernel_blackhole, driver
):
    """The driver's own batch carries no read; the single INSERT after it does, in the same
    transaction (the xid the batch took): a lost COMMIT reply resolved committed, run once."""
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    steps = [
        ("INSERT INTO ledger VALUES (:v)", [{"v": 1}, {"v": 2}]),
        "INSERT INTO ledger VALUES (3)",
    ]
    resolved = _lost_reply_unit(server, kernel_blackhole, driver, steps, recorder)
    assert (resolved, [rows(server, v) for v in (1, 2, 3)]) == (
        ("acknowledged", 1, ["committed"]),
        [1, 1, 1],
    )


@pytest.mark.parametrize("reads", [True, False], ids=["in_flight", "mark"])
@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_an_unlogged_write_that_notifies_nothing_runs_again_after_a_crash(
    kernel_blackhole, driver, reads
):
    """The same unit without its NOTIFY: the crash lost its commit (no WAL, no flush), and
    nobody heard of it, so 'aborted' stands and the unit runs again, once more, as before the
    rule for units that may notify (which must not take every unit for one)."""
    steps = ["INSERT INTO scratch VALUES (1)"]
    with PostgresServer(settings=CRASH_SETTINGS) as server:
        server.execute(SLOW_COMMIT_SCHEMA + "CREATE UNLOGGED TABLE scratch (v int);")
        crashed = _crashed_after_commit(server, kernel_blackhole, driver, steps, reads=reads)
    assert crashed == ("acknowledged", 2, ["aborted"])


def _a_conflict_on_the_first_run(runs):
    """A step: a serialization failure raised through the Session (retryable), first run only."""

    def step(session):
        runs.append(1)
        if len(runs) == 1:
            session.execute(
                sa.text("DO $$BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END$$")
            )

    return step


@pytest.mark.parametrize("driver", ALL_FACES)
def test_a_raw_dbapi_commit_then_a_retryable_error_through_sqlalchemy_is_never_run_again(driver):
    """INSERT 1 (xid A read in flight), the DBAPI connection's commit() (A committed), a raw
    INSERT 2, then a statement through the Session that fails with a serialization failure
    (retryable; the connection stays up): committed by the app, `CommitOutcomeUnknown`, run
    once. Held since session 15 (the Session's statement drops A before it is sent, and a
    dropped read is asked about); kept as the single-engine neighbour of the unit over two
    engines whose other connection raised (tests/units/test_units_over_engines.py)."""
    recorder = Recorder()
    runs = []
    steps = [
        "INSERT INTO ledger VALUES (1)",
        _raw_commit_then_raw_insert(2),
        _a_conflict_on_the_first_run(runs),
    ]
    with PostgresServer() as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        unit = Unit(driver, url_of(server, driver), steps, policy=_policy(recorder, reads=True))
        outcome = "acknowledged"
        try:
            unit.run()
        except dropsafe.CommitOutcomeUnknown as unknown:
            outcome = unknown.reason
        written = [rows(server, 1), rows(server, 2)]
    assert (outcome, unit.calls, written) == (APP_COMMITTED, 1, [1, 0]), recorder.outcomes()
