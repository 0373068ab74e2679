"""asyncpg reads the transaction's xid in the statement's own flight, and the app sees nothing.

`Asyncpg.send_reading_xid` (``dropsafe._drivers.asyncpg_flight``) puts the question's Parse,
Bind and Execute in front of the statement's Bind, in the same write, and takes their replies
out of the stream before asyncpg reads it. Proven against a real server, each statement run
twice from the same state (rolled back between), with the read and without: the same rows,
rowcount, description and error (class, SQLSTATE, message); the same round trips counted on
the wire (`TurnCounter`); the xid read is the transaction's. And under faults: a backend
terminated, the connection reset at each byte of the flight, the task cancelled: the app sees
what it sees without the read, and the connection stays in step with its server. On dropsafe
before this, asyncpg read nothing (the default `Driver.send_reading_xid`).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from asyncpg_sending import send_statement
from sqlalchemy.ext.asyncio import create_async_engine

from dropsafe._bench._turns import TurnCounter
from dropsafe._drivers.asyncpg import Asyncpg

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from dropsafe._drivers.base import XidReading

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.timeout(60)]

ASYNCPG = Asyncpg()
STEP_TIMEOUT = 10.0

# Statements that may write, as SQLAlchemy's asyncpg dialect sends them ($n parameters).
STATEMENTS: dict[str, tuple[str, tuple[object, ...]]] = {
    "insert": ("INSERT INTO flight (id, v) VALUES ($1, $2)", (100, "a")),
    "insert returning many": (
        (
            "INSERT INTO flight (id, v) SELECT g, 'x' || g "
            "FROM generate_series($1::int, $2::int) g RETURNING id, v"
        ),
        (200, 1200),
    ),
    "update": ("UPDATE flight SET v = v || $1 WHERE id < $2", ("!", 4)),
    "update returning": ("UPDATE flight SET v = $1 WHERE id = $2 RETURNING id, v", ("b", 2)),
    "delete none": ("DELETE FROM flight WHERE id = $1", (-1,)),
    "delete returning": ("DELETE FROM flight WHERE id >= $1 RETURNING *", (3,)),
    "with cte": (
        (
            "WITH moved AS (DELETE FROM flight WHERE id = $1 RETURNING id, v) "
            "INSERT INTO flight (id, v) SELECT id + 1000, v FROM moved RETURNING id"
        ),
        (1,),
    ),
    "with read only": ("WITH r AS (SELECT id FROM flight) SELECT count(*) FROM r", ()),
    "merge": (
        (
            "MERGE INTO flight f USING (VALUES ($1::int, $2::text)) s(id, v) ON f.id = s.id "
            "WHEN MATCHED THEN UPDATE SET v = s.v WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)"
        ),
        (2, "m"),
    ),
}

ERRORS: dict[str, tuple[str, tuple[object, ...]]] = {
    "unique violation": ("INSERT INTO flight (id, v) VALUES ($1, $2)", (1, "dup")),
    "division by zero": ("UPDATE flight SET v = (1 / $1)::text WHERE id = 1", (0,)),
    "bad cast": ("INSERT INTO flight (id, v) VALUES ($1::text::int, 'x')", ("nope",)),
    "check violation": ("INSERT INTO flight (id, v) VALUES ($1, $2)", (-5, "neg")),
}


@dataclass
class Seen:
    """What the app sees of one statement."""

    rows: list[tuple[object, ...]] | None
    rowcount: int
    description: object
    error: tuple[str, object, str] | None = None


@pytest.fixture(scope="module")
def server(shared_server: Any) -> Any:
    shared_server.execute(
        "CREATE TABLE IF NOT EXISTS flight (id int PRIMARY KEY CHECK (id >= 0), v text); "
        "TRUNCATE flight; INSERT INTO flight SELECT g, 'v' || g FROM generate_series(1, 5) g"
    )
    return shared_server


async def _until(condition: Callable[[], object], what: str) -> None:
    """Wait (yielding to the loop) until ``condition()``, bounded."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _run(
    sync_connection: sa.Connection, statement: str, params: Any, *, read: bool, **how: bool
) -> tuple[Seen, XidReading | None]:
    """Send ``statement`` as SQLAlchemy's cursor does, with the xid read or without."""
    try:
        cursor, reading = send_statement(sync_connection, statement, params, read=read, **how)
    except Exception as error:
        return Seen(None, -1, None, _error_facts(error)), None
    rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else None
    return Seen(rows, cursor.rowcount, cursor.description), reading


def _error_facts(error: BaseException) -> tuple[str, object, str]:
    cause = error.__cause__ or error
    return (type(error).__name__, getattr(cause, "sqlstate", None), str(cause))


def _current_xid(sync_connection: sa.Connection) -> str | None:
    value = sync_connection.exec_driver_sql(
        "SELECT pg_current_xact_id_if_assigned()::text"
    ).scalar()
    return None if value is None else str(value)


async def _once(
    engine: AsyncEngine,
    statement: str,
    params: Any,
    *,
    read: bool,
    first: str | None = None,
    **how: bool,
) -> tuple[Seen, XidReading | None, str | None]:
    """One transaction: ``first`` (if any), the statement, the xid; rolled back.

    ``how``: a server-side cursor, or executemany (its Seen's rows: the table after it).
    """
    async with engine.connect() as connection:

        def work(sync_connection: sa.Connection) -> tuple[Seen, XidReading | None, str | None]:
            if first is not None:
                sync_connection.exec_driver_sql(first)
            seen, reading = _run(sync_connection, statement, params, read=read, **how)
            xid = None if seen.error else _current_xid(sync_connection)
            if how.get("many") and not seen.error:
                table = sync_connection.exec_driver_sql("SELECT * FROM flight ORDER BY id")
                seen.rows = [tuple(row) for row in table]
            return seen, reading, xid

        try:
            return await connection.run_sync(work)
        finally:
            await connection.rollback()


@pytest.fixture(params=["tls", "plain"])
async def engine(server: Any, request: pytest.FixtureRequest) -> Any:
    """One pooled connection over TLS (asyncio's SSL transport) or plain TCP."""
    params = {"ssl": "disable"} if request.param == "plain" else {}
    engine = create_async_engine(server.url("asyncpg", **params), pool_size=1, max_overflow=0)
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        ssl = raw.driver_connection._transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        assert (ssl is not None) is (request.param == "tls")
    yield engine
    await engine.dispose()


@pytest.mark.parametrize("name", list(STATEMENTS))
async def test_the_app_sees_the_same_and_the_xid_is_the_transactions(
    engine: AsyncEngine, name: str
) -> None:
    statement, params = STATEMENTS[name]
    async with engine.connect() as connection:
        version = connection.dialect.server_version_info or (0,)
    if name == "merge" and version < (15,):
        pytest.skip("MERGE is PostgreSQL 15's")
    plain, _, _ = await _once(engine, statement, params, read=False)
    for attempt in ("first execution", "prepared statement reused"):
        seen, reading, xid = await _once(engine, statement, params, read=True)
        assert seen == plain, attempt
        assert reading is not None, attempt
        assert reading.assigned
        assert reading.values[0] == xid, attempt
        assert reading.values[1] == "on"  # synchronous_commit


async def test_the_wal_position_too(engine: AsyncEngine) -> None:
    statement, params = STATEMENTS["insert returning many"]
    plain, _, _ = await _once(engine, statement, params, read=False)
    seen, reading, xid = await _once(engine, statement, params, read=True, with_wal=True)
    assert seen == plain
    assert reading is not None
    assert reading.values[0] == xid
    assert len(reading.values) == 4  # xid, synchronous_commit, the backend's pid, WAL
    assert int(reading.values[2] or 0) > 0
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", reading.values[3] or "")


async def test_a_server_side_cursor(engine: AsyncEngine) -> None:
    statement, params = STATEMENTS["insert returning many"]
    plain, _, _ = await _once(engine, statement, params, read=False, server_side=True)
    assert plain.rows is not None
    assert len(plain.rows) == 1001
    seen, reading, xid = await _once(engine, statement, params, read=True, server_side=True)
    assert seen == plain
    assert reading is not None
    assert reading.values[0] == xid


async def test_executemany(engine: AsyncEngine) -> None:
    statement = "UPDATE flight SET v = $1 WHERE id = $2"
    params = [(f"many{n}", n) for n in range(1, 5)]
    plain, _, _ = await _once(engine, statement, params, read=False, many=True)
    seen, reading, xid = await _once(engine, statement, params, read=True, many=True)
    assert seen == plain
    assert plain.rows is not None
    assert plain.rows[0][1:] == ("many1",)
    assert reading is not None
    assert reading.values[0] == xid


def test_on_uvloop_nothing_is_read_and_the_statement_runs(server: Any) -> None:
    """uvloop's transport cannot be hooked: the statement goes alone, as without dropsafe."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[Seen, XidReading | None]:
        engine = create_async_engine(server.url("asyncpg"), pool_size=1)
        try:
            seen, reading, _ = await _once(engine, *STATEMENTS["update returning"], read=True)
        finally:
            await engine.dispose()
        return seen, reading

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        seen, reading = runner.run(main())
    assert seen.rows == [(2, "b")]
    assert reading is None


async def test_the_first_statement_after_begin_and_one_after_another(engine: AsyncEngine) -> None:
    statement, params = STATEMENTS["update returning"]
    first = "SELECT count(*) FROM flight"
    plain, _, _ = await _once(engine, statement, params, read=False, first=first)
    seen, reading, xid = await _once(engine, statement, params, read=True, first=first)
    assert seen == plain
    assert reading is not None
    assert reading.values[0] == xid


@pytest.mark.parametrize("name", list(ERRORS))
async def test_a_statement_error_is_the_statements_own(engine: AsyncEngine, name: str) -> None:
    statement, params = ERRORS[name]
    plain, _, _ = await _once(engine, statement, params, read=False)
    assert plain.error is not None
    seen, reading, _ = await _once(engine, statement, params, read=True)
    assert seen == plain
    assert reading is None
    # The stream stayed in step: the same connection answers the next statement right.
    again, reading, xid = await _once(engine, *STATEMENTS["update returning"], read=True)
    assert again.rows == [(2, "b")]
    assert reading is not None
    assert reading.values[0] == xid


async def test_in_an_aborted_transaction_the_error_is_the_one_without_the_read(
    engine: AsyncEngine,
) -> None:
    statement, params = STATEMENTS["update returning"]
    await _once(engine, statement, params, read=False)  # prepared: its Bind is the first write
    results = []
    for read in (False, True):
        async with engine.connect() as connection:

            def work(sync_connection: sa.Connection, read: bool = read) -> tuple[Seen, object]:
                with pytest.raises(sa.exc.DBAPIError):
                    sync_connection.exec_driver_sql("SELECT 1 / 0")
                return _run(sync_connection, statement, params, read=read)

            results.append(await connection.run_sync(work))
            await connection.rollback()
    (plain, _), (seen, reading) = results
    assert plain.error is not None
    assert plain.error[1] == "25P02"
    assert seen == plain
    assert reading is None
    again, reading, _ = await _once(engine, statement, params, read=True)
    assert again.rows == [(2, "b")]
    assert reading is not None


async def test_round_trips_on_the_wire_are_the_same(server: Any) -> None:
    statement, params = STATEMENTS["insert returning many"]
    counts: dict[tuple[str, bool], int] = {}
    with TurnCounter(server.host, server.port) as counter:
        engine = create_async_engine(counter.route(server.url("asyncpg")), pool_size=1)
        try:
            for read in (False, True):
                async with engine.connect() as connection:
                    await connection.exec_driver_sql("SELECT 1")
                    await connection.rollback()
                    for attempt in ("first", "again"):

                        def work(sync_connection: sa.Connection, read: bool = read) -> object:
                            sync_connection.begin()  # what the raw cursor does, rolled back
                            counter.reset()
                            seen, reading = _run(sync_connection, statement, params, read=read)
                            assert seen.error is None
                            assert (reading is not None) is read
                            return counter.turns

                        counts[attempt, read] = await connection.run_sync(work)
                        await connection.rollback()
                await engine.dispose()  # each pass prepares the statement anew
        finally:
            await engine.dispose()
    # BEGIN, Parse and Describe, Bind and Execute; then the prepared statement: BEGIN, Bind.
    assert counts == {
        ("first", False): 3,
        ("first", True): 3,
        ("again", False): 2,
        ("again", True): 2,
    }


async def test_the_transport_is_given_back(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        native = raw.driver_connection
        assert native is not None
        await connection.run_sync(lambda c: _run(c, *STATEMENTS["insert"], read=True))
        transport = native._transport
        assert "write" not in vars(transport)
        assert "writelines" not in vars(transport)
        assert (
            ASYNCPG.backend_pid(raw.dbapi_connection)
            == (await connection.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
        )
        await connection.rollback()


async def test_autocommit_reads_nothing(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        seen, reading = await connection.run_sync(
            lambda c: _run(c, *STATEMENTS["delete none"], read=True)
        )
        assert seen.error is None
        assert reading is None


async def test_notices_between_the_replies(engine: AsyncEngine) -> None:
    """The server's DEBUG notices come between the question's replies: passed on, in order."""
    statement, params = STATEMENTS["update returning"]
    first = "SET LOCAL client_min_messages = debug5"
    notices: list[str] = []
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        native = raw.driver_connection
        assert native is not None
        native.add_log_listener(lambda _connection, message: notices.append(str(message)))
    plain, _, _ = await _once(engine, statement, params, read=False, first=first)
    await _until(lambda: notices, "the notices")
    without = len(notices)
    seen, reading, xid = await _once(engine, statement, params, read=True, first=first)
    assert seen == plain
    assert reading is not None
    assert reading.values[0] == xid
    # The question's own DEBUG notices came between its replies, passed on in order (a
    # difference only a listener at DEBUG2 or below sees), then the statement's.
    ours = "bind <unnamed> to <unnamed>"
    await _until(lambda: any(ours in notice for notice in notices[without:]), "the notices")
    after = notices[without:]
    first_ours = next(n for n, notice in enumerate(after) if ours in notice)
    assert any("to __asyncpg_stmt" in notice for notice in after[first_ours:])


async def test_connections_side_by_side_read_their_own(server: Any) -> None:
    engine = create_async_engine(server.url("asyncpg"), pool_size=4, max_overflow=0)
    try:
        results = await asyncio.gather(
            *(
                _once(
                    engine,
                    "UPDATE flight SET v = $1 WHERE id = $2 RETURNING v",
                    (f"s{n}", n),
                    read=True,
                )
                for n in range(1, 5)
            )
        )
    finally:
        await engine.dispose()
    for n, (seen, reading, xid) in enumerate(results, start=1):
        assert seen.rows == [(f"s{n}",)]
        assert reading is not None
        assert reading.values[0] == xid
    assert len({xid for _, _, xid in results}) == 4


@pytest.mark.skipif(
    shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") is None,
    reason="PgBouncer is not installed (apt-get install pgbouncer)",
)
async def test_through_pgbouncer_in_transaction_mode(server: Any) -> None:
    """asyncpg set up for a transaction-mode pooler (what ``pooler="transaction"`` sets:
    no statement caches, a unique name per prepared statement): the statement is still named,
    the question rides in front of it through PgBouncer."""
    from dropsafe.testing import PgBouncer

    connect_args = {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__flight_{uuid.uuid4().hex}__",
    }
    with PgBouncer(server.server, pool_mode="transaction") as bouncer:
        url = bouncer.url("asyncpg", database=server.database.name)
        engine = create_async_engine(url, connect_args=connect_args, pool_size=1)
        try:
            for name in ("insert returning many", "update returning", "with cte"):
                statement, params = STATEMENTS[name]
                plain, _, _ = await _once(engine, statement, params, read=False)
                seen, reading, xid = await _once(engine, statement, params, read=True)
                assert seen == plain, name
                assert reading is not None, name
                assert reading.values[0] == xid, name
        finally:
            await engine.dispose()
