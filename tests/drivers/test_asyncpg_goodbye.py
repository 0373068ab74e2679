"""asyncpg and the server's goodbye: a pooled connection whose backend said FATAL is never
handed out, though its socket has not closed yet.

PostgreSQL says goodbye (an ErrorResponse, severity FATAL: a terminated backend, a shutdown)
before it closes the socket. asyncpg reads that message on its event loop while no operation
runs, finds no operation to give it to, and its protocol waits for a ReadyForQuery that never
comes; its next operation fails with ``InternalClientError: cannot switch to state 15; another
operation (2) is in progress``. Until the close arrives, its socket looks quiet and
``is_closed()`` is False. A relay that passes the goodbye on but holds the close opens that
window for as long as a test needs it, instead of the milliseconds it lasts in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import dropsafe
from dropsafe._drivers import Health
from dropsafe._drivers.asyncpg import Asyncpg, _ends_session
from dropsafe._drivers.sockets import poll
from relays import CloseHoldingRelay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncSession

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.fault, pytest.mark.timeout(30)]

STEP_TIMEOUT = 10.0


async def _until(condition: object, what: str) -> None:
    """Wait (yielding to the loop, which does the work) until ``condition()``, bounded."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def _pooled(engine: AsyncEngine, count: int) -> list[object]:
    """Open ``count`` pooled connections, each used once, all checked in; their DBAPI ones."""
    connections = [await engine.connect() for _ in range(count)]
    natives = []
    for connection in connections:
        await connection.execute(sa.text("SELECT 1"))
        raw = await connection.get_raw_connection()
        natives.append(raw.dbapi_connection)
    for connection in connections:
        await connection.close()
    return natives


async def _goodbye_to(server: object, relay: CloseHoldingRelay, natives: list[object]) -> None:
    """Terminate the backends of ``natives``; return once asyncpg has read the goodbyes."""
    asyncpg_connections = [native.driver_connection for native in natives]  # type: ignore[attr-defined]
    pids = ", ".join(str(connection.get_server_pid()) for connection in asyncpg_connections)
    before = relay.closed_by_server
    await asyncio.to_thread(
        server.execute,  # type: ignore[attr-defined]
        f"SELECT pg_terminate_backend(pid, 5000) FROM unnest(ARRAY[{pids}]) AS pid",
    )
    await _until(lambda: relay.closed_by_server == before + len(natives), "the server's closes")
    # Passed on over loopback, so already in the client's socket: read once it looks quiet.
    await _until(
        lambda: all(
            poll(connection._transport.get_extra_info("socket")) is Health.QUIET
            for connection in asyncpg_connections
        ),
        "asyncpg to read the goodbyes",
    )
    assert not any(connection.is_closed() for connection in asyncpg_connections)


@contextlib.asynccontextmanager
async def _relayed_engine(
    server: object, size: int, **options: object
) -> AsyncIterator[tuple[CloseHoldingRelay, AsyncEngine]]:
    """An engine of ``size`` pooled connections to ``server`` through a close-holding relay."""
    relay = CloseHoldingRelay(server.host, server.port)  # type: ignore[attr-defined]
    await relay.start()
    url = relay.route(server.url("asyncpg"))  # type: ignore[attr-defined]
    engine = dropsafe.create_async_engine(url, pool_size=size, max_overflow=0, **options)
    try:
        yield relay, engine
    finally:
        relay.release()  # a graceful close waits for the server's close
        await engine.dispose()
        await relay.stop()


async def test_probe_sees_the_goodbye_of_an_idle_connection(shared_server):
    """The look at checkout says CLOSED, not QUIET, for a connection the server said FATAL to."""
    async with _relayed_engine(shared_server, 2) as (relay, engine):
        natives = await _pooled(engine, 2)
        driver = Asyncpg()
        probers = [driver.prober(native) for native in natives]
        await _goodbye_to(shared_server, relay, natives[:1])
        assert driver.probe(natives[0]) is Health.CLOSED
        assert probers[0]() is Health.CLOSED
        assert driver.probe(natives[1]) is Health.QUIET  # its neighbour heard nothing


async def test_a_first_statement_after_goodbyes_to_the_whole_pool_succeeds(shared_server):
    """Zero code: every pooled connection heard FATAL (a restart, terminated backends), and the
    next request's first statement still runs, on a fresh connection."""
    events: list[object] = []
    policy = dropsafe.Policy(hooks=(events.append,))
    async with _relayed_engine(shared_server, 3, policy=policy) as (relay, engine):
        natives = await _pooled(engine, 3)
        await _goodbye_to(shared_server, relay, natives)
        async with engine.connect() as connection:
            assert (await connection.execute(sa.text("SELECT 1"))).scalar() == 1
            raw = await connection.get_raw_connection()
            assert raw.dbapi_connection not in natives
    replaced = [event for event in events if type(event).__name__ == "DeadConnectionReplaced"]
    assert replaced, events
    assert replaced[0].pool_wide  # type: ignore[attr-defined]


async def test_a_unit_never_gets_a_connection_that_heard_goodbye(shared_server):
    """The unit's one attempt runs on a fresh connection: nothing fails, nothing is replayed."""
    events: list[object] = []
    policy = dropsafe.Policy(hooks=(events.append,))
    async with _relayed_engine(shared_server, 3, policy=policy) as (relay, engine):
        natives = await _pooled(engine, 3)
        await _goodbye_to(shared_server, relay, natives)

        async def unit(session: AsyncSession) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        sessions = async_sessionmaker(engine)
        one_attempt = dropsafe.UnitPolicy(max_attempts=1)
        assert await dropsafe.run_transaction_async(sessions, unit, policy=one_attempt) == 1
    kinds = {type(event).__name__ for event in events}
    assert "DeadConnectionReplaced" in kinds
    # Met by a statement, a goodbye'd connection is invalidated (and the statement replayed).
    assert not kinds & {"ConnectionInvalidated", "FirstStatementReplayed", "RetryScheduled"}


async def test_a_goodbye_in_the_middle_of_a_transaction_is_a_disconnect(shared_server):
    """The connection was checked out, between statements: the next statement fails, with an
    error the unit machinery retries (a disconnect), and the connection is invalidated."""
    async with (
        _relayed_engine(shared_server, 1) as (relay, engine),
        engine.connect() as connection,
    ):
        await connection.execute(sa.text("SELECT 1"))
        raw = await connection.get_raw_connection()
        await _goodbye_to(shared_server, relay, [raw.dbapi_connection])
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await connection.execute(sa.text("SELECT 2"))
        assert caught.value.connection_invalidated
        assert dropsafe.classify(caught.value) is dropsafe.ErrorKind.DISCONNECT


def _error_response(*fields: bytes) -> bytes:
    body = b"".join(field + b"\x00" for field in fields) + b"\x00"
    return b"E" + (4 + len(body)).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("message", "ends"),
    [
        (_error_response(b"SFATAL", b"VFATAL", b"C57P01", b"Mterminating connection"), True),
        (_error_response(b"SPANIC", b"VPANIC", b"CXX000", b"Mboom"), True),
        # A server speaking German: only the untranslated V says FATAL.
        (_error_response(b"SSCHWERWIEGEND", b"VFATAL", b"C57P01", b"Mbeende"), True),
        # PgBouncer sends no V field.
        (_error_response(b"SFATAL", b"C08P01", b"Mclient_idle_timeout"), True),
        (_error_response(b"SERROR", b"VERROR", b"C23505", b"Mduplicate key"), False),
        # FATAL in a message's text, or in the next message, is not this message's severity.
        (_error_response(b"SERROR", b"VERROR", b"C22000", b"Mwas VFATAL"), False),
        (_error_response(b"SERROR", b"VERROR", b"C22000") + _error_response(b"SFATAL"), False),
    ],
)
def test_a_message_that_ends_the_session_is_told_by_its_severity(message, ends):
    """The watch's test of what the loop read (logic only: the faults are above)."""
    assert _ends_session(message) is ends
