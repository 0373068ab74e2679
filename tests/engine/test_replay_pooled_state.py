"""A replay never runs on a pooled connection in another session state (issue 26, history 9).

The "fresh" connection a replay runs on comes from the engine's pool: with more than one
connection pooled (SQLAlchemy's QueuePool hands out the one idle longest), it is another pooled
connection, carrying whatever its own earlier checkouts set on it. Each test puts session state
on one pooled connection (B) only, then loses the other (A) under a transaction's first
statement: the replay must not run on B.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from replay_faults import prepared_server, replay_async_engine, replay_engine, replayed
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

pytestmark = pytest.mark.fault

TENANT = "attack_tenant"
SETUP = f"""
CREATE TABLE public.attack_items (n int);
CREATE SCHEMA {TENANT};
CREATE TABLE {TENANT}.attack_items (n int);
CREATE SEQUENCE public.attack_seq;
"""
INSERT = sa.text("INSERT INTO attack_items (n) VALUES (:n)")


@pytest.fixture(scope="module")
def server():
    with prepared_server(SETUP) as server:
        yield server


@pytest.fixture(autouse=True)
def _empty_tables(server):
    server.execute(f"TRUNCATE public.attack_items, {TENANT}.attack_items")


def _rows(server, schema):
    return sorted(int(n) for (n,) in server.execute(f"SELECT n FROM {schema}.attack_items"))


def _terminate_at_next_checkout(engine, server, pid):
    """Terminate backend ``pid`` right after the next checkout (dropsafe's check passed it)."""
    armed = [True]

    @event.listens_for(engine, "checkout")
    def lose_now(dbapi_connection, entry, proxied):
        if armed[0]:
            armed[0] = False
            server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_replay_never_runs_on_a_pooled_connection_another_checkout_changed(
    server, proxy, driver, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_size=2))
    with engine.connect() as a, engine.connect() as b:
        pid_a = a.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        b.exec_driver_sql(f"SET search_path TO {TENANT}")  # B only, and B is marked
        b.commit()
        a.commit()
        a.close()  # A goes back first: it is the next checkout, B the one after
    _terminate_at_next_checkout(engine, server, pid_a)
    with Session(engine) as session:
        try:
            session.execute(INSERT, {"n": 1})  # A's first statement, A lost
            session.commit()
            outcome = "committed"
        except sa.exc.DBAPIError:
            outcome = "raised"
    # Either raised (no replay), or replayed where A's own state would have put it.
    assert (outcome, _rows(server, TENANT), _rows(server, "public")) in [
        ("raised", [], []),
        ("committed", [], [1]),
    ]
    assert len(replayed(events)) == (outcome == "committed")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_replayed_currval_never_reads_another_pooled_connections_sequence(
    server, proxy, driver, disposing
):
    # nextval is on the whitelist (every INSERT into a serial column calls it), and it sets the
    # session's currval / lastval. A's first statement reads A's currval: on a new connection
    # that is an error, on pooled B it is B's value, silently.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_size=2))
    with engine.connect() as a, engine.connect() as b:
        pid_a = a.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        mine = a.exec_driver_sql("SELECT nextval('attack_seq')").scalar()
        b.exec_driver_sql("SELECT nextval('attack_seq')")
        b.commit()
        a.commit()
        a.close()
    _terminate_at_next_checkout(engine, server, pid_a)
    with Session(engine) as session:
        try:
            session.execute(sa.text("INSERT INTO attack_items (n) VALUES (currval('attack_seq'))"))
            session.commit()
        except sa.exc.DBAPIError:
            pass
    assert _rows(server, "public") in ([], [mine])


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_a_replay_never_runs_on_a_pooled_connection_another_checkout_changed(
    server, proxy, driver, disposing_async
):
    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events, pool_size=2))
    async with engine.connect() as a, engine.connect() as b:
        pid_a = (await a.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
        await b.exec_driver_sql(f"SET search_path TO {TENANT}")
        await b.commit()
        await a.commit()
        await a.close()
    _terminate_at_next_checkout(engine.sync_engine, server, pid_a)
    async with AsyncSession(engine) as session:
        try:
            await session.execute(INSERT, {"n": 1})
            await session.commit()
            outcome = "committed"
        except sa.exc.DBAPIError:
            outcome = "raised"
    assert (outcome, _rows(server, TENANT), _rows(server, "public")) in [
        ("raised", [], []),
        ("committed", [], [1]),
    ]
    assert len(replayed(events)) == (outcome == "committed")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_ordinary_work_on_the_pooled_connection_keeps_the_replay(server, proxy, driver, disposing):
    # B ran whitelisted statements only (its sequence state set by a serial-like nextval):
    # A's whitelisted first statement is replayed on B, and lands where A would have put it.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_size=2))
    with engine.connect() as a, engine.connect() as b:
        pid_a = a.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        b.exec_driver_sql("SELECT nextval('attack_seq'), count(*) FROM attack_items")
        b.commit()
        a.commit()
        a.close()
    _terminate_at_next_checkout(engine, server, pid_a)
    with Session(engine) as session:
        session.execute(INSERT, {"n": 1})
        session.commit()
    assert _rows(server, "public") == [1]
    assert len(replayed(events)) == 1
