"""A transaction's first statement, lost with its connection before any reply, is sent again.

The connection is lost with a real fault at the worst moment: right after checkout, before the
first statement (the backend terminated, the socket cut, the server crashed), or while the
server runs the statement (the reply lost after the server did the work). Before dropsafe
replayed, each of the positive cases raised the driver's error to the app. The negative cases
(a second statement, autocommit, an opt-out, insertmanyvalues) must keep raising it.
"""

from __future__ import annotations

import functools
import time

import pytest
import sqlalchemy as sa
from replay_faults import (
    cut_from_another_thread_once,
    items_model,
    lose,
    lose_at_next_checkout,
    lose_before,
    module_server,
    numbers,
    replay_async_engine,
    replay_engine,
    replayed,
    wait_until_running,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._drivers import driver_names
from dropsafe.events import RetryScheduled

pytestmark = pytest.mark.fault

BACKEND_PID = sa.text("SELECT pg_backend_pid()")


Base, Item = items_model("replay_items")
ITEMS = Item.__table__
server, _empty = module_server(Base.metadata, empty="TRUNCATE replay_items")


def _rows(server):
    return numbers(server, "replay_items")


# -- replayed ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["terminate", "cut", "crash"])
@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_orm_session_first_statement_replayed_and_commit_keeps_the_write(
    server, proxy, driver, fault, disposing
):
    # The attack on a replay that rolls back (the FAQ recipe): the Session's transaction would
    # be deactivated, and its commit would not commit the replayed INSERT. Here it must.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    lose_at_next_checkout(engine, fault, server, proxy)
    with Session(engine) as session:
        session.add(Item(n=1))
        session.commit()  # the flush's INSERT is the transaction's first statement
        session.add(Item(n=2))
        session.commit()
    assert _rows(server) == [1, 2]
    assert len(replayed(events)) == 1


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_core_first_statement_with_returningreplayed(server, proxy, driver, disposing):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with engine.begin() as conn:
        new_id = conn.execute(ITEMS.insert().values(n=7).returning(ITEMS.c.id)).scalar()
        conn.execute(ITEMS.insert().values(n=8))
    assert _rows(server) == [7, 8]
    assert server.execute(f"SELECT n FROM replay_items WHERE id = {new_id}") == [("7",)]
    assert len(replayed(events)) == 1


def test_executemany_first_statementreplayed(server, proxy, disposing):
    server.execute("INSERT INTO replay_items (n) VALUES (1), (2), (3)")
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    lose_at_next_checkout(engine, "cut", server, proxy)
    with engine.begin() as conn:
        conn.execute(
            ITEMS.update().where(ITEMS.c.n == sa.bindparam("old")).values(n=sa.bindparam("new")),
            [{"old": 1, "new": 11}, {"old": 2, "new": 12}],
        )
    assert _rows(server) == [3, 11, 12]
    assert len(replayed(events)) == 1


def test_psycopg_prepared_server_side_bindingreplayed(server, proxy, disposing):
    events = []
    engine = disposing(
        replay_engine(server, proxy, "psycopg", events, connect_args={"prepare_threshold": 0})
    )
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT CAST(:n AS int) + 1"), {"n": 41}).scalar() == 42
    assert len(replayed(events)) == 1


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_first_statement_replayed_with_prepared_statements(
    server, proxy, driver, disposing_async
):
    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events))
    lose_at_next_checkout(engine.sync_engine, "terminate", server, proxy)
    async with AsyncSession(engine) as session:
        session.add(Item(n=5))
        await session.commit()
    async with engine.begin() as conn:  # asyncpg prepares every statement
        assert (await conn.execute(sa.text("SELECT count(*) FROM replay_items"))).scalar() == 1
    assert _rows(server) == [5]
    assert len(replayed(events)) == 1


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_reply_lost_after_the_server_ran_it_is_replayed_once(server, proxy, driver, disposing):
    # The server runs the INSERT, and the socket is cut before the reply: the transaction is
    # aborted with its backend, so the replay must not double the row (n is unique too).
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    slow = sa.text(
        "INSERT INTO replay_items (n) SELECT 9 FROM pg_sleep(2) /* replay_slow */ RETURNING n"
    )
    running = functools.partial(wait_until_running, server, "replay_slow")
    with engine.connect() as conn, cut_from_another_thread_once(proxy, running) as seen:
        assert conn.execute(slow).scalar() == 9
        conn.commit()
    assert seen == [True]
    assert _rows(server) == [9]
    assert len(replayed(events)) == 1


# -- not replayed --------------------------------------------------------------------------


def test_second_statement_is_notreplayed(server, proxy, disposing):
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    with engine.connect() as conn:
        conn.execute(BACKEND_PID)
        lose("terminate", server, proxy)
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(ITEMS.insert().values(n=1))
    assert _rows(server) == []
    assert replayed(events) == []


@pytest.mark.parametrize("how", ["execution-option", "engine-setting"])
def test_autocommit_is_notreplayed(server, proxy, how):
    events = []
    if how == "engine-setting":
        engine = replay_engine(server, proxy, "psycopg2", events, isolation_level="AUTOCOMMIT")
        bind = engine
    else:
        engine = replay_engine(server, proxy, "psycopg2", events)
        bind = engine.execution_options(isolation_level="AUTOCOMMIT")
    try:
        lose_at_next_checkout(engine, "terminate", server, proxy)
        with bind.connect() as conn, pytest.raises(sa.exc.OperationalError):
            conn.execute(ITEMS.insert().values(n=1))
        assert replayed(events) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_autocommit_set_by_hand_on_the_drivers_connection_is_notreplayed(
    server, proxy, driver, disposing
):
    # The flag set on the driver's connection, not through SQLAlchemy: the statement may have
    # committed before its connection was lost, so it must be raised, not sent again. Two
    # checks refuse it: the first statement's (detect_autocommit_setting, read right before
    # the statement) and the fresh connection's comparison of the two sessions' transaction
    # characteristics (with the first removed, the second still refused it: measured).
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    with engine.connect() as conn:
        conn.connection.dbapi_connection.autocommit = True
        lose("terminate", server, proxy)
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(ITEMS.insert().values(n=1))
    assert (replayed(events), _rows(server)) == ([], [])


def test_a_dialect_that_says_autocommit_after_harden_is_asked(server, proxy, disposing):
    # The refusal reads the driver's flag itself where the dialect's method is SQLAlchemy's
    # own (a call less per request); a dialect told otherwise, even after harden, is asked.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    engine.dialect.detect_autocommit_setting = lambda dbapi_connection: True
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.execute(ITEMS.insert().values(n=1))
    assert (replayed(events), _rows(server)) == ([], [])


def test_a_statement_opted_out_is_notreplayed(server, proxy, disposing):
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.execute(ITEMS.insert().values(n=1).execution_options(dropsafe_replay=False))
    assert replayed(events) == []


def test_an_engine_opted_out_replays_nothing(server, proxy, disposing):
    events = []
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_first_statement=False), hooks=(events.append,)
    )
    engine = disposing(replay_engine(server, proxy, "psycopg2", events, policy=policy))
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with Session(engine) as session, pytest.raises(sa.exc.OperationalError):
        session.execute(BACKEND_PID)
    assert replayed(events) == []


def test_a_serializable_transaction_is_replayed_as_serializable_only(server, proxy, disposing):
    # The fresh connection gets the Connection's isolation level as the lost one did, and
    # loses it again as it goes back to the pool (issue 26: it used to be refused instead).
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    isolation = sa.text("SELECT current_setting('transaction_isolation')")
    lose_at_next_checkout(engine, "terminate", server, proxy)
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    with serializable.connect() as conn:
        assert conn.execute(isolation).scalar() == "serializable"
    assert len(replayed(events)) == 1
    with engine.connect() as conn:  # the pool's one connection, the fresh one
        assert conn.execute(isolation).scalar() == "read committed"


def test_insertmanyvalues_is_notreplayed(server, proxy, disposing):
    # SQLAlchemy sends its batches on a cursor it holds itself: no replay, the error is raised.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.execute(ITEMS.insert().returning(ITEMS.c.id), [{"n": 1}, {"n": 2}])
    assert replayed(events) == []


def test_inside_a_unit_of_work_the_unit_runs_again_instead(server, proxy, disposing):
    # Lost right before the app's first statement, after the unit read its server's life.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    lose_before(engine, "replay_items", "terminate", server, proxy)
    dropsafe.run_transaction(engine, lambda conn: conn.execute(ITEMS.insert().values(n=4)))
    assert _rows(server) == [4]
    assert replayed(events) == []
    assert [type(e) for e in events if isinstance(e, RetryScheduled)] == [RetryScheduled]


def test_an_error_the_server_answered_is_notreplayed(server, proxy, disposing):
    # Even where the dialect's is_disconnect says "disconnect" (a user may widen it, as
    # SQLAlchemy's own HandleErrorTest does): the server replied, the statement is not resent.
    events = []
    engine = disposing(replay_engine(server, proxy, "psycopg2", events))
    engine.dialect.is_disconnect = lambda *args: True
    checkouts = []
    event.listen(engine, "checkout", lambda *args: checkouts.append(1))
    with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError):
        conn.exec_driver_sql("SELECT x FROM no_such_table")
    assert len(checkouts) == 1  # a replay would have checked out a fresh connection
    assert replayed(events) == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_connection_that_timed_out_is_notreplayed(server, kernel_blackhole, disposing):
    # The server may still hold the transaction (and its locks) until it notices: no replay,
    # and no fresh connect on a dead path adding its own timeout to the app's wait.
    events = []
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2), hooks=(events.append,)
    )
    engine = disposing(dropsafe.create_engine(server.url("psycopg2"), policy=policy))
    with engine.connect() as conn:
        conn.execute(BACKEND_PID)
    connects = []
    event.listen(engine, "do_connect", lambda *args: connects.append(1))
    with kernel_blackhole(server.port):
        started = time.monotonic()
        with (
            engine.connect() as conn,
            pytest.raises(sa.exc.OperationalError, match="timed out"),
        ):
            conn.execute(BACKEND_PID)
        elapsed = time.monotonic() - started
    assert connects == []  # a replay would have tried a fresh connection
    assert replayed(events) == []
    assert elapsed < 10
