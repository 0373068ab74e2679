"""Only the database driver's errors are retried; the rest is raised once, unchanged.

Each unit of work runs through run_transaction on a real server and fails once, in a real way:
the application's own errors (a payment API's timeout, Redis refusing, a ValueError that
mentions a broken pipe), SQLAlchemy's own (a closed Connection, the pool's timeout), asyncpg's
client-side misuse, and a user's own read-only transaction on a primary (25006). Checked: the
unit ran once, the error is the one raised, and no pooled connection was invalidated. A write
that reaches a real standby is the failover case: invalidated, and pool-wide.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from one_statement import error_of_one_statement
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe import ErrorKind, classify
from dropsafe._classify import sqlstate_of
from dropsafe.events import ConnectionInvalidated

# shared_server: a server of this module's own: it copies the server into a standby.
pytestmark = [pytest.mark.fault, pytest.mark.own_server]

DRIVERS = ["psycopg2", "psycopg", "asyncpg", "pg8000"]
BACKEND_PID = sa.text("SELECT pg_backend_pid()")


class Counted:
    """An engine's invalidations (pool events) and dropsafe's ConnectionInvalidated events."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.invalidations = 0

    def policy(self) -> dropsafe.Policy:
        return dropsafe.Policy(hooks=(self.events.append,))

    def listen(self, engine: sa.Engine) -> None:
        def count(*_args: object) -> None:
            self.invalidations += 1

        sa.event.listen(engine, "invalidate", count)
        sa.event.listen(engine, "soft_invalidate", count)

    @property
    def invalidated(self) -> list[object]:
        return [e for e in self.events if isinstance(e, ConnectionInvalidated)]


@pytest.fixture(scope="module")
def table(shared_server):
    shared_server.execute("CREATE TABLE IF NOT EXISTS notes (v int)")
    return shared_server


def _run_sync(server, driver, unit, counted, **engine_kwargs):
    """Run ``unit(session, engine)`` once through run_transaction; return (calls, error, pids)."""
    engine = dropsafe.create_engine(
        server.url(driver),
        policy=counted.policy(),
        connect_args=server.connect_args(driver),
        pool_use_lifo=True,  # the next unit gets the connection the failed one used
        **engine_kwargs,
    )
    counted.listen(engine)
    factory = sessionmaker(engine)
    calls = []

    def counted_unit(session):
        calls.append(session.execute(BACKEND_PID).scalar())
        return unit(session, engine)

    try:
        with dropsafe.test_mode():
            try:
                dropsafe.run_transaction(factory, counted_unit)
            except Exception as exc:
                error = exc
            else:
                error = None
            after = dropsafe.run_transaction(factory, lambda s: s.execute(BACKEND_PID).scalar())
    finally:
        engine.dispose()
    return calls, error, after


def _run_async(server, unit, counted, **engine_kwargs):
    async def main():
        engine = dropsafe.create_async_engine(
            server.url("asyncpg"), policy=counted.policy(), pool_use_lifo=True, **engine_kwargs
        )
        counted.listen(engine.sync_engine)
        factory = async_sessionmaker(engine)
        calls = []

        async def counted_unit(session):
            calls.append((await session.execute(BACKEND_PID)).scalar())
            return await unit(session, engine)

        async def pid(session):
            return (await session.execute(BACKEND_PID)).scalar()

        try:
            with dropsafe.test_mode():
                try:
                    await dropsafe.run_transaction_async(factory, counted_unit)
                except Exception as exc:
                    error = exc
                else:
                    error = None
                after = await dropsafe.run_transaction_async(factory, pid)
        finally:
            await engine.dispose()
        return calls, error, after

    return asyncio.run(main())


def _assert_raised_once_and_nothing_recycled(calls, error, after, counted):
    assert error is not None
    assert len(calls) == 1, f"ran {len(calls)} times for {error!r}"
    assert classify(error) is ErrorKind.PERMANENT
    assert counted.invalidations == 0
    assert counted.invalidated == []
    # The pool kept its connection: the next unit ran on the same backend.
    assert after == calls[0]


class PaymentTimeout(TimeoutError):
    pass


# The application's own errors, raised inside the unit of work.
APP_ERRORS = {
    "timeout": lambda: TimeoutError("payment API did not answer"),
    "refused": lambda: ConnectionRefusedError(111, "Redis: Connection refused"),
    "broken-pipe-text": lambda: ValueError("upstream said: broken pipe"),
    "subclass": lambda: PaymentTimeout("timed out"),
}


@pytest.mark.parametrize("name", sorted(APP_ERRORS))
@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_the_applications_own_errors_are_raised_once_unchanged(table, driver, name):
    raised = APP_ERRORS[name]()
    counted = Counted()
    if driver == "asyncpg":

        async def unit(session, engine):
            raise raised

        calls, error, after = _run_async(table, unit, counted)
    else:

        def unit(session, engine):
            raise raised

        calls, error, after = _run_sync(table, driver, unit, counted)
    assert error is raised
    _assert_raised_once_and_nothing_recycled(calls, error, after, counted)


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "pg8000"])
def test_sqlalchemys_own_errors_are_raised_once(table, driver):
    # "This Connection is closed" from a connection the unit closed itself.
    def closed_connection(session, engine):
        other = engine.connect()
        other.close()
        other.execute(sa.text("SELECT 1"))

    counted = Counted()
    calls, error, after = _run_sync(table, driver, closed_connection, counted)
    assert isinstance(error, sqlalchemy.exc.ResourceClosedError), repr(error)
    _assert_raised_once_and_nothing_recycled(calls, error, after, counted)

    # The pool's own timeout: the unit holds the only connection and asks for another.
    def pool_timeout(session, engine):
        with engine.connect() as other:
            other.execute(sa.text("SELECT 1"))

    counted = Counted()
    calls, error, after = _run_sync(
        table, driver, pool_timeout, counted, pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    assert isinstance(error, sqlalchemy.exc.TimeoutError), repr(error)
    _assert_raised_once_and_nothing_recycled(calls, error, after, counted)


def test_asyncpg_client_side_misuse_is_raised_once():
    # asyncpg's InterfaceError for a wrong number of arguments carries no SQLSTATE.
    async def unit(session, engine):
        connection = await session.connection()
        await connection.exec_driver_sql("SELECT $1::int", ())

    from dropsafe.testing import PostgresServer  # its own server, no TLS needed

    with PostgresServer(tls=False) as server:
        counted = Counted()
        calls, error, after = _run_async(server, unit, counted)
    assert isinstance(error, sqlalchemy.exc.InterfaceError), repr(error)
    assert "argument" in str(error)
    _assert_raised_once_and_nothing_recycled(calls, error, after, counted)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_users_read_only_transaction_on_a_primary_is_their_error(table, driver):
    counted = Counted()
    if driver == "asyncpg":

        async def unit(session, engine):
            await session.execute(sa.text("SET TRANSACTION READ ONLY"))
            await session.execute(sa.text("INSERT INTO notes VALUES (1)"))

        calls, error, after = _run_async(table, unit, counted)
    else:

        def unit(session, engine):
            session.execute(sa.text("SET TRANSACTION READ ONLY"))
            session.execute(sa.text("INSERT INTO notes VALUES (1)"))

        calls, error, after = _run_sync(table, driver, unit, counted)
    assert sqlstate_of(error) == "25006", repr(error)
    assert isinstance(error, sqlalchemy.exc.DBAPIError)
    assert not error.connection_invalidated
    _assert_raised_once_and_nothing_recycled(calls, error, after, counted)


@pytest.fixture(scope="module")
def standby(table):
    standby = table.make_standby()
    yield standby
    standby.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_write_reaching_a_standby_is_a_failover(standby, driver):
    counted = Counted()
    error = error_of_one_statement(
        standby.url(driver),
        driver,
        sa.text("INSERT INTO notes VALUES (1)"),
        policy=counted.policy(),
        connect_args=standby.connect_args(driver),
        listen=counted.listen,
    )
    assert isinstance(error, sqlalchemy.exc.DBAPIError), repr(error)
    assert sqlstate_of(error) == "25006", repr(error)
    assert error.connection_invalidated
    assert classify(error) is ErrorKind.FAILOVER
    assert counted.invalidations == 1
    assert [(e.kind, e.pool_wide) for e in counted.invalidated] == [(ErrorKind.FAILOVER, True)]
