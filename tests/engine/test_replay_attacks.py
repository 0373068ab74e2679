"""Attacks on the first-statement replay and the quiet ROLLBACK (issue 20), as an adversary.

Each test loses a real connection (backend terminated, socket cut by the proxy, server
crashed) at the moment that hurts most, and asserts what the app must be able to rely on: a
write it saw succeed is on the server, once; what is raised is raised; nothing is replayed
that is not a transaction's first statement. The bugs these attacks found are fixed (issue
20, docs/guarantees.md); the one left ``xfail(strict=True)`` needs a change in SQLAlchemy, named
in its reason. The others are the proof that the guarantee held.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
import warnings

import pytest
import sqlalchemy as sa
from replay_faults import (
    before_statement,
    cut_from_another_thread_once,
    failed_replays,
    items_model,
    lose,
    lose_before,
    module_server,
    numbers,
    poll_until,
    replay_async_engine,
    replay_engine,
    replayed,
    wait_until_running,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

import dropsafe
from dropsafe._drivers import driver_names
from dropsafe.events import PingSucceeded, RollbackConnectionLost

pytestmark = pytest.mark.fault

ISOLATION = sa.text("SELECT current_setting('transaction_isolation')")


Base, Item = items_model("attack_items")


class Audit(Base):
    __tablename__ = "attack_audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    what: Mapped[str]


ITEMS = Item.__table__


server, _empty = module_server(Base.metadata, empty="TRUNCATE attack_items, attack_audit")


@pytest.fixture
def events():
    """What the test's engine said."""
    return []


def _losing(create, disposing, server, proxy, events):
    """``create`` (a replay engine factory) made into ``losing_engine``'s ``make``."""

    def make(driver, needle, fault="terminate", **engine_kwargs):
        engine = disposing(create(server, proxy, driver, events, **engine_kwargs))
        lose_before(getattr(engine, "sync_engine", engine), needle, fault, server, proxy)
        return engine

    return make


@pytest.fixture
def losing_engine(server, proxy, events, disposing):
    """``losing_engine(driver, needle, fault="terminate", **engine_kwargs)``: a replay engine
    (disposed at the test's end, its events in ``events``) whose connection is lost right
    before the first statement holding ``needle``."""
    return _losing(replay_engine, disposing, server, proxy, events)


@pytest.fixture
def losing_async_engine(server, proxy, events, disposing_async):
    """``losing_engine``'s async twin."""
    return _losing(replay_async_engine, disposing_async, server, proxy, events)


def _items(server):
    return numbers(server, "attack_items")


def _audit(server):
    return sorted(what for (what,) in server.execute("SELECT what FROM attack_audit"))


def _refuse_and_cut(proxy):
    """No fresh connection can be made, and the ones there are cut."""
    proxy.refuse()
    assert proxy.cut("rst") >= 1


def _policy_noting(events, **connection):
    """A policy with these ConnectionPolicy settings, its events appended to ``events``."""
    return dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(**connection), hooks=(events.append,)
    )


def _seconds_to_a_loud_commit(engine):
    """Add an item and commit in a Session: the commit must raise; how long until it did."""
    started = time.monotonic()
    with Session(engine) as session:
        session.add(Item(n=1))
        with pytest.raises(sa.exc.OperationalError):
            session.commit()
        elapsed = time.monotonic() - started
        session.rollback()
    return elapsed


def _the_same_session_writes_again(session):
    """The next use of a Session whose statement failed works (on a fresh connection): 2."""
    session.add(Item(n=2))
    session.commit()


def _raw_cursor_execute(sa_connection, sql):
    """Run ``sql`` on the driver's connection under ``sa_connection``, as apps do for COPY."""
    cursor = sa_connection.connection.dbapi_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


# -- writes that did not go through SQLAlchemy's execute, before the "first" statement ------


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_raw_driver_write_in_after_begin_is_not_lost_by_the_replay(server, driver, losing_engine):
    engine = losing_engine(driver, "INSERT INTO attack_items")
    with Session(engine) as session:

        @event.listens_for(session, "after_begin")
        def audit(session, transaction, connection):
            _raw_cursor_execute(connection, "INSERT INTO attack_audit (what) VALUES ('begun')")

        session.add(Item(n=1))
        try:
            session.commit()
        except sa.exc.DBAPIError:
            committed = False  # loud: acceptable, nothing may be half-there
        else:
            committed = True
    if committed:
        assert (_items(server), _audit(server)) == ([1], ["begun"])
    else:
        assert (_items(server), _audit(server)) == ([], [])


def test_copy_through_the_driver_then_first_statement_is_not_lost_by_the_replay(
    server, losing_engine
):
    engine = losing_engine("psycopg", "INSERT INTO attack_items", fault="cut")
    try:
        with Session(engine) as session:
            raw = session.connection().connection.dbapi_connection
            with (
                raw.cursor() as cursor,
                cursor.copy("COPY attack_audit (what) FROM STDIN") as copy,
            ):
                for what in ("c1", "c2", "c3"):
                    copy.write_row((what,))
            session.add(Item(n=7))
            session.commit()
    except sa.exc.DBAPIError:
        assert (_items(server), _audit(server)) == ([], [])
    else:
        assert (_items(server), _audit(server)) == ([7], ["c1", "c2", "c3"])


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_raw_write_in_before_cursor_execute_is_not_lost_by_the_replay(
    server, proxy, driver, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    written = [False]

    @event.listens_for(engine, "before_cursor_execute")
    def audit(conn, cursor, statement, parameters, context, executemany):  # noqa: PLR0917
        if not written[0] and "INSERT INTO attack_items" in statement:
            written[0] = True
            cursor.execute("INSERT INTO attack_audit (what) VALUES ('before')")

    lose_before(engine, "INSERT INTO attack_items", "terminate", server, proxy)
    try:
        with engine.begin() as conn:
            conn.execute(ITEMS.insert().values(n=2))
    except sa.exc.DBAPIError:
        assert (_items(server), _audit(server)) == ([], [])
    else:
        assert (_items(server), _audit(server)) == ([2], ["before"])


def test_raw_set_transaction_isolation_survives_the_replay(losing_engine):
    engine = losing_engine("psycopg", "transaction_isolation", fault="cut")
    with Session(engine) as session:

        @event.listens_for(session, "after_begin")
        def serializable(session, transaction, connection):
            _raw_cursor_execute(connection, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")

        try:
            level = session.execute(ISOLATION).scalar()
        except sa.exc.DBAPIError:
            level = "raised"  # loud is fine
    assert level in ("serializable", "raised")


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_raw_write_in_after_begin_is_not_lost_by_the_replay(
    server, driver, losing_async_engine
):
    engine = losing_async_engine(driver, "INSERT INTO attack_items")
    async with AsyncSession(engine) as session:

        @event.listens_for(session.sync_session, "after_begin")
        def audit(session, transaction, connection):
            _raw_cursor_execute(connection, "INSERT INTO attack_audit (what) VALUES ('async')")

        session.add(Item(n=3))
        try:
            await session.commit()
        except sa.exc.DBAPIError:
            committed = False
        else:
            committed = True
    expected = ([3], ["async"]) if committed else ([], [])
    assert (_items(server), _audit(server)) == expected


# -- what is not a first statement must stay loud -----------------------------------------


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_statement_after_set_local_is_not_replayed_and_the_session_recovers(
    server, driver, losing_engine, events
):
    engine = losing_engine(driver, "INSERT INTO attack_items")
    with Session(engine) as session:
        session.execute(sa.text("SET LOCAL search_path TO pg_catalog, public"))
        session.add(Item(n=1))
        with pytest.raises(sa.exc.OperationalError):
            session.flush()
        session.rollback()
        _the_same_session_writes_again(session)
    assert _items(server) == [2]
    assert replayed(events) == []


def test_statement_after_an_engine_connect_listener_sql_is_notreplayed(server, proxy, disposing):
    # The app's listener runs SQL on the SQLAlchemy Connection as soon as it is made: that is
    # the transaction's first statement; the app's INSERT is the second and must stay loud.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))

    @event.listens_for(engine, "engine_connect")
    def stamp(conn):
        conn.exec_driver_sql("INSERT INTO attack_audit (what) VALUES ('connect')")

    lose_before(engine, "INSERT INTO attack_items", "cut", server, proxy)
    with engine.connect() as conn:
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(ITEMS.insert().values(n=1))
        conn.rollback()
    assert (_items(server), _audit(server)) == ([], [])
    assert replayed(events) == []


@pytest.mark.parametrize("fault", ["terminate", "cut"])
def test_lost_rollback_to_savepoint_stays_loud_and_commit_cannot_succeed(
    server, proxy, fault, disposing
):
    # A ROLLBACK TO SAVEPOINT on a lost connection is not the end of a transaction: the app
    # goes on with the outer one. Made quiet, the app's later commit could report success for
    # a transaction the server aborted. It must raise, and nothing may be on the server.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg", events))
    with Session(engine) as session:
        session.add(Item(n=1))
        session.flush()
        nested = session.begin_nested()
        session.add(Item(n=2))
        session.flush()
        lose(fault, server, proxy)
        try:
            nested.rollback()
        except sa.exc.DBAPIError:
            rolled_back_loudly = True
        else:
            rolled_back_loudly = False
        with pytest.raises(sa.exc.SQLAlchemyError):
            session.commit()
    assert _items(server) == []
    # Whether the savepoint's rollback raised or not, the commit was loud; record which.
    assert rolled_back_loudly or replayed(events) == []


# -- replayed, and the same transaction goes on correctly ---------------------------------


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_isolation_level_of_create_engine_holds_in_the_replayed_transaction(
    server, driver, losing_engine, events
):
    engine = losing_engine(driver, "transaction_isolation", isolation_level="SERIALIZABLE")
    with Session(engine) as session, session.begin():
        assert session.execute(ISOLATION).scalar() == "serializable"
        session.add(Item(n=1))
    assert _items(server) == [1]
    assert len(replayed(events)) == 1


@pytest.mark.parametrize(
    "engine_kwargs",
    [{"pool_pre_ping": True}, {"poolclass": NullPool}, {"pool_timeout": 1}],
    ids=["pre_ping", "nullpool", "pool-of-one-timeout-1s"],
)
def test_replay_with_other_pool_setups(server, engine_kwargs, losing_engine, events):
    engine = losing_engine("psycopg", "INSERT INTO attack_items", fault="cut", **engine_kwargs)
    started = time.monotonic()
    with Session(engine) as session:
        session.add(Item(n=1))
        session.commit()
    assert time.monotonic() - started < 10  # no wait for a pool slot held by itself
    assert _items(server) == [1]
    assert len(replayed(events)) == 1
    # The pool's books balance: nothing is left checked out, and a pool of one still
    # hands its connection out (twice, so a leaked slot would time out).
    for n in (2, 3):
        with Session(engine) as session:
            session.add(Item(n=n))
            session.commit()
    assert _items(server) == [1, 2, 3]
    if engine_kwargs.get("poolclass") is not NullPool:
        assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_begin_nested_as_first_statement_replayed_then_both_levels_commit(
    server, driver, losing_engine, events
):
    engine = losing_engine(driver, "SAVEPOINT")
    with Session(engine) as session:
        with session.begin_nested():  # SAVEPOINT: the transaction's first statement
            session.add(Item(n=1))
        session.add(Item(n=2))
        session.commit()
    assert _items(server) == [1, 2]
    assert len(replayed(events)) == 1


# The lost connection's server-side cursor is never closed (see the test below).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_server_side_cursor_first_statementreplayed(server, driver, losing_engine, events):
    server.execute("INSERT INTO attack_items (n) SELECT g FROM generate_series(1, 50) g")
    engine = losing_engine(driver, "FROM attack_items")
    with engine.connect() as conn:
        streamed = sa.select(ITEMS.c.n).order_by(ITEMS.c.n)
        result = conn.execute(streamed.execution_options(stream_results=True, max_row_buffer=7))
        assert [n for (n,) in result] == list(range(1, 51))
        conn.execute(ITEMS.insert().values(n=100))
        conn.commit()
    assert _items(server) == [*range(1, 51), 100]
    assert len(replayed(events)) == 1


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_run_sync_first_statementreplayed(server, driver, losing_async_engine, events):
    engine = losing_async_engine(driver, "INSERT INTO attack_items", fault="cut", pool_timeout=2)
    async with engine.connect() as conn:
        await conn.run_sync(lambda c: c.execute(ITEMS.insert().values(n=1)))
        await conn.run_sync(lambda c: c.execute(ITEMS.insert().values(n=2)))
        await conn.commit()
    assert _items(server) == [1, 2]
    assert len(replayed(events)) == 1
    assert engine.sync_engine.pool.checkedout() == 0


def test_psycopg_pipeline_mode_first_statement(server, losing_engine):
    # The app enters psycopg's pipeline mode on the driver's connection. Whatever happens,
    # what the app sees must match the server: success with the rows, or an error without.
    engine = losing_engine("psycopg", "INSERT INTO attack_items")
    try:
        with engine.connect() as conn:
            with conn.connection.dbapi_connection.pipeline():
                conn.execute(ITEMS.insert().values(n=1))
                conn.execute(ITEMS.insert().values(n=2))
            conn.commit()
    except sa.exc.SQLAlchemyError:
        assert _items(server) == []
    except Exception as exc:
        assert type(exc).__module__.startswith("psycopg")
        assert _items(server) == []
    else:
        assert _items(server) == [1, 2]


def test_replay_closes_the_lost_server_side_cursor(server, losing_engine, events):
    server.execute("INSERT INTO attack_items (n) VALUES (1)")
    engine = losing_engine("psycopg", "FROM attack_items")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with engine.connect() as conn:
            streamed = sa.select(ITEMS.c.n).execution_options(stream_results=True)
            assert conn.execute(streamed).scalars().all() == [1]
        gc.collect()
    assert len(replayed(events)) == 1
    leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == [], [str(w.message) for w in leaked]


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_raw_session_set_on_this_checkout_is_not_lost_by_the_replay(
    server, driver, losing_engine, events
):
    server.execute(
        "CREATE SCHEMA IF NOT EXISTS attack_s; "
        "CREATE TABLE IF NOT EXISTS attack_s.attack_items (n int); "
        "TRUNCATE attack_s.attack_items"
    )
    engine = losing_engine(driver, "INSERT INTO attack_items")
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        _raw_cursor_execute(conn, "SET search_path TO attack_s")
        raw.commit()
        try:
            conn.exec_driver_sql("INSERT INTO attack_items (n) VALUES (5)")
            conn.commit()
        except sa.exc.DBAPIError:
            committed = False  # loud: acceptable (the replay refused), nothing written
        else:
            committed = True
    in_schema = server.execute("SELECT count(*) FROM attack_s.attack_items")
    expected = [("1",)] if committed else [("0",)]
    assert (in_schema, _items(server), replayed(events)) == (expected, [], [])


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_checkout_listener_raw_session_setting_holds_on_the_replay(
    server, proxy, driver, disposing
):
    # A common multi-tenant pattern: the app's checkout listener sets a session variable
    # through the driver's connection. The fresh connection passes the same listener, so a
    # replay sees the setting. (Today it is replayed; a fix for the raw-write bugs above that
    # refuses when the driver's connection is in a transaction makes this loud instead, which
    # is safe too. What must never happen: a replay that lacks the setting.)
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))

    @event.listens_for(engine, "checkout")
    def tenant(dbapi_connection, entry, proxied):
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT set_config('app.tenant', 'acme', false)")
        cursor.close()

    lose_before(engine, "app.tenant", "cut", server, proxy)
    with Session(engine) as session:
        try:
            seen = session.execute(sa.text("SELECT current_setting('app.tenant')")).scalar()
        except sa.exc.OperationalError:
            seen = "raised"
            session.rollback()
        assert seen in ("acme", "raised")
        session.add(Item(n=1))
        session.commit()
    assert _items(server) == [1]
    assert len(replayed(events)) == (1 if seen == "acme" else 0)


def test_first_statement_replayed_once_only(server, proxy, disposing):
    # The first statement itself ends its connection, every time it runs: it is replayed once
    # (the sequence, which no rollback undoes, counts the runs: 2), then the error is raised,
    # and the pool and the Session are fine afterwards.
    server.execute("DROP SEQUENCE IF EXISTS attack_seq; CREATE SEQUENCE attack_seq")
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg", events, pool_timeout=2))
    suicide = sa.text("SELECT nextval('attack_seq'), pg_terminate_backend(pg_backend_pid())")
    with Session(engine) as session:
        with pytest.raises(sa.exc.OperationalError):
            session.execute(suicide)
        session.rollback()
        session.add(Item(n=1))
        session.commit()
    assert server.execute("SELECT last_value FROM attack_seq") == [("2",)]
    assert _items(server) == [1]
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_no_fresh_connection_raises_the_original_error_and_leaks_no_secret(
    server, proxy, driver, caplog
):
    # The replay cannot find a fresh connection (the proxy refuses new ones): the lost
    # connection's error is raised, nothing in logs, events or the error holds the password,
    # and once connections come back the same Session works.
    caplog.set_level(logging.DEBUG, logger="dropsafe")
    events = []
    engine = replay_engine(server, proxy, driver, events, pool_timeout=2)
    before_statement(engine, "INSERT INTO attack_items", lambda conn: _refuse_and_cut(proxy))
    try:
        started = time.monotonic()
        with Session(engine) as session:
            session.add(Item(n=1))
            with pytest.raises(sa.exc.OperationalError) as raised:
                session.commit()
            assert time.monotonic() - started < 20
            session.rollback()
            proxy.heal()
            _the_same_session_writes_again(session)
        assert _items(server) == [2]
        assert replayed(events) == []
        texts = [caplog.text, str(raised.value), repr(events)]
        texts.extend(
            logging.Formatter().formatException(record.exc_info)
            for record in caplog.records
            if record.exc_info
        )
        assert all(server.password not in text for text in texts)
    finally:
        proxy.heal()
        engine.dispose()


@pytest.mark.parametrize("opted_out", [False, True], ids=["default", "opted-out"])
def test_dblink_exec_first_statement_effect_outside_the_transaction(
    server, proxy, opted_out, disposing
):
    # docs/guarantees.md says a first statement with an effect outside its transaction (here a
    # dblink_exec that commits on its own connection) runs twice when the reply is lost after
    # the server ran it, and that dropsafe_replay=False prevents it. Both halves are checked.
    server.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg", events))
    target = f"host={server.socket_dir} port={server.port} user=postgres dbname=postgres"
    remote = sa.text(
        "SELECT dblink_exec(:target, 'INSERT INTO attack_audit (what) VALUES (''remote'')'), "
        "pg_sleep(2) /* dblink_slow */"
    ).execution_options(dropsafe_replay=not opted_out)
    # Cut only once the remote write committed: then this is "the server ran it, the reply was
    # lost" (the backend is in pg_sleep by now); cutting earlier could let the app's error race
    # the remote commit.
    remote_committed = functools.partial(poll_until, server, "SELECT count(*) FROM attack_audit")
    with engine.connect() as conn, cut_from_another_thread_once(proxy, remote_committed) as seen:
        if opted_out:
            with pytest.raises(sa.exc.OperationalError):
                conn.execute(remote, {"target": target})
        else:
            conn.execute(remote, {"target": target})
            conn.commit()
    assert seen == [True]
    assert _audit(server) == (["remote"] if opted_out else ["remote", "remote"])
    assert len(replayed(events)) == (0 if opted_out else 1)


def test_pool_of_one_with_a_waiter_does_not_deadlock_the_replay(server, proxy):
    # A pool of one, no overflow, and another thread already waiting for that one slot when
    # the first statement is lost: the replay checks the lost connection in (the waiter gets
    # it) and waits for it in turn. Both must finish, within the pool timeout, correctly.
    events = []
    engine = replay_engine(server, proxy, "psycopg", events, pool_timeout=5)
    waiter_result = []
    waiting = engine.pool._pool.not_empty  # SQLAlchemy's queue: who waits for a slot

    def wait_for_the_slot():
        with engine.connect() as conn:
            waiter_result.append(conn.execute(sa.text("SELECT 42")).scalar())

    waiter = threading.Thread(target=wait_for_the_slot)

    def lose_once_the_waiter_waits(conn):
        waiter.start()
        deadline = time.monotonic() + 5
        while not waiting._waiters and time.monotonic() < deadline:
            time.sleep(0.005)  # polling a condition with a deadline, not a sleep-wait
        assert waiting._waiters, "the other thread never waited for the pool"
        lose("terminate", server, proxy)

    before_statement(engine, "INSERT INTO attack_items", lose_once_the_waiter_waits)
    try:
        started = time.monotonic()
        with Session(engine) as session:
            session.add(Item(n=1))
            session.commit()
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        assert time.monotonic() - started < 10
        assert waiter_result == [42]
        assert _items(server) == [1]
        assert len(replayed(events)) == 1
        assert engine.pool.checkedout() == 0
    finally:
        waiter.join(timeout=10)
        engine.dispose()


def test_after_begin_listener_sql_makes_the_apps_statement_a_second_one(
    server, losing_engine, events
):
    # The app's after_begin listener runs SQL through the SQLAlchemy Connection: that is the
    # first statement; the app's INSERT, lost, is the second and must stay loud.
    engine = losing_engine("psycopg", "INSERT INTO attack_items")
    with Session(engine) as session:

        @event.listens_for(session, "after_begin")
        def audit(session, transaction, connection):
            connection.exec_driver_sql("INSERT INTO attack_audit (what) VALUES ('begun')")

        session.add(Item(n=1))
        with pytest.raises(sa.exc.OperationalError):
            session.commit()
    assert (_items(server), _audit(server)) == ([], [])
    assert replayed(events) == []


# Found by this file on h12's first version (the statement ran twice: nextval counted 2,
# SQLAlchemy's psycopg2 is_disconnect matched 'closed the connection' in the message); h12's
# "never after an error the server answered" fixed it: now the proof.
def test_a_server_error_that_reads_like_a_disconnect_is_notreplayed(server, proxy):
    server.execute(
        "DROP SEQUENCE IF EXISTS attack_seq; CREATE SEQUENCE attack_seq; "
        "CREATE OR REPLACE FUNCTION attack_refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM nextval('attack_seq'); "
        "RAISE EXCEPTION 'partner closed the connection'; END$$; "
        "DROP TRIGGER IF EXISTS attack_refuse ON attack_audit; "
        "CREATE TRIGGER attack_refuse BEFORE INSERT ON attack_audit "
        "FOR EACH ROW EXECUTE FUNCTION attack_refuse()"
    )
    events = []
    engine = replay_engine(server, proxy, "psycopg2", events)
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql("INSERT INTO attack_audit (what) VALUES ('x')")
        assert server.execute("SELECT last_value FROM attack_seq") == [("1",)]
    finally:
        server.execute("DROP TRIGGER IF EXISTS attack_refuse ON attack_audit")
        engine.dispose()


@pytest.mark.xfail(
    strict=True,
    reason=(
        "BUG: after a replay, the app's after_cursor_execute listeners are given the lost "
        "connection's cursor (SQLAlchemy's _exec_single_context passes the cursor it read "
        "before do_execute, not context.cursor): rowcount -1 instead of 1, and the cursor "
        "is not context.cursor. Query-stats and tracing listeners read a dead cursor. No "
        "dropsafe-side fix through the events; upstream: pass context.cursor to "
        "after_cursor_execute (and to _handle_dbapi_exception) after the do_execute events."
    ),
)
@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_after_cursor_execute_listeners_see_the_cursor_that_ran_the_replay(
    server, proxy, driver, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    seen = []

    @event.listens_for(engine, "after_cursor_execute")
    def stats(conn, cursor, statement, parameters, context, executemany):  # noqa: PLR0917
        if "INSERT INTO attack_items" in statement:
            seen.append((cursor.rowcount, cursor is context.cursor))

    lose_before(engine, "INSERT INTO attack_items", "terminate", server, proxy)
    with engine.begin() as conn:
        conn.execute(ITEMS.insert().values(n=1))
    assert len(replayed(events)) == 1
    assert seen == [(1, True)]


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_replayed_update_waits_for_the_lost_backend_and_applies_once(
    server, proxy, driver, disposing
):
    # The first statement's backend still runs (and holds the row's lock) after its socket
    # was cut; the replay's UPDATE waits for that lock, and must add 100 once, not twice.
    server.execute("INSERT INTO attack_items (n) VALUES (1)")
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    bump = sa.text(
        "UPDATE attack_items SET n = n + 100 WHERE n = 1 RETURNING n, pg_sleep(2) /* attack_bump */"
    )
    running = functools.partial(wait_until_running, server, "attack_bump")
    with engine.connect() as conn, cut_from_another_thread_once(proxy, running) as seen:
        assert [n for (n, _) in conn.execute(bump)] == [101]
        conn.commit()
    assert seen == [True]
    assert _items(server) == [101]
    assert len(replayed(events)) == 1


# -- the quiet ROLLBACK ----------------------------------------------------------------------


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_concurrent_async_sessions_closing_on_lost_connections(
    server, proxy, driver, disposing_async
):
    # Each task's ROLLBACK is told apart by a context variable set right before it: many
    # tasks closing at once on lost connections must each be absorbed, none raised, none
    # mixed up with another's (a live one among them rolls back for real).
    import asyncio  # only this test needs it

    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events, pool_size=6))
    sessions = [AsyncSession(engine) for _ in range(5)]
    for number, session in enumerate(sessions):
        session.add(Item(n=number))
        await session.flush()
    assert server.terminate_backends() >= 5
    live = AsyncSession(engine)
    live.add(Item(n=99))
    await live.flush()
    await asyncio.wait_for(asyncio.gather(*(s.close() for s in sessions), live.close()), timeout=20)
    assert _items(server) == []
    assert _lost_rollbacks(events) == ["rollback"] * 5


def _lost_rollbacks(events):
    return [e.during for e in events if isinstance(e, RollbackConnectionLost)]


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
@pytest.mark.parametrize("fault", ["terminate", "cut"])
def test_quiet_rollback_logs_and_events_hold_no_secret(  # noqa: PLR0917 - fixtures and parameters
    server, proxy, driver, fault, caplog, disposing
):
    caplog.set_level(logging.DEBUG, logger="dropsafe")
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    with Session(engine) as session:
        session.add(Item(n=1))
        session.flush()
        lose(fault, server, proxy)
    assert _lost_rollbacks(events) == ["rollback"]
    assert server.password not in caplog.text
    assert server.password not in repr(events)
    assert _items(server) == []


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_isolation_level_of_create_engine_holds_in_the_replay(
    server, driver, losing_async_engine, events
):
    engine = losing_async_engine(driver, "transaction_isolation", isolation_level="REPEATABLE READ")
    async with AsyncSession(engine) as session, session.begin():
        assert (await session.execute(ISOLATION)).scalar() == "repeatable read"
        session.add(Item(n=1))
    assert _items(server) == [1]
    assert len(replayed(events)) == 1


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_no_answer_from_the_fresh_connection_is_bounded_by_connect_timeout(
    server, proxy, driver, disposing
):
    # The replay's fresh connection meets a network that forwards nothing (the proxy
    # blackholed after the cut): the app's statement must fail with the lost connection's
    # error within the connect timeout, not hang.
    events = []
    policy = _policy_noting(events, connect_timeout=2)
    engine = disposing(replay_engine(server, proxy, driver, events, policy=policy, pool_timeout=2))

    def cut_then_blackhole(conn):
        assert proxy.cut("rst") >= 1
        proxy.blackhole()

    before_statement(engine, "INSERT INTO attack_items", cut_then_blackhole)
    try:
        elapsed = _seconds_to_a_loud_commit(engine)
        assert elapsed < 15, elapsed
        assert replayed(events) == []
        proxy.heal()
        assert _items(server) == []
    finally:
        proxy.heal()


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_storm_of_terminations_no_duplicate_no_half_transaction(server, proxy, driver, disposing):
    # Backends are terminated over and over while sessions write two rows each (the first
    # INSERT is the transaction's first statement, replayable). Whatever the app saw: a
    # transaction it saw commit has both rows exactly once; one that raised before COMMIT has
    # none; one whose COMMIT raised has both or none (ambiguous); never one row alone, never
    # a row twice (attack_audit has no unique key, so a doubled replay would show).
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_timeout=5))
    stop = threading.Event()
    kills = [0]

    def storm():
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            kills[0] += server.terminate_backends()

    committing = {}

    @event.listens_for(engine, "commit")
    def note_commit(conn):
        committing[conn.info.get("attack_tx")] = True

    outcome = {}
    killer = threading.Thread(target=storm)
    killer.start()
    try:
        deadline = time.monotonic() + 4  # bounded in time and count
        for i in range(400):
            if time.monotonic() > deadline:
                break
            try:
                with Session(engine) as session:
                    session.connection().info["attack_tx"] = i
                    session.add(Audit(what=f"{i}a"))
                    session.flush()
                    session.execute(sa.text("SELECT pg_sleep(0.002)"))  # a window mid-way
                    session.add(Audit(what=f"{i}b"))
                    session.commit()
                outcome[i] = "committed"
            except sa.exc.DBAPIError:
                outcome[i] = "commit-raised" if committing.get(i) else "raised"
    finally:
        stop.set()
        killer.join(timeout=40)
    assert not killer.is_alive()
    rows = [what for (what,) in server.execute("SELECT what FROM attack_audit")]
    assert len(rows) == len(set(rows)), "a row written twice"
    for i, seen in outcome.items():
        mine = sorted(r for r in rows if r in (f"{i}a", f"{i}b"))
        if seen == "committed":
            assert mine == [f"{i}a", f"{i}b"], (i, seen, mine)
        elif seen == "raised":
            assert mine == [], (i, seen, mine)
        else:
            assert mine in ([], [f"{i}a", f"{i}b"]), (i, seen, mine)
    assert kills[0] > 0
    assert "committed" in outcome.values()


@pytest.mark.parametrize("value", [0, "false"])
def test_a_malformed_opt_out_is_refused_or_honoured(server, value, losing_engine, events):
    engine = losing_engine("psycopg2", "INSERT INTO attack_items")
    opted_out = ITEMS.insert().values(n=1).execution_options(dropsafe_replay=value)
    with (
        engine.connect() as conn,
        pytest.raises((sa.exc.OperationalError, dropsafe.ConfigurationError)),
    ):
        conn.execute(opted_out)
    assert replayed(events) == []
    assert _items(server) == []


def test_a_failing_hook_breaks_neither_the_replay_nor_the_quiet_rollback(
    server, proxy, caplog, disposing
):
    caplog.set_level(logging.DEBUG, logger="dropsafe")
    seen = []

    def failing_hook(event):
        seen.append(type(event).__name__)
        raise RuntimeError("hook down")

    policy = dropsafe.Policy(hooks=(failing_hook,))
    engine = disposing(replay_engine(server, proxy, "psycopg", [], policy=policy))
    lose_before(engine, "INSERT INTO attack_items", "terminate", server, proxy)
    with Session(engine) as session:
        session.add(Item(n=1))
        session.commit()  # the replay's hook fails: the commit must not
        session.add(Item(n=2))
        session.flush()
        lose("terminate", server, proxy)
    # Leaving the block rolled back on a lost connection: quiet, though the hook failed.
    assert "FirstStatementReplayed" in seen
    assert "RollbackConnectionLost" in seen
    assert _items(server) == [1]
    assert server.password not in caplog.text


def _backend_pid(dbapi_connection):
    info = getattr(dbapi_connection, "info", None)
    if info is not None and hasattr(info, "backend_pid"):
        return info.backend_pid  # psycopg 3
    return dbapi_connection.get_backend_pid()  # psycopg2


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_sigkill_of_the_backend_before_the_first_statement(server, proxy, driver, disposing):
    # SIGKILL of a backend makes the postmaster reset every session and recover: the replay's
    # fresh connection may come during recovery (refused) or after. Either way what the app
    # saw must match the server, within bounds.
    import signal

    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_timeout=5))

    def kill(conn):
        pid = _backend_pid(conn.connection.dbapi_connection)
        assert server.signal_backend(pid, signal.SIGKILL)

    armed = before_statement(engine, "INSERT INTO attack_items", kill)
    started = time.monotonic()
    try:
        with Session(engine) as session:
            session.add(Item(n=1))
            session.commit()
    except sa.exc.DBAPIError:
        committed = False
    else:
        committed = True
    assert time.monotonic() - started < 30
    assert not armed[0]
    deadline = time.monotonic() + 30
    while True:  # the server recovers from the crash: wait for it, with a deadline
        try:
            rows = _items(server)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert rows == ([1] if committed else [])
    assert len(replayed(events)) == (1 if committed else 0)


DBLINK_AND_A_COUNTER = (
    "CREATE EXTENSION IF NOT EXISTS dblink; "
    "DROP SEQUENCE IF EXISTS attack_seq; CREATE SEQUENCE attack_seq"
)
# dblink's own connection fails, answered by the server; nextval counts the statement's runs.
REMOTE_DOWN = sa.text(
    "SELECT nextval('attack_seq'), "
    "dblink_exec('host=/nonexistent-dir port=1 dbname=x connect_timeout=1', 'SELECT 1')"
)


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_a_dblink_connection_error_answered_by_the_server_is_notreplayed(
    server, proxy, driver, disposing
):
    # dblink (like postgres_fdw) reports its own failed connection to a remote server with
    # SQLSTATE 08001, in a reply, on a connection that is fine. That is no lost connection of
    # the app's: the statement must not run twice (the sequence counts the runs).
    server.execute(DBLINK_AND_A_COUNTER)
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(REMOTE_DOWN)
        orig = raised.value.orig
        assert (getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)) == "08001"
    assert server.execute("SELECT last_value FROM attack_seq") == [("1",)]
    assert replayed(events) == []


@pytest.mark.parametrize("where", ["option-engine", "orm-execute", "session-connection"])
def test_opt_outs_reach_the_replay_from_every_place_an_app_sets_them(
    server, proxy, where, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg", events))
    insert = ITEMS.insert().values(n=1)
    lose_before(engine, "INSERT INTO attack_items", "terminate", server, proxy)
    bind = engine.execution_options(dropsafe_replay=False) if where == "option-engine" else engine
    opted_out = {"dropsafe_replay": False}

    def run(session):
        if where == "orm-execute":
            return session.execute(insert, execution_options=opted_out)
        if where == "session-connection":
            return session.connection(execution_options=opted_out).execute(insert)
        return session.execute(insert)

    with Session(bind) as session, pytest.raises(sa.exc.OperationalError):
        run(session)
    assert replayed(events) == []
    assert _items(server) == []


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_first_statement_into_a_blackhole_times_out_loud_and_bounded(
    server, proxy, driver, kernel_blackhole, disposing
):
    # The first statement goes into a path that drops every packet (in the kernel: a
    # userspace blackhole's kernel would acknowledge the data, and nothing would ever time
    # out). The socket times out (tcp_user_timeout); the server may still hold that
    # transaction and its locks, so it is not replayed: the app gets the error within the
    # timeout, and nothing is written.
    events = []
    policy = _policy_noting(events, tcp_user_timeout=1, connect_timeout=2)
    engine = disposing(replay_engine(server, proxy, driver, events, policy=policy))
    with engine.connect() as conn:  # the pool's one connection, made before the blackhole
        conn.exec_driver_sql("SELECT 1")
    with kernel_blackhole(proxy.port):
        elapsed = _seconds_to_a_loud_commit(engine)
    assert elapsed < 20, elapsed
    assert replayed(events) == []
    assert _items(server) == []


def test_a_replay_that_fails_is_raised_and_said(server, proxy, disposing):
    # The connection is lost before the first statement's reply, and no fresh one can be made
    # (the proxy refuses new connections): the app gets the error, and operators get the event
    # with why the replay failed, not silence.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg", events, pool_timeout=2))
    before_statement(engine, "INSERT INTO attack_items", lambda conn: _refuse_and_cut(proxy))
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.execute(ITEMS.insert().values(n=1))
    assert replayed(events) == []
    (failed,) = failed_replays(events)
    assert failed.error
    assert failed.replay_error
    proxy.heal()
    assert _items(server) == []


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_the_liveness_ping_at_checkout_does_not_stop_the_replay(server, proxy, driver, disposing):
    # The refusal of a driver's connection used since checkout counts the bytes its socket
    # wrote: dropsafe's own ping at checkout (every checkout here) must not count as the app's.
    events = []
    policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(ping_after_idle=0), hooks=(events.append,))
    engine = disposing(replay_engine(server, proxy, driver, events, policy=policy))
    with engine.connect() as conn:  # the pool's one connection, made and returned
        conn.exec_driver_sql("SELECT 1")
    lose_before(engine, "INSERT INTO attack_items", "terminate", server, proxy)
    with Session(engine) as session:
        session.add(Item(n=1))
        session.commit()
    assert any(isinstance(e, PingSucceeded) for e in events)
    assert len(replayed(events)) == 1
    assert _items(server) == [1]


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_dblink_connection_error_answered_by_the_server_is_notreplayed(
    server, proxy, driver, disposing_async
):
    # As above, through SQLAlchemy's async adapters: the error is answered on a connection
    # that asyncpg (is_closed()) and psycopg (closed, broken) still hold open.
    server.execute(DBLINK_AND_A_COUNTER)
    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events))
    async with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError):
            await conn.execute(REMOTE_DOWN)
    assert server.execute("SELECT last_value FROM attack_seq") == [("1",)]
    assert replayed(events) == []
