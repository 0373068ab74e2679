"""asyncpg through a hardened async engine: a lost COMMIT reply resolved by the xid read in flight.

tests/engine/test_xid_in_flight.py proves the engine half on the sync drivers; this is the same
on asyncpg (`Asyncpg.send_reading_xid`: the question in front of the first writing statement's
Bind). Before it, asyncpg read nothing: a COMMIT whose reply was lost failed the request with
asyncpg's error whatever the server had done (the committed write raised; the one that never
arrived was never done). What the app receives and the round trips counted on the wire are the
same with the read as without.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe._bench._turns import TurnCounter
from dropsafe.events import CommitResolved, TransactionReplayed
from dropsafe.testing import kernel_blackhole, kernel_blackhole_unavailable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncEngine

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.fault, pytest.mark.timeout(90)]

NO_BLACKHOLE = kernel_blackhole_unavailable()
INSERT = sa.text("INSERT INTO lost_commit_a (v) VALUES (:v)")


@pytest.fixture(scope="module")
def server(shared_server: Any) -> Any:
    shared_server.execute(
        "CREATE TABLE lost_commit_a (v int NOT NULL); "
        "CREATE TABLE lost_commit_a_unique (v int NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )
    return shared_server


@pytest.fixture(autouse=True)
def _empty(server: Any) -> None:
    server.execute("TRUNCATE lost_commit_a, lost_commit_a_unique")


def _engine(
    server: Any, events: list[object], *, reads: bool = True, url: str | None = None
) -> Any:
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
        pool=dropsafe.PoolPolicy(replay_transaction=reads),
        unit=dropsafe.UnitPolicy(commit_status_timeout=20),
        hooks=(events.append,),
    )
    return dropsafe.create_async_engine(
        url or server.url("asyncpg"), policy=policy, pool_size=1, max_overflow=0
    )


def _count(server: Any, table: str = "lost_commit_a") -> int:
    return int(server.execute(f"SELECT count(*) FROM {table}")[0][0])


def _resolved(events: list[object]) -> list[str]:
    return [e.outcome for e in events if isinstance(e, CommitResolved)]


def _replays(events: list[object]) -> list[str]:
    return [e.outcome for e in events if isinstance(e, TransactionReplayed)]


@contextlib.asynccontextmanager
async def _lost_at_commit(engine: AsyncEngine, direction: str) -> AsyncIterator[None]:
    """The COMMIT's packets dropped by the kernel from the moment it is sent (``direction``
    "to": the reply lost, the COMMIT done; "both": the COMMIT never reaches the server)."""
    holes = contextlib.ExitStack()

    def cut(conn: sa.Connection) -> None:
        if not holes._exit_callbacks:
            native = conn.connection.driver_connection
            port = native._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
            holes.enter_context(kernel_blackhole(int(port), direction=direction))  # type: ignore[arg-type]

    sa.event.listen(engine.sync_engine, "commit", cut)
    try:
        with holes:
            yield
    finally:
        sa.event.remove(engine.sync_engine, "commit", cut)


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
async def test_a_committed_write_whose_reply_was_lost_returns(server: Any) -> None:
    events: list[object] = []
    engine = _engine(server, events)
    try:
        async with engine.connect() as conn, _lost_at_commit(engine, "to"):
            await conn.execute(INSERT, {"v": 1})
            await conn.commit()  # before: DBAPIError (connection was closed / timed out)
        assert _count(server) == 1
        assert _resolved(events) == ["committed"]
        assert _replays(events) == []
        async with engine.connect() as conn:  # the lost connection was not put back
            assert (await conn.execute(sa.text("SELECT count(*) FROM lost_commit_a"))).scalar() == 1
    finally:
        await engine.dispose()


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
async def test_a_commit_that_never_arrived_is_fenced_replayed_and_committed_once(
    server: Any,
) -> None:
    events: list[object] = []
    engine = _engine(server, events)
    try:
        async with engine.connect() as conn, _lost_at_commit(engine, "both"):
            await conn.execute(sa.text("INSERT INTO lost_commit_a_unique (v) VALUES (7)"))
            await conn.commit()
        assert _count(server, "lost_commit_a_unique") == 1
        assert _resolved(events) == ["aborted"]
        assert _replays(events) == ["replayed"]
    finally:
        await engine.dispose()


async def _what_the_app_sees(engine: AsyncEngine) -> list[object]:
    seen: list[object] = []
    async with engine.connect() as conn:
        insert = "INSERT INTO lost_commit_a (v) VALUES (1), (2) RETURNING v"
        seen.append((await conn.execute(sa.text(insert))).all())
        seen.append((await conn.execute(sa.text("UPDATE lost_commit_a SET v = v + 10"))).rowcount)
        await conn.rollback()
    async with engine.connect() as conn:
        await conn.execute(sa.text("INSERT INTO lost_commit_a_unique (v) VALUES (5)"))
        await conn.commit()
    async with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await conn.execute(sa.text("UPDATE lost_commit_a SET nope = 1"))
        seen.append((type(raised.value.orig), str(raised.value.orig).splitlines()[0]))
    async with engine.connect() as conn:
        await conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await conn.execute(INSERT, {"v": 9})
        seen.append((type(raised.value.orig), str(raised.value.orig).splitlines()[0]))
    return seen


async def test_the_app_sees_the_same_with_the_read(server: Any) -> None:
    engine = _engine(server, [])
    try:
        with_read = await _what_the_app_sees(engine)
    finally:
        await engine.dispose()
    server.execute("TRUNCATE lost_commit_a, lost_commit_a_unique")
    engine = _engine(server, [], reads=False)
    try:
        without = await _what_the_app_sees(engine)
    finally:
        await engine.dispose()
    assert with_read == without


async def test_the_read_makes_no_round_trip_of_its_own(server: Any) -> None:
    async def turns(reads: bool) -> int:
        with TurnCounter(server.host, server.port) as relay:
            engine = _engine(server, [], reads=reads, url=relay.route(server.url("asyncpg")))
            try:
                async with engine.connect():  # connected, and its first questions asked
                    pass
                relay.reset()
                for v in range(3):
                    async with engine.connect() as conn:
                        await conn.execute(INSERT, {"v": v})
                        await conn.execute(INSERT, {"v": v})
                        await conn.commit()
                return relay.turns
            finally:
                await engine.dispose()

    assert await turns(reads=True) == await turns(reads=False)
