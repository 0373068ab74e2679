"""The watchdog finds every driver's socket through its `Driver`, and ends a wait on it.

Fault: a statement that would run for a minute (``pg_sleep(60)``), standing in for a server
that never answers. Checked: `bounded` with a deadline a moment away ends it within a few
seconds, with the driver's own error and ``expired`` set, for every driver, sync and async.
Without a socket from the driver (the watchdog looked in the wrong place) the statement would
run its full minute: the test then fails on the elapsed time (and the server cancels it).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe._drivers import face_of, faces, sync_drivers
from dropsafe._drivers.deadline import bounded

pytestmark = pytest.mark.fault

SYNC_DRIVERS = sync_drivers()
ASYNC_DRIVERS = [face for face in faces() if face_of(face)[1]]
DEADLINE = 0.5
# A loaded machine (2 cores shared with other test runs).
BOUND = 5.0
SLEEP = sa.text("SELECT pg_sleep(60)")


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_a_sync_wait_ends_at_its_deadline(postgres_server, driver, disposing):
    engine = disposing(
        dropsafe.create_engine(
            postgres_server.url(driver), connect_args=postgres_server.connect_args(driver)
        )
    )
    with engine.connect() as conn:
        conn.exec_driver_sql("SET statement_timeout = '30s'")  # ends a failed test too
        dbapi_connection = conn.connection.dbapi_connection
        started = time.monotonic()
        with (
            pytest.raises(sa.exc.DBAPIError),
            bounded(dbapi_connection, started + DEADLINE) as bound,
        ):
            conn.execute(SLEEP)
        elapsed = time.monotonic() - started
    assert bound.expired
    assert elapsed < BOUND


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_an_async_wait_ends_at_its_deadline(postgres_server, driver):
    url = postgres_server.url(face_of(driver)[0])

    async def scenario():
        engine = dropsafe.create_async_engine(url)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SET statement_timeout = '30s'")
                raw = await conn.get_raw_connection()
                started = time.monotonic()
                with (
                    pytest.raises(sa.exc.DBAPIError),
                    bounded(raw.dbapi_connection, started + DEADLINE) as bound,
                ):
                    await conn.execute(SLEEP)
                return bound.expired, time.monotonic() - started
        finally:
            await engine.dispose()

    expired, elapsed = asyncio.run(scenario())
    assert expired
    assert elapsed < BOUND
