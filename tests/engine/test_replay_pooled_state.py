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
from replay_faults import module_server, numbers, replay_async_engine, replay_engine, replayed
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from dropsafe._drivers import driver_names

pytestmark = pytest.mark.fault

TENANT = "attack_tenant"
SETUP = f"""
CREATE TABLE public.attack_items (n int);
CREATE SCHEMA {TENANT};
CREATE TABLE {TENANT}.attack_items (n int);
CREATE SEQUENCE public.attack_seq;
"""
INSERT = sa.text("INSERT INTO attack_items (n) VALUES (:n)")


server, _empty = module_server(SETUP, empty=f"TRUNCATE public.attack_items, {TENANT}.attack_items")

# What a replay on A's lost connection may have done: raised (no replay), or run where A's own
# state would have put it.
RAISED_OR_REPLAYED_AS_A = [("raised", [], []), ("committed", [], [1])]


def _rows(server, schema):
    return numbers(server, f"{schema}.attack_items")


def _terminate_at_next_checkout(engine, server, pid):
    """Terminate backend ``pid`` right after the next checkout (dropsafe's check passed it)."""
    armed = [True]

    @event.listens_for(engine, "checkout")
    def lose_now(dbapi_connection, entry, proxied):
        if armed[0]:
            armed[0] = False
            server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")


def _b_changed_then_a_lost(engine, server, on_b, on_a=None):
    """Check out two pooled connections, A and B; run ``on_b`` on B only (and ``on_a`` on A),
    give A back first (it is the next checkout, B the one after), and terminate A's backend
    right after that next checkout: what ``on_a`` returned."""
    with engine.connect() as a, engine.connect() as b:
        pid_a = a.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        seen_on_a = a.exec_driver_sql(on_a).scalar() if on_a else None
        b.exec_driver_sql(on_b)
        b.commit()
        a.commit()
        a.close()
    _terminate_at_next_checkout(engine, server, pid_a)
    return seen_on_a


def _outcome(session, statement, params=None):
    """Send ``statement`` as the session's first and commit: "committed" or "raised"."""
    try:
        session.execute(statement, params)
        session.commit()
    except sa.exc.DBAPIError:
        return "raised"
    return "committed"


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_a_replay_never_runs_on_a_pooled_connection_another_checkout_changed(
    server, proxy, driver, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_size=2))
    _b_changed_then_a_lost(engine, server, f"SET search_path TO {TENANT}")  # B only, B marked
    with Session(engine) as session:
        outcome = _outcome(session, INSERT, {"n": 1})  # A's first statement, A lost
    assert (outcome, _rows(server, TENANT), _rows(server, "public")) in RAISED_OR_REPLAYED_AS_A
    assert len(replayed(events)) == (outcome == "committed")


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_a_replayed_currval_never_reads_another_pooled_connections_sequence(
    server, proxy, driver, disposing
):
    # nextval is on the whitelist (every INSERT into a serial column calls it), and it sets the
    # session's currval / lastval. A's first statement reads A's currval: on a new connection
    # that is an error, on pooled B it is B's value, silently.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_size=2))
    nextval = "SELECT nextval('attack_seq')"
    mine = _b_changed_then_a_lost(engine, server, on_b=nextval, on_a=nextval)
    with Session(engine) as session:
        _outcome(session, sa.text("INSERT INTO attack_items (n) VALUES (currval('attack_seq'))"))
    assert _rows(server, "public") in ([], [mine])


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
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
    assert (outcome, _rows(server, TENANT), _rows(server, "public")) in RAISED_OR_REPLAYED_AS_A
    assert len(replayed(events)) == (outcome == "committed")


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_ordinary_work_on_the_pooled_connection_keeps_the_replay(server, proxy, driver, disposing):
    # B ran whitelisted statements only (its sequence state set by a serial-like nextval):
    # A's whitelisted first statement is replayed on B, and lands where A would have put it.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events, pool_size=2))
    _b_changed_then_a_lost(
        engine, server, "SELECT nextval('attack_seq'), count(*) FROM attack_items"
    )
    with Session(engine) as session:
        session.execute(INSERT, {"n": 1})
        session.commit()
    assert _rows(server, "public") == [1]
    assert len(replayed(events)) == 1
