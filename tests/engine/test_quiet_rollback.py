"""A ROLLBACK on a lost connection never reaches the app; a COMMIT on one always does.

Each fault is real: the backend terminated (57P01), the socket cut by the proxy, the server
crashed (SIGQUIT, restarted at once). Each path is one an app of the usual shape takes: a
``with Session(...)`` block closing, ``session.rollback()``, ``conn.rollback()``, a Connection
closed with its transaction open, the pool's reset of a raw connection checked in, and the
same through asyncio sessions and connections. Before dropsafe absorbed these, every path but
the pool's reset raised the driver's error (the reset logged it at ERROR with a traceback).
"""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._drivers import async_drivers
from dropsafe.events import ConnectionInvalidated, RollbackConnectionLost
from dropsafe.testing import PostgresServer

pytestmark = pytest.mark.fault

BACKEND_PID = sa.text("SELECT pg_backend_pid()")
FAULTS = ["terminate", "cut", "crash"]


@pytest.fixture(scope="module")
def server():
    with PostgresServer() as server:
        yield server


def _break(fault, server, proxy, pid):
    """Lose the connection of backend ``pid`` with ``fault``; return once it is lost."""
    if fault == "terminate":
        assert server.execute(f"SELECT pg_terminate_backend({pid}, 5000)") == [("t",)]
    elif fault == "cut":
        assert proxy.cut("rst") >= 1
    else:
        server.restart("immediate")


def _engine(server, proxy, driver, events, **kwargs):
    return dropsafe.create_engine(
        proxy.route(server.url(driver)),
        policy=dropsafe.Policy(hooks=(events.append,)),
        **kwargs,
    )


def _async_engine(server, proxy, driver, events):
    return dropsafe.create_async_engine(
        proxy.route(server.url(driver)), policy=dropsafe.Policy(hooks=(events.append,))
    )


def _lost_rollbacks(events):
    return [event.during for event in events if isinstance(event, RollbackConnectionLost)]


# -- sync ----------------------------------------------------------------------------------


def _session_block_closes(engine, kill):
    with Session(engine) as session:
        kill(session.execute(BACKEND_PID).scalar())


def _session_rollback(engine, kill):
    with Session(engine) as session:
        pid = kill(session.execute(BACKEND_PID).scalar())
        session.rollback()
        # As after a successful rollback: the session goes on, on a fresh connection.
        assert session.execute(BACKEND_PID).scalar() != pid
        session.commit()


def _connection_rollback(engine, kill):
    with engine.connect() as conn:
        pid = kill(conn.execute(BACKEND_PID).scalar())
        conn.rollback()
        assert not conn.in_transaction()
        assert conn.execute(BACKEND_PID).scalar() != pid
        conn.commit()


def _connection_closed_in_transaction(engine, kill):
    conn = engine.connect()
    kill(conn.execute(BACKEND_PID).scalar())
    conn.close()
    assert conn.closed


def _pool_reset_on_checkin(engine, kill):
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    pid = cursor.fetchone()[0]
    cursor.close()
    kill(pid)
    raw.close()  # the pool's reset: a ROLLBACK


SYNC_PATHS = {
    "session-block-closes": (_session_block_closes, "rollback"),
    "session-rollback": (_session_rollback, "rollback"),
    "connection-rollback": (_connection_rollback, "rollback"),
    "connection-closed-in-transaction": (_connection_closed_in_transaction, "rollback"),
    "pool-reset-on-checkin": (_pool_reset_on_checkin, "reset"),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", list(SYNC_PATHS))
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_sync_rollback_on_a_lost_connection_is_quiet(  # noqa: PLR0917 - fixtures and parameters
    server, proxy, driver, path, fault, caplog, disposing
):
    events = []
    engine = disposing(_engine(server, proxy, driver, events, pool_size=1, max_overflow=0))
    run, during = SYNC_PATHS[path]
    killed = []

    def kill(pid):
        _break(fault, server, proxy, pid)
        killed.append(pid)
        return pid

    with caplog.at_level(logging.DEBUG):
        run(engine, kill)  # raises the driver's error without dropsafe
        # The pool hands out a working connection next, without the app seeing anything (a
        # ROLLBACK not awaited, psycopg 3's at a close, is found lost here).
        with engine.connect() as conn:
            assert conn.execute(BACKEND_PID).scalar() != killed[0]
    assert _lost_rollbacks(events) == [during]
    assert "a ROLLBACK met a lost connection" in caplog.text
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("sqlalchemy", "dropsafe"))
    ]


def test_a_commit_on_a_lost_connection_stays_loud(server, proxy, disposing):
    events = []
    engine = disposing(_engine(server, proxy, "psycopg2", events))
    with Session(engine) as session:
        pid = session.execute(BACKEND_PID).scalar()
        _break("terminate", server, proxy, pid)
        with pytest.raises(sa.exc.OperationalError):
            session.commit()
        session.rollback()
        assert session.execute(BACKEND_PID).scalar() != pid
    assert _lost_rollbacks(events) == []
    assert any(isinstance(event, ConnectionInvalidated) for event in events)


def test_a_rollback_error_that_is_no_lost_connection_is_raised(server, proxy, disposing):
    # A real driver error on ROLLBACK, the connection alive: psycopg 3 forbids an explicit
    # rollback() inside its own transaction() block.
    events = []
    engine = disposing(_engine(server, proxy, "psycopg", events))
    with engine.connect() as conn:
        conn.execute(BACKEND_PID)
        block = conn.connection.driver_connection.transaction()
        block.__enter__()
        with pytest.raises(sa.exc.ProgrammingError, match="rollback"):
            conn.rollback()
        block.__exit__(None, None, None)
    assert _lost_rollbacks(events) == []


def test_a_rollback_on_a_live_connection_is_untouched(server, proxy, disposing):
    events = []
    engine = disposing(_engine(server, proxy, "psycopg2", events, pool_size=1, max_overflow=0))
    with Session(engine) as session:
        pid = session.execute(BACKEND_PID).scalar()
        session.rollback()
        assert session.execute(BACKEND_PID).scalar() == pid
    assert events == []


# -- asyncio -------------------------------------------------------------------------------


async def _async_session_block_closes(engine, kill):
    async with AsyncSession(engine) as session:
        kill((await session.execute(BACKEND_PID)).scalar())


async def _async_session_rollback(engine, kill):
    async with AsyncSession(engine) as session:
        pid = kill((await session.execute(BACKEND_PID)).scalar())
        await session.rollback()
        assert (await session.execute(BACKEND_PID)).scalar() != pid
        await session.commit()


async def _async_connection_rollback(engine, kill):
    async with engine.connect() as conn:
        pid = kill((await conn.execute(BACKEND_PID)).scalar())
        await conn.rollback()
        assert (await conn.execute(BACKEND_PID)).scalar() != pid
        await conn.commit()


async def _async_connection_closed_in_transaction(engine, kill):
    conn = await engine.connect()
    kill((await conn.execute(BACKEND_PID)).scalar())
    await conn.close()


ASYNC_PATHS = {
    "session-block-closes": _async_session_block_closes,
    "session-rollback": _async_session_rollback,
    "connection-rollback": _async_connection_rollback,
    "connection-closed-in-transaction": _async_connection_closed_in_transaction,
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", list(ASYNC_PATHS))
@pytest.mark.parametrize("driver", async_drivers())
async def test_async_rollback_on_a_lost_connection_is_quiet(  # noqa: PLR0917 - fixtures and parameters
    server, proxy, driver, path, fault, disposing_async
):
    events = []
    engine = disposing_async(_async_engine(server, proxy, driver, events))
    killed = []

    def kill(pid):
        _break(fault, server, proxy, pid)
        killed.append(pid)
        return pid

    await ASYNC_PATHS[path](engine, kill)  # raises the driver's error without dropsafe
    # The pool hands out a working connection next, without the app seeing anything (a
    # ROLLBACK not awaited, asyncpg's at a close, is found lost here).
    async with engine.connect() as conn:
        assert (await conn.execute(BACKEND_PID)).scalar() != killed[0]
    assert _lost_rollbacks(events) == ["rollback"]
