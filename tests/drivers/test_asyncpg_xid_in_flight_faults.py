"""asyncpg's xid read in a statement's flight, under faults: the app sees what it sees without.

Faults, each on a real server and connection: the backend terminated while the statement runs
(the server's FATAL), the connection reset at every few bytes of the flight (a `ChaosProxy`
that dies after n bytes, both ways), the task cancelled while the flight is held in the network
(asyncpg sends its cancel request and reads on to ReadyForQuery). Outcomes with the read are
compared with the outcomes without it; after a cancellation the same pooled connection answers
the next statement right (its stream stayed in step with the server).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from asyncpg_sending import send_statement
from sqlalchemy.ext.asyncio import create_async_engine

from dropsafe._drivers.asyncpg import Asyncpg, _goodbye_watch

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncConnection

    from dropsafe.testing._proxy import ChaosProxy

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.fault, pytest.mark.shares_server, pytest.mark.timeout(90)]

ASYNCPG = Asyncpg()
STEP_TIMEOUT = 10.0
SLEEPING = "UPDATE faults SET v = 'z' WHERE id = 1 AND pg_sleep($1) IS NOT NULL"
WRITE = "UPDATE faults SET v = $1 WHERE id = 1 RETURNING id, v"


async def _until(condition: Callable[[], object], what: str) -> None:
    """Wait (yielding to the loop, which does the work) until ``condition()``, bounded."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _until_async(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
def server(postgres_server: Any) -> Any:
    postgres_server.execute(
        "CREATE TABLE IF NOT EXISTS faults (id int PRIMARY KEY, v text); "
        "INSERT INTO faults VALUES (1, 'a') ON CONFLICT DO NOTHING"
    )
    return postgres_server


def _send(
    sync_connection: sa.Connection,
    statement: str,
    params: tuple[object, ...],
    *,
    read: bool,
    before: Callable[[], None] | None = None,
    begin: bool = True,
) -> tuple[list[tuple[object, ...]], object]:
    if begin:
        sync_connection.begin()
    cursor, reading = send_statement(sync_connection, statement, params, read=read, before=before)
    rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    return rows, reading


def _facts(error: BaseException) -> tuple[str, str]:
    cause = error.__cause__ or error
    return type(error).__name__, type(cause).__name__


async def _backend_pid(connection: AsyncConnection) -> int:
    raw = await connection.get_raw_connection()
    pid = ASYNCPG.backend_pid(raw.dbapi_connection)
    assert pid is not None
    return pid


async def test_a_backend_terminated_mid_statement(server: Any) -> None:
    outcomes = []
    for read in (False, True):
        engine = create_async_engine(server.url("asyncpg"), pool_size=1, max_overflow=0)
        try:
            async with engine.connect() as connection:
                pid = await _backend_pid(connection)
                task = asyncio.create_task(
                    connection.run_sync(lambda c, read=read: _send(c, SLEEPING, (30,), read=read))
                )

                async def sleeping(pid: int = pid) -> bool:
                    rows = await asyncio.to_thread(
                        server.execute,
                        f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid} "
                        "AND wait_event = 'PgSleep'",
                    )
                    return bool(rows)

                await _until_async(sleeping, "the statement to sleep")
                await asyncio.to_thread(server.execute, f"SELECT pg_terminate_backend({pid})")
                with pytest.raises(engine.dialect.loaded_dbapi.Error) as caught:
                    await asyncio.wait_for(task, STEP_TIMEOUT)
                outcomes.append((_facts(caught.value), str(caught.value.__cause__)))
        finally:
            await engine.dispose()
    assert outcomes[0] == outcomes[1]


@pytest.mark.slow
async def test_a_connection_reset_at_any_byte_of_the_flight(
    server: Any, chaos_proxy: ChaosProxy
) -> None:
    """Reset after n bytes (both ways), n across the flight: outcomes with the read are ones
    seen without it, a read succeeds only whole, and nothing hangs."""
    url = chaos_proxy.route(server.url("asyncpg"))
    seen: dict[bool, set[object]] = {False: set(), True: set()}
    readings = set()
    cut: dict[bool, list[int]] = {False: [], True: []}
    for read in (False, True):
        engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=False)
        try:
            for budget in range(0, 800, 7):
                async with engine.connect() as connection:
                    await connection.exec_driver_sql("SELECT 1")  # connected, warm
                    await connection.rollback()

                    def work(c: sa.Connection, read: bool = read, budget: int = budget) -> object:
                        try:
                            return _send(
                                c,
                                WRITE,
                                ("w",),
                                read=read,
                                before=lambda: chaos_proxy.die_after(budget),
                            )
                        finally:
                            chaos_proxy.heal()  # the budget would reset the next use too

                    try:
                        rows, reading = await asyncio.wait_for(
                            connection.run_sync(work), STEP_TIMEOUT
                        )
                    except engine.dialect.loaded_dbapi.Error as error:
                        seen[read].add(_facts(error))
                        cut[read].append(budget)
                        await connection.invalidate()
                        continue
                    seen[read].add(("ok", tuple(rows)))
                    if read and reading is not None:
                        readings.add((len(reading.values), reading.values[0] is not None))
                    try:
                        await connection.rollback()
                    except sa.exc.DBAPIError:
                        # A budget that ended with the statement's last byte: the reset came
                        # right after its whole reply.
                        await connection.invalidate()
        finally:
            await engine.dispose()
    assert seen[True] <= seen[False], (seen[True], seen[False])
    assert readings == {(3, True)}  # every read came whole: the xid, synchronous_commit, the pid
    # The question's bytes were cut too (its flight is longer), and each cut was a plain one.
    assert max(cut[True]) > max(cut[False])
    assert {facts for facts in seen[True] if facts[0] != "ok"} == {
        ("Error", "ConnectionDoesNotExistError")
    }


@pytest.mark.parametrize("read", [False, True])
async def test_a_cancelled_task_while_the_flight_is_held(
    server: Any, chaos_proxy: ChaosProxy, read: bool
) -> None:
    """The statement's flight (the question in front, or not) held in the network, the task
    cancelled: asyncpg asks the server to cancel and reads on to ReadyForQuery, the question's
    replies taken out on the way; the connection then answers the next statement right."""
    engine = create_async_engine(
        chaos_proxy.route(server.url("asyncpg")), pool_size=1, max_overflow=0
    )
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(WRITE, ("warm",))  # prepared: one flight to hold
            await connection.rollback()
            raw = await connection.get_raw_connection()
            watch = _goodbye_watch(raw.driver_connection)
            assert watch is not None

            sending: list[bool] = []

            def held(c: sa.Connection) -> object:
                c.exec_driver_sql("SELECT 1")  # BEGIN sent: the statement's Bind is held
                chaos_proxy.blackhole()
                # asyncpg writes the Bind before it first yields to the loop.
                return _send(
                    c, WRITE, ("held",), read=read, begin=False, before=lambda: sending.append(True)
                )

            task = asyncio.create_task(connection.run_sync(held))
            try:
                await _until(lambda: sending, "the flight to be sent")
                await asyncio.sleep(0)  # the greenlet's step, writing the Bind, has run
                assert (watch.replies is not None) is read
                task.cancel()
            finally:
                chaos_proxy.heal()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, STEP_TIMEOUT)
        # The same connection, back in the pool or replaced by SQLAlchemy: the next works.
        async with engine.connect() as connection:
            rows, reading = await connection.run_sync(
                lambda c: _send(c, WRITE, ("after",), read=True)
            )
            assert rows == [(1, "after")]
            assert reading is not None
            xid = (
                await connection.exec_driver_sql("SELECT pg_current_xact_id_if_assigned()::text")
            ).scalar()
            assert reading.values[0] == xid
            await connection.rollback()
    finally:
        await engine.dispose()
