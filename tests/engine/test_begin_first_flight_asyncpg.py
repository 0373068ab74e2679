"""BEGIN rides the first statement's flight on asyncpg, and nothing else changes (issue 28).

Counted on the wire through a `FlightProxy` (a flight: what the client sends after the server
last spoke). On the code before this, SQLAlchemy's asyncpg adapter awaited asyncpg's
``Transaction.start()`` (a ``Q BEGIN;`` flight of its own) before every transaction's first
statement: a single query in a Session was 3 flights (BEGIN, the statement, the checkin
ROLLBACK), a one-INSERT unit 3; with BEGIN in the statement's flight, 2 each (the first tests
failed there with 3). The rest attack what must not change, each compared with the option off:
the statement runs inside the transaction (its xid is the next statement's), transaction
characteristics, a first use of a statement (Parse first), executemany, a server-side cursor,
savepoints, AUTOCOMMIT, SQLAlchemy's statement cache off, a BEGIN the server refuses (its
error raised, the statement not run: asserted on the server), a statement that fails before
anything is sent (BEGIN then rides the ROLLBACK's or the next statement's Query), a connection
lost with BEGIN and the INSERT in flight (one row), the xid question in the same flight.
"""

from __future__ import annotations

import asyncio
import types
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from first_flight import CHARACTERISTICS, flight_url
from sqlalchemy.ext.asyncio import AsyncSession

import dropsafe
from dropsafe._bench._flights import Strike
from dropsafe._bench._turns import TurnCounter
from dropsafe._drivers import asyncpg_begin
from dropsafe._drivers.asyncpg import Asyncpg
from dropsafe._drivers.asyncpg_flight import Flight

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.shares_server, pytest.mark.timeout(90)]

SELECT_ONE = sa.text("SELECT 1")
TABLE = "first_flight_asyncpg"
#: Bounds every wait on a fault (a link held silent is reset after Strike.hold_s).
DEADLINE_S = 30.0
XID = sa.text("SELECT pg_current_xact_id_if_assigned()::text")
WRITE_XID = sa.text("SELECT pg_current_xact_id()::text")


@pytest.fixture(scope="module")
def table(shared_server: Any) -> str:
    shared_server.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (v int)")
    return TABLE


def _url(server: Any, proxy: Any, **query: str) -> sa.URL:
    return flight_url(server, proxy, "asyncpg", **query)


def _engine(
    url: sa.URL, *, first_flight: bool = True, events: list[object] | None = None, **kwargs: Any
) -> AsyncEngine:
    policy = dropsafe.Policy(
        hooks=() if events is None else (events.append,),
        pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight),
    )
    return dropsafe.create_async_engine(url, policy=policy, pool_size=1, **kwargs)


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), DEADLINE_S))


async def _counted(
    proxy: Any, engine: AsyncEngine, request: Callable[[], Awaitable[None]], times: int = 3
) -> tuple[float, list[str]]:
    """Run ``request`` once to connect and warm, then ``times`` more; the flights per request.

    Each count follows a checkout of the engine's one connection, which sends nothing of its
    own and reads the checkin ROLLBACK's reply left unread: the proxy has forwarded it then.
    """

    async def settled() -> int:
        async with engine.connect():
            pass
        return len(proxy.query_flights())

    await request()
    start = await settled()
    for _ in range(times):
        await request()
    end = await settled()
    labels = [flight.label for flight in proxy.query_flights()[start:end]]
    return len(labels) / times, labels


def _rows(server: Any, where: str = "true") -> int:
    return int(server.execute(f"SELECT count(*) FROM {TABLE} WHERE {where}")[0][0])


# -- the flights ----------------------------------------------------------------------------


@pytest.mark.parametrize("first_flight", [True, False], ids=["first-flight", "begin-alone"])
def test_a_single_query_in_a_session(shared_server: Any, flights: Any, first_flight: bool) -> None:
    """BEGIN and SELECT in one flight, the checkin ROLLBACK in another: 2 (was 3)."""

    async def main() -> tuple[float, list[str]]:
        engine = _engine(_url(shared_server, flights), first_flight=first_flight)
        try:

            async def request() -> None:
                async with AsyncSession(engine) as session:
                    assert (await session.execute(SELECT_ONE)).scalar() == 1

            return await _counted(flights, engine, request)
        finally:
            await engine.dispose()

    per_request, labels = _run(main)
    if first_flight:
        assert per_request == 2, labels
        assert labels[0] == "P BEGIN;", labels
    else:
        assert per_request == 3, labels
        assert labels[0] == "Q BEGIN;", labels


@pytest.mark.parametrize(
    ("verify", "replay"),
    [(False, False), (True, False), (True, True)],
    ids=["unverified", "verified", "verified-replay"],
)
def test_a_one_insert_unit(
    shared_server: Any, flights: Any, table: str, verify: bool, replay: bool
) -> None:
    """A one-INSERT unit: BEGIN rides the INSERT (with the xid question, when asked): a flight less.

    With the transaction replay on, the xid question rides the INSERT's Bind too: BEGIN first,
    then the question, then the INSERT, one write.
    """
    insert = sa.text(f"INSERT INTO {table} VALUES (1)")

    async def counted(*, first_flight: bool) -> tuple[float, list[str]]:
        policy = dropsafe.Policy(
            pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight, replay_transaction=replay)
        )
        engine = dropsafe.create_async_engine(
            _url(shared_server, flights), policy=policy, pool_size=1
        )
        try:

            async def request() -> None:
                async def unit(connection: Any) -> None:
                    await connection.execute(insert)

                await dropsafe.run_transaction_async(
                    engine, unit, policy=dropsafe.UnitPolicy(verify_commits=verify)
                )

            return await _counted(flights, engine, request)
        finally:
            await engine.dispose()

    async def main() -> tuple[tuple[float, list[str]], tuple[float, list[str]]]:
        return await counted(first_flight=True), await counted(first_flight=False)

    before = _rows(shared_server)
    (on, labels), (off, alone) = _run(main)
    assert on == off - 1, (labels, alone)
    # A verified unit reads its xid in the INSERT's flight too (read_xid_in_flight, the default
    # since session 14): no flight more than unverified. Its mark would make 3.
    assert on == 2, labels
    assert labels[0] == "P BEGIN;", labels
    assert _rows(shared_server) == before + 8


def test_the_xid_question_rides_with_begin(
    shared_server: Any, flights: Any, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN, the xid question and the INSERT in one write; the xid read is the row's xmin."""
    readings: list[Any] = []
    own = Asyncpg.send_reading_xid

    def recording(self: Asyncpg, *args: Any) -> Any:
        reading = own(self, *args)
        readings.append(reading)
        return reading

    monkeypatch.setattr(Asyncpg, "send_reading_xid", recording)

    async def counted(*, first_flight: bool) -> tuple[float, list[str]]:
        policy = dropsafe.Policy(
            pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight, replay_transaction=True)
        )
        engine = dropsafe.create_async_engine(
            _url(shared_server, flights), policy=policy, pool_size=1
        )
        try:

            async def request() -> None:
                async with engine.connect() as connection:
                    await connection.execute(sa.text(f"INSERT INTO {table} VALUES (7)"))
                    await connection.execute(sa.text(f"INSERT INTO {table} VALUES (7)"))
                    await connection.commit()

            return await _counted(flights, engine, request)
        finally:
            await engine.dispose()

    async def main() -> tuple[tuple[float, list[str]], tuple[float, list[str]]]:
        return await counted(first_flight=True), await counted(first_flight=False)

    shared_server.execute(f"DELETE FROM {table} WHERE v = 7")
    (on, labels), (off, alone) = _run(main)
    assert (on, off) == (3, 4), (labels, alone)
    assert labels[0] == "P BEGIN;", labels
    xids = {row[0] for row in shared_server.execute(f"SELECT xmin FROM {table} WHERE v = 7")}
    read = {reading.values[0] for reading in readings if reading is not None}
    assert len(xids) == 8, xids
    assert read == xids, (read, xids)


# -- the statement runs in the transaction ---------------------------------------------------


def test_the_first_statement_runs_inside_the_transaction(shared_server: Any, flights: Any) -> None:
    """The first statement's xid is the transaction's: a second statement sees it assigned."""

    async def main() -> None:
        engine = _engine(_url(shared_server, flights))
        try:
            for _ in range(3):  # first use (Parse first), then cached (the Bind first)
                async with engine.connect() as connection:
                    first = (await connection.execute(WRITE_XID)).scalar()
                    assert first is not None
                    assert (await connection.execute(XID)).scalar() == first
                    await connection.rollback()
        finally:
            await engine.dispose()

    _run(main)


@pytest.mark.parametrize(
    "options",
    [*CHARACTERISTICS, pytest.param({"isolation_level": "READ COMMITTED"}, id="read-committed")],
)
def test_transaction_characteristics_are_the_same(
    shared_server: Any, flights: Any, options: dict[str, object]
) -> None:
    """The BEGIN that rides is asyncpg's own text: the same characteristics, option on or off."""
    show = sa.text(
        "SELECT current_setting('transaction_isolation'), "
        "current_setting('transaction_read_only'), current_setting('transaction_deferrable')"
    )

    async def seen(*, first_flight: bool) -> list[tuple[Any, ...]]:
        engine = _engine(_url(shared_server, flights), first_flight=first_flight)
        try:
            found = []
            for _ in range(2):
                async with engine.connect() as connection:
                    await connection.execution_options(**options)
                    found.append(tuple((await connection.execute(show)).one()))
                    await connection.rollback()
            return found
        finally:
            await engine.dispose()

    async def main() -> None:
        start = len(flights.query_flights())
        on = await seen(first_flight=True)
        labels = [flight.label for flight in flights.query_flights()[start:]]
        off = await seen(first_flight=False)
        assert on == off
        assert any(label.startswith("P BEGIN") for label in labels), labels

    _run(main)


def test_begin_text_is_asyncpgs_own() -> None:
    """`begin_text` writes what asyncpg's Transaction.start() writes, for every combination."""
    import asyncpg.transaction as apg

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[str] = []
            self._pool_release_ctr = 0
            self._top_xact = None
            self._protocol = self

        def is_in_transaction(self) -> bool:
            return False

        def is_closed(self) -> bool:
            return False

        async def execute(self, query: str) -> None:
            self.sent.append(query)

    for isolation in (None, *sorted(apg.ISOLATION_LEVELS)):
        for readonly in (False, True):
            for deferrable in (False, True):
                recorder = Recorder()
                transaction = apg.Transaction(recorder, isolation, readonly, deferrable)
                asyncio.run(transaction.start())
                fresh = apg.Transaction(recorder, isolation, readonly, deferrable)
                assert recorder.sent == [asyncpg_begin.begin_text(fresh)]


# -- BEGIN refused, cut, never sent ------------------------------------------------------------


@pytest.mark.parametrize("first", ["parse", "bind"], ids=["first-use", "cached"])
def test_a_refused_begin_is_the_error_and_the_statement_does_not_run(
    shared_server: Any, flights: Any, table: str, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The server refuses BEGIN: its error is the statement's, and the INSERT never ran.

    A BEGIN the server refuses is made by giving it a bogus isolation level (`begin_text` is
    where the text is built); the server's real answer is a syntax error. Without a Sync
    between BEGIN and the statement, the server skips the statement: no row, on the server.
    """
    insert = sa.text(f"INSERT INTO {table} VALUES (-1)")
    shared_server.execute(f"DELETE FROM {table} WHERE v = -1")

    async def main() -> list[str]:
        engine = _engine(_url(shared_server, flights))
        try:
            if first == "bind":
                async with engine.connect() as connection:  # the INSERT prepared, cached
                    await connection.execute(insert)
                    await connection.rollback()
            own = asyncpg_begin.begin_text
            monkeypatch.setattr(
                asyncpg_begin, "begin_text", lambda t: own(t)[:-1] + " ISOLATION LEVEL BOGUS;"
            )
            errors = []
            async with engine.connect() as connection:
                with pytest.raises(sa.exc.DBAPIError) as raised:
                    await connection.execute(insert)
                errors.append(str(raised.value))
                await connection.rollback()
            monkeypatch.setattr(asyncpg_begin, "begin_text", own)
            async with engine.connect() as connection:  # the connection is in step
                assert (await connection.execute(SELECT_ONE)).scalar() == 1
                assert (await connection.execute(XID)).scalar() is None
            return errors
        finally:
            await engine.dispose()

    errors = _run(main)
    assert "BOGUS" in errors[0], errors
    assert _rows(shared_server, "v = -1") == 0


@pytest.mark.fault
@pytest.mark.parametrize(
    ("phase", "then"),
    [("before", "rst"), ("after", "rst"), ("after", "fin")],
    ids=["request-lost", "reply-lost-rst", "reply-lost-fin"],
)
def test_a_connection_lost_with_begin_and_insert_in_flight_is_replayed_once(
    shared_server: Any, flights: Any, table: str, phase: str, then: str
) -> None:
    """The flight with BEGIN and the INSERT lost (before the server, or its reply): one row."""
    events: list[object] = []
    shared_server.execute(f"DELETE FROM {table} WHERE v = 80")

    async def main() -> None:
        engine = _engine(_url(shared_server, flights), events=events)
        try:
            async with engine.connect() as connection:  # connected and warm
                await connection.execute(SELECT_ONE)
            flights.reset(Strike(step=1, phase=phase, then=then))  # type: ignore[arg-type]
            try:
                async with AsyncSession(engine) as session:
                    await session.execute(sa.text(f"INSERT INTO {table} VALUES (80)"))
                    await session.commit()
                assert flights.strike is not None
                assert await asyncio.to_thread(flights.strike.done.wait, DEADLINE_S)
                assert flights.strike.fired
            finally:
                flights.reset(None)
        finally:
            await engine.dispose()

    _run(main)
    assert _rows(shared_server, "v = 80") == 1
    assert any(type(event).__name__ == "FirstStatementReplayed" for event in events), events


def test_a_terminated_backend_before_the_first_statement(shared_server: Any, table: str) -> None:
    """The backend terminated between checkout and the first statement: no row, in step after."""
    shared_server.execute(f"DELETE FROM {table} WHERE v = 81")

    async def main() -> None:
        engine = _engine(sa.make_url(shared_server.url("asyncpg")))
        try:
            async with engine.connect() as connection:
                pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
                await connection.rollback()
                shared_server.execute(f"SELECT pg_terminate_backend({pid})")
                with pytest.raises(sa.exc.DBAPIError):
                    await connection.execute(sa.text(f"INSERT INTO {table} VALUES (81)"))
            async with engine.connect() as connection:
                assert (await connection.execute(SELECT_ONE)).scalar() == 1
        finally:
            await engine.dispose()

    _run(main)
    assert _rows(shared_server, "v = 81") == 0


def test_a_statement_that_fails_before_sending_begins_nothing(
    shared_server: Any, flights: Any, table: str
) -> None:
    """Nothing sent (a parameter asyncpg cannot encode): the transaction is dropped unbegun.

    Its ROLLBACK sends nothing; a statement after the failed one begins a transaction of its
    own (BEGIN riding it), and its COMMIT commits it. The next operation could otherwise be one
    that reads ``is_in_transaction()`` before the server said so (an executemany failing
    midway): the executemany then fails midway too, and the statement after it still runs in
    a transaction.
    """
    insert = sa.text(f"INSERT INTO {table} VALUES (:v)")
    shared_server.execute(f"DELETE FROM {table} WHERE v IN (82, 89)")

    async def main() -> tuple[list[str], list[str]]:
        engine = _engine(_url(shared_server, flights))
        try:
            async with engine.connect() as connection:  # prepared, cached: the Bind goes first
                await connection.execute(insert, {"v": 82})
                await connection.rollback()
            async with engine.connect():  # the ROLLBACK's reply read
                start = len(flights.query_flights())
            async with engine.connect() as connection:
                with pytest.raises(sa.exc.DBAPIError):
                    await connection.execute(insert, {"v": "not a number"})
                await connection.rollback()
                native = (await connection.get_raw_connection()).driver_connection
                assert native is not None
                assert not native.is_in_transaction()
                middle = len(flights.query_flights())
            async with engine.connect() as connection:
                with pytest.raises(sa.exc.DBAPIError):
                    await connection.execute(insert, {"v": "not a number"})
                with pytest.raises(sa.exc.DBAPIError):
                    await connection.execute(insert, [{"v": 89}] * 5000 + [{"v": "x"}])
                await connection.execute(insert, {"v": 82})
                assert (await connection.execute(XID)).scalar() is not None
                await connection.commit()
            async with engine.connect():  # a checkout reads any reply left
                end = len(flights.query_flights())
            labels = [flight.label for flight in flights.query_flights()]
            return labels[start:middle], labels[middle:end]
        finally:
            await engine.dispose()

    unsent, after = _run(main)
    assert unsent == [], unsent
    assert after[0] == "Q BEGIN;", after  # the executemany's, alone
    assert _rows(shared_server, "v = 82") == 1
    assert _rows(shared_server, "v = 89") > 0  # the batches sent before the one that failed
    # One transaction: the executemany's rows and the INSERT after it.
    xmins = shared_server.execute(
        f"SELECT count(DISTINCT xmin::text) FROM {table} WHERE v IN (82, 89)"
    )
    assert int(xmins[0][0]) == 1


# -- the other first operations -------------------------------------------------------------


async def _compare(
    shared_server: Any,
    flights: Any,
    work: Callable[[Any], Awaitable[Any]],
    **kwargs: Any,
) -> list[str]:
    """Run ``work`` twice per option value on a fresh engine; the same results either way.

    Returns the labels of the flights ``work`` made with the option on (connected before).
    """
    results = []
    labels: list[str] = []
    for first_flight in (True, False):
        engine = _engine(_url(shared_server, flights), first_flight=first_flight, **kwargs)
        try:
            async with engine.connect():  # connected, the dialect's first questions asked
                pass
            start = len(flights.query_flights())
            results.append([await work(engine) for _ in range(2)])
            if first_flight:
                labels = [flight.label for flight in flights.query_flights()[start:]]
        finally:
            await engine.dispose()
    assert results[0] == results[1], results
    return labels


def test_executemany_first(shared_server: Any, flights: Any, table: str) -> None:
    """executemany as the first statement runs in the transaction: rolled back, no row."""
    insert = sa.text(f"INSERT INTO {table} VALUES (:v)")

    async def work(engine: AsyncEngine) -> tuple[Any, ...]:
        async with engine.connect() as connection:
            await connection.execute(insert, [{"v": 83}, {"v": 83}, {"v": 83}])
            xid = (await connection.execute(XID)).scalar()
            await connection.rollback()
        return (xid is not None, _rows(shared_server, "v = 83"))

    labels = _run(lambda: _compare(shared_server, flights, work))
    # Alone: asyncpg's executemany, failing midway, asks is_in_transaction() (below).
    assert labels[0] == "Q BEGIN;", labels
    assert _rows(shared_server, "v = 83") == 0


def _renamed(monkeypatch: pytest.MonkeyPatch, cursor: Any, name: str) -> None:
    """SQLAlchemy's cursor's ``_executemany`` coroutine renamed ``name``, as a later SQLAlchemy
    may: the same code under another name, its ``executemany`` calling it."""
    from sqlalchemy.util import await_only

    own = cursor._executemany
    code = own.__code__.replace(co_name=name, co_qualname=f"{cursor.__name__}.{name}")
    renamed = types.FunctionType(code, own.__globals__, name, own.__defaults__, own.__closure__)
    monkeypatch.delattr(cursor, "_executemany")
    monkeypatch.setattr(cursor, name, renamed, raising=False)
    monkeypatch.setattr(
        cursor,
        "executemany",
        lambda self, operation, many: await_only(renamed(self, operation, many)),
    )


def test_executemany_first_under_another_name(
    shared_server: Any, flights: Any, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy's executemany coroutine renamed: its transaction's BEGIN still goes alone.

    Told by the awaiting frame's name (before), the renamed coroutine was not recognised and
    BEGIN rode its first batch ("P BEGIN;" first, the test failed there): asyncpg's
    executemany, failing midway, would then send a ROLLBACK ending the transaction unseen. Now
    an adapter whose cursor has no ``_executemany`` gets no deferred BEGIN at all.
    """
    from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg

    _renamed(monkeypatch, sa_asyncpg.AsyncAdapt_asyncpg_cursor, "_executemany_renamed")
    insert = sa.text(f"INSERT INTO {table} VALUES (:v)")
    shared_server.execute(f"DELETE FROM {table} WHERE v = 91")

    async def main() -> list[str]:
        engine = _engine(_url(shared_server, flights))
        try:
            async with engine.connect():  # connected, the dialect's first questions asked
                pass
            start = len(flights.query_flights())
            async with engine.connect() as connection:
                await connection.execute(insert, [{"v": 91}, {"v": 91}])
                await connection.rollback()
            return [flight.label for flight in flights.query_flights()[start:]]
        finally:
            await engine.dispose()

    labels = _run(main)
    assert labels[0] == "Q BEGIN;", labels
    assert _rows(shared_server, "v = 91") == 0


def test_the_executemany_coroutine_is_found_on_sqlalchemys_cursor() -> None:
    """`asyncpg_begin.cursor_class` finds the coroutine whose BEGIN goes alone on the installed
    SQLAlchemy (this fails if it is gone or renamed: the deferred BEGIN is then off for asyncpg,
    a round trip more per transaction, never a wrong one); without it, none is found."""
    from sqlalchemy.dialects.postgresql import asyncpg as sa_asyncpg

    adapter = sa_asyncpg.AsyncAdapt_asyncpg_connection
    found = asyncpg_begin.cursor_class(adapter)
    assert found is not None
    assert issubclass(found, sa_asyncpg.AsyncAdapt_asyncpg_cursor)
    assert found._executemany.__code__.co_name == "_executemany"

    class Renamed(sa_asyncpg.AsyncAdapt_asyncpg_cursor):
        __slots__ = ()
        _executemany = None

    class Adapter(adapter):  # type: ignore[misc,valid-type]
        __slots__ = ()
        _cursor_cls = Renamed

    assert asyncpg_begin.cursor_class(Adapter) is None


def test_executemany_failing_midway_keeps_the_transaction(
    shared_server: Any, flights: Any, table: str
) -> None:
    """A parameter set asyncpg cannot encode after the first batch went: the transaction stays.

    asyncpg then asks ``is_in_transaction()``: in an explicit transaction it sends a Sync, in
    none a ROLLBACK (of the implicit one). Had BEGIN ridden the first Bind, the server would
    have said nothing yet, and that ROLLBACK would end the app's transaction, every statement
    after it running outside of one. Caught, the app goes on and commits: the same rows.
    """
    insert = sa.text(f"INSERT INTO {table} VALUES (:v)")
    many = [{"v": 87}] * 5000 + [{"v": "not a number"}]  # a batch or more sent before it

    async def work(engine: AsyncEngine) -> tuple[Any, ...]:
        shared_server.execute(f"DELETE FROM {table} WHERE v IN (87, 88)")
        async with engine.connect() as connection:
            with pytest.raises(sa.exc.DBAPIError):
                await connection.execute(insert, many)
            in_transaction = (await connection.execute(XID)).scalar()
            await connection.execute(insert, {"v": 88})
            xid = (await connection.execute(XID)).scalar()
            await connection.rollback()
        return (in_transaction is None, xid is not None, _rows(shared_server, "v IN (87, 88)"))

    _run(lambda: _compare(shared_server, flights, work))
    assert _rows(shared_server, "v IN (87, 88)") == 0


def test_a_server_side_cursor_first(shared_server: Any, flights: Any) -> None:
    """A server-side cursor (asyncpg's needs a transaction) as the first statement."""

    async def work(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as connection:
            result = await connection.stream(sa.text("SELECT g FROM generate_series(1, 120) g"))
            rows = [row[0] async for row in result]
            await connection.rollback()
        return rows

    labels = _run(lambda: _compare(shared_server, flights, work))
    assert labels[0] == "Q BEGIN;", labels  # alone: asyncpg's cursor asks the server's status


def test_a_server_side_cursor_first_in_a_unit(shared_server: Any, flights: Any) -> None:
    """A unit whose first statement is a server-side cursor: the unit begins the transaction
    (BEGIN armed) before the cursor asks for it alone. The armed BEGIN rode an empty query
    (";") there, whose reply has no command tag: asyncpg failed on it (AttributeError), every
    time (the explorer's server_side_cursor shape, after the merge)."""

    async def work(engine: AsyncEngine) -> list[Any]:
        async def unit(connection: Any) -> list[Any]:
            result = await connection.stream(sa.text("SELECT g FROM generate_series(1, 120) g"))
            return [row[0] async for row in result]

        return await dropsafe.run_transaction_async(engine, unit)

    labels = _run(lambda: _compare(shared_server, flights, work))
    # The armed BEGIN went at the head of a Query that reads nothing, before the cursor.
    assert "Q BEGIN; SELECT" in labels, labels


def test_a_savepoint_first(shared_server: Any, flights: Any, table: str) -> None:
    """A savepoint as the first statement, rolled back; the outer transaction commits."""

    async def work(engine: AsyncEngine) -> int:
        shared_server.execute(f"DELETE FROM {table} WHERE v IN (84, 85)")
        async with AsyncSession(engine) as session:
            nested = await session.begin_nested()
            await session.execute(sa.text(f"INSERT INTO {table} VALUES (84)"))
            await nested.rollback()
            await session.execute(sa.text(f"INSERT INTO {table} VALUES (85)"))
            await session.commit()
        return _rows(shared_server, "v IN (84, 85)")

    shared_server.execute(f"DELETE FROM {table} WHERE v IN (84, 85)")
    labels = _run(lambda: _compare(shared_server, flights, work))
    assert labels[0] == "P BEGIN;", labels
    assert _rows(shared_server, "v = 84") == 0


def test_autocommit_begins_nothing(shared_server: Any, flights: Any) -> None:
    """AUTOCOMMIT: no BEGIN at all, option on or off; each statement its own transaction."""

    async def work(engine: AsyncEngine) -> tuple[Any, ...]:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            first = (await connection.execute(WRITE_XID)).scalar()
            second = (await connection.execute(XID)).scalar()
        return (first is not None, second)

    labels = _run(lambda: _compare(shared_server, flights, work))
    assert labels, labels
    assert not any("BEGIN" in label for label in labels), labels


def test_sqlalchemys_statement_cache_off(shared_server: Any, flights: Any) -> None:
    """``prepared_statement_cache_size=0``: each statement prepared anew, BEGIN rides the Parse."""
    url = _url(shared_server, flights, prepared_statement_cache_size="0")

    async def main() -> list[str]:
        engine = _engine(url)
        try:
            async with engine.connect():  # connected, the dialect's first questions asked
                pass
            start = len(flights.query_flights())
            for _ in range(2):
                async with engine.connect() as connection:
                    first = (await connection.execute(WRITE_XID)).scalar()
                    assert (await connection.execute(XID)).scalar() == first
                    await connection.rollback()
            return [flight.label for flight in flights.query_flights()[start:]]
        finally:
            await engine.dispose()

    labels = _run(main)
    assert labels[0] == "P BEGIN;", labels


def test_over_tls_a_single_query_waits_for_a_round_trip_less(shared_server: Any) -> None:
    """Over TLS (the server's default URL), counted by a relay: a round trip less per request."""

    async def turns(*, first_flight: bool) -> int:
        with TurnCounter(shared_server.host, shared_server.port) as relay:
            url = sa.make_url(relay.route(shared_server.url("asyncpg")))
            engine = _engine(url, first_flight=first_flight)
            try:
                async with engine.connect() as connection:  # connected, first questions asked
                    assert (await connection.execute(SELECT_ONE)).scalar() == 1
                async with engine.connect():  # its ROLLBACK's reply read
                    pass
                relay.reset()
                for _ in range(3):
                    async with AsyncSession(engine) as session:
                        assert (await session.execute(SELECT_ONE)).scalar() == 1
                async with engine.connect():  # the last ROLLBACK's reply read
                    pass
                return relay.turns
            finally:
                await engine.dispose()

    async def main() -> tuple[int, int]:
        return await turns(first_flight=True), await turns(first_flight=False)

    on, off = _run(main)
    assert (on, off) == (6, 9), (on, off)


@pytest.mark.fault
def test_a_task_cancelled_while_begin_and_the_insert_are_held(
    shared_server: Any, chaos_proxy: Any, table: str
) -> None:
    """BEGIN and the INSERT held in the network, the task cancelled: no row; the connection in
    step after (asyncpg asks the server to cancel and reads on, BEGIN's replies taken out)."""
    shared_server.execute(f"DELETE FROM {table} WHERE v = 86")
    insert = sa.text(f"INSERT INTO {table} VALUES (86)")

    async def until(condition: Callable[[], object], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)

    async def main() -> None:
        engine = _engine(sa.make_url(chaos_proxy.route(shared_server.url("asyncpg"))))
        try:
            async with engine.connect() as connection:  # connected, the INSERT prepared
                await connection.execute(insert)
                await connection.rollback()
                raw = await connection.get_raw_connection()
                transport = raw.driver_connection._transport  # type: ignore[union-attr]
            async with engine.connect() as connection:
                chaos_proxy.blackhole()
                try:
                    task = asyncio.create_task(connection.execute(insert))
                    # The flight went: BEGIN no longer armed on the transport.
                    await until(lambda: Flight.on(transport) is None, "the flight to go")
                    task.cancel()
                finally:
                    chaos_proxy.heal()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, DEADLINE_S)
            async with engine.connect() as connection:  # the next request works, in step
                assert (await connection.execute(SELECT_ONE)).scalar() == 1
                first = (await connection.execute(WRITE_XID)).scalar()
                assert (await connection.execute(XID)).scalar() == first
                await connection.rollback()
        finally:
            await engine.dispose()

    _run(main)
    assert _rows(shared_server, "v = 86") == 0
