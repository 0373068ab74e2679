"""AUTOCOMMIT set on the driver's connection is refused at the unit's BEGIN (issue 26, history 6).

The refusal at the first statement SQLAlchemy sends misses work the unit's function does
through the driver's own connection before it (a psycopg COPY, a raw cursor): under the
driver's ``autocommit``, given by a ``connect`` or ``checkout`` listener, that work has
committed alone by then. The unit was refused after its INSERT had committed (an error with an
effect), or, with no SQLAlchemy statement at all, ran and could not be run again whole.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.testing import PostgresServer

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def server():
    with PostgresServer() as server:
        server.execute("CREATE TABLE raw_autocommit (n int)")
        yield server


def _rows(server, n):
    return int(server.execute(f"SELECT count(*) FROM raw_autocommit WHERE n = {int(n)}")[0][0])


def _autocommit_on_checkout(engine):
    @event.listens_for(engine, "checkout")
    def autocommit(dbapi_connection, entry, proxied):
        dbapi_connection.autocommit = True


@pytest.mark.parametrize("then_sqlalchemy", [False, True])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_driver_autocommit_is_refused_before_the_units_own_driver_work(
    server, driver, then_sqlalchemy, disposing
):
    n = 10 * then_sqlalchemy + (driver == "psycopg")
    engine = disposing(dropsafe.create_engine(server.url(driver)))
    _autocommit_on_checkout(engine)

    def unit(session):
        cursor = session.connection().connection.dbapi_connection.cursor()
        cursor.execute(f"INSERT INTO raw_autocommit VALUES ({n})")
        if then_sqlalchemy:
            session.execute(sa.text("SELECT 1"))
        return "ran"

    with pytest.raises(dropsafe.ConfigurationError, match="AUTOCOMMIT"):
        dropsafe.run_transaction(sessionmaker(engine), unit)
    assert _rows(server, n) == 0


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_driver_autocommit_is_refused_before_the_units_own_driver_work(
    server, driver, disposing_async
):
    n = 100 + (driver == "psycopg")
    engine = disposing_async(dropsafe.create_async_engine(server.url(driver)))
    _autocommit_on_checkout(engine.sync_engine)

    async def unit(session):
        raw = await (await session.connection()).get_raw_connection()
        await raw.driver_connection.execute(f"INSERT INTO raw_autocommit VALUES ({n})")
        await session.execute(sa.text("SELECT 1"))
        return "ran"

    with pytest.raises(dropsafe.ConfigurationError, match="AUTOCOMMIT"):
        await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)
    assert _rows(server, n) == 0


async def test_asyncpg_work_through_the_driver_before_a_statement_is_in_the_units_transaction(
    server,
    disposing_async,
):
    # SQLAlchemy's asyncpg adapter sends BEGIN lazily, at the first statement it is given: an
    # asyncpg INSERT (or copy_records_to_table) before it committed alone, and a unit cut after
    # it ran again and wrote it twice (1 of 1, acknowledged). The unit's BEGIN is sent first.
    n = 200
    engine = disposing_async(dropsafe.create_async_engine(server.url("asyncpg")))
    attempts = []

    async def unit(session):
        attempts.append(1)
        raw = await (await session.connection()).get_raw_connection()
        await raw.driver_connection.execute(f"INSERT INTO raw_autocommit VALUES ({n})")
        if len(attempts) == 1:  # a real fault: the unit's own backend terminated
            await session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return "ran"

    assert await dropsafe.run_transaction_async(async_sessionmaker(engine), unit) == "ran"
    assert len(attempts) == 2
    assert _rows(server, n) == 1
