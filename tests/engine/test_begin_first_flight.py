"""BEGIN rides the first statement's flight on psycopg 3, and nothing else changes (issue 28).

Counted on the wire through a `FlightProxy` (a flight: what the client sends after the server
last spoke): on the unchanged code a single query in a Session was 3 flights (BEGIN, SELECT,
ROLLBACK) and a one-INSERT unit 3; with BEGIN in the first flight, 2 each (the first tests
failed there with 3). The rest attack what must not change, each run with the option on and
off and compared: transaction characteristics, AUTOCOMMIT, savepoints, two-phase, psycopg's
own ``transaction()`` blocks, raw cursors, server-side cursors, COPY, executemany, prepared
statements, a BEGIN the server refuses (its error raised, the statement not run), a connection
lost with BEGIN and the statement in flight (replayed once, never twice), the app's own cursor
factory, the opt-out (policy and URL).
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest
import sqlalchemy as sa
from first_flight import CHARACTERISTICS, counted, flight_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._bench._flights import FlightProxy, Strike
from dropsafe._drivers.psycopg_first_flight import cursor_classes, rides_first_flight
from dropsafe.testing import PostgresServer

pytestmark = [pytest.mark.shares_server]

SELECT_ONE = sa.text("SELECT 1")
TABLE = "first_flight_rows"
#: Bounds every wait on a fault (a link held silent is reset after Strike.hold_s).
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def table(shared_server):
    shared_server.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (v int)")
    return TABLE


def _url(server, proxy, **query):
    return flight_url(server, proxy, "psycopg", **query)


def _policy(*, first_flight=True, events=None):
    return dropsafe.Policy(
        hooks=() if events is None else (events.append,),
        pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight),
    )


def _engine(disposing, url, *, first_flight=True, events=None, **kwargs):
    return disposing(
        dropsafe.create_engine(
            url, policy=_policy(first_flight=first_flight, events=events), pool_size=1, **kwargs
        )
    )


def _rows(server, table):
    return server.execute(f"SELECT count(*) FROM {table}")[0][0]


# -- the flights ----------------------------------------------------------------------------


def test_a_single_query_in_a_session_is_two_flights(shared_server, flights, disposing) -> None:
    """BEGIN and SELECT in one flight, the checkin ROLLBACK in another: 2 (was 3)."""
    engine = _engine(disposing, _url(shared_server, flights))

    def request():
        with Session(engine) as session:
            assert session.execute(SELECT_ONE).scalar() == 1

    per_request, labels = counted(flights, engine, request)
    assert per_request == 2, labels
    assert labels[0].startswith("P BEGIN"), labels


def test_a_one_insert_unit_is_two_flights(shared_server, flights, table, disposing) -> None:
    """An unverified one-INSERT unit: BEGIN+INSERT, COMMIT (was 3); the row written once."""
    engine = _engine(disposing, _url(shared_server, flights))
    before = int(_rows(shared_server, table))
    insert = sa.text(f"INSERT INTO {table} VALUES (1)")

    def request():
        dropsafe.run_transaction(
            engine,
            lambda connection: connection.execute(insert),
            policy=dropsafe.UnitPolicy(verify_commits=False),
        )

    per_request, labels = counted(flights, engine, request)
    assert per_request == 2, labels
    assert int(_rows(shared_server, table)) == before + 4


def test_an_async_single_query_is_two_flights(shared_server, flights) -> None:
    """psycopg's AsyncConnection: the same flights."""

    async def main():
        engine = dropsafe.create_async_engine(
            _url(shared_server, flights), policy=_policy(), pool_size=1
        )
        try:
            start = None
            for n in range(4):
                if n == 1:
                    # A checkout reads the checkin ROLLBACK's reply: the proxy forwarded it.
                    async with engine.connect():
                        start = len(flights.query_flights())
                async with AsyncSession(engine) as session:
                    assert (await session.execute(SELECT_ONE)).scalar() == 1
            async with engine.connect():
                end = len(flights.query_flights())
            return [flight.label for flight in flights.query_flights()[start:end]]
        finally:
            await engine.dispose()

    labels = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert len(labels) == 6, labels


def test_the_opt_out_sends_begin_alone(shared_server, flights, disposing) -> None:
    """``begin_in_first_flight=False`` (policy, or the URL flag): BEGIN in a flight of its own."""
    for engine in (
        _engine(disposing, _url(shared_server, flights), first_flight=False),
        disposing(
            dropsafe.create_engine(
                _url(
                    shared_server,
                    flights,
                    plugin="dropsafe",
                    dropsafe_begin_in_first_flight="false",
                ),
                pool_size=1,
            )
        ),
    ):

        def request(engine=engine):
            with Session(engine) as session:
                session.execute(SELECT_ONE)

        per_request, labels = counted(flights, engine, request)
        assert per_request == 3, labels
        assert labels[0] == "Q BEGIN", labels


def test_the_flag_takes_strict_values(shared_server) -> None:
    with pytest.raises(dropsafe.ConfigurationError, match="begin_in_first_flight"):
        dropsafe.create_engine(
            shared_server.url("psycopg", plugin="dropsafe", dropsafe_begin_in_first_flight="maybe")
        )
    with pytest.raises(dropsafe.ConfigurationError, match="begin_in_first_flight"):
        dropsafe.PoolPolicy(begin_in_first_flight="yes")  # type: ignore[arg-type]


def test_the_apps_own_cursor_factory_is_kept(shared_server, flights, disposing) -> None:
    """``cursor_factory=ClientCursor`` (SQLAlchemy's advice behind a pooler): psycopg's BEGIN."""
    engine = _engine(
        disposing,
        _url(shared_server, flights),
        connect_args={"cursor_factory": psycopg.ClientCursor},
    )

    def request():
        with Session(engine) as session:
            session.execute(SELECT_ONE)

    per_request, labels = counted(flights, engine, request)
    assert per_request == 3, labels


# -- what must not change -------------------------------------------------------------------

ISOLATION = sa.text(
    "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'),"
    " current_setting('transaction_deferrable'), txid_current_if_assigned() IS NULL,"
    " now() = statement_timestamp()"
)


def _characteristics(engine, **options):
    with engine.connect() as connection:
        tuned = connection.execution_options(**options)
        with tuned.begin():
            first = tuple(tuned.execute(ISOLATION).one())
            # A second statement in the same transaction: the same transaction (now() kept).
            second = tuple(tuned.execute(ISOLATION).one())
        status = tuned.connection.dbapi_connection.info.transaction_status
    return first, second[-1], int(status)


@pytest.mark.parametrize(
    "options",
    [*CHARACTERISTICS, pytest.param({"isolation_level": "AUTOCOMMIT"}, id="autocommit")],
)
def test_transaction_characteristics_are_the_same(
    shared_server, flights, disposing, options
) -> None:
    """Isolation, read only, deferrable and AUTOCOMMIT (no BEGIN at all) as psycopg's BEGIN."""
    seen = [
        _characteristics(
            _engine(disposing, _url(shared_server, flights), first_flight=on), **options
        )
        for on in (True, False)
    ]
    assert seen[0] == seen[1]
    # The second statement is in the first one's transaction, or in AUTOCOMMIT its own.
    assert seen[0][1] is (options.get("isolation_level") == "AUTOCOMMIT")


def _shapes(table):
    """Request shapes that use psycopg beyond one execute, each returning what it saw."""
    insert = f"INSERT INTO {table} VALUES (%s)"

    def savepoints(session):
        session.execute(sa.text(f"INSERT INTO {table} VALUES (10)"))
        nested = session.begin_nested()
        session.execute(sa.text(f"INSERT INTO {table} VALUES (11)"))
        nested.rollback()
        return session.execute(sa.text(f"SELECT count(*) FROM {table} WHERE v >= 10")).scalar()

    def raw_cursor(session):
        native = session.connection().connection.dbapi_connection
        with native.cursor() as cursor:
            cursor.execute(insert, (20,))
            cursor.execute(f"SELECT count(*) FROM {table} WHERE v = 20")
            return cursor.fetchone()[0], native.info.transaction_status

    def driver_transaction_block(session):
        native = session.connection().connection.dbapi_connection
        native.rollback()  # SQLAlchemy's transaction has not sent anything yet
        with native.transaction():
            native.execute(insert, (30,))
            with native.transaction():
                native.execute(insert, (31,))
        return native.execute(f"SELECT count(*) FROM {table} WHERE v >= 30").fetchone()[0]

    def server_side_cursor(session):
        result = session.execute(
            sa.text("SELECT generate_series(1, 50)"), execution_options={"stream_results": True}
        )
        return sum(row[0] for row in result)

    def copy(session):
        native = session.connection().connection.dbapi_connection
        with native.cursor() as cursor:
            with cursor.copy(f"COPY {table} (v) FROM STDIN") as copying:
                copying.write_row((40,))
                copying.write_row((41,))
            cursor.execute(f"SELECT count(*) FROM {table} WHERE v >= 40")
            return cursor.fetchone()[0]

    def executemany(session):
        session.execute(sa.text(f"INSERT INTO {table} VALUES (:v)"), [{"v": 50}, {"v": 51}])
        return session.execute(sa.text(f"SELECT count(*) FROM {table} WHERE v >= 50")).scalar()

    def prepared(session):
        seen = []
        for n in range(7):  # psycopg prepares at the 5th execution
            session.execute(sa.text("SELECT :n"), {"n": n})
            session.commit()
            seen.append(session.execute(sa.text("SELECT :n + 1"), {"n": n}).scalar())
        return seen

    def multi_statement(session):
        native = session.connection().connection.dbapi_connection
        with native.cursor() as cursor:
            cursor.execute(f"SELECT 1; INSERT INTO {table} VALUES (60)")
            return cursor.statusmessage, native.info.transaction_status

    def driver_pipeline(session):
        native = session.connection().connection.dbapi_connection
        native.rollback()  # SQLAlchemy's transaction has not sent anything yet
        with native.pipeline():
            native.execute(insert, (90,))
            native.execute(insert, (91,))
        return native.execute(f"SELECT count(*) FROM {table} WHERE v >= 90").fetchone()[0]

    def large_statement(session):
        big = "x" * 2_000_000  # past libpq's output buffer: flushed in several writes
        return session.execute(sa.text("SELECT length(:big)"), {"big": big}).scalar()

    def notice(session):
        session.execute(
            sa.text(
                "CREATE FUNCTION pg_temp.noisy() RETURNS int LANGUAGE plpgsql"
                " AS $$BEGIN RAISE NOTICE 'hello'; RETURN 1; END$$"
            )
        )
        session.commit()
        return session.execute(sa.text("SELECT pg_temp.noisy()")).scalar()

    return {
        name: shape
        for name, shape in locals().items()
        if callable(shape) and not name.startswith("_")
    }


SHAPES = tuple(_shapes("t"))


@pytest.mark.parametrize("shape", SHAPES)
def test_request_shapes_are_the_same(shared_server, flights, disposing, shape) -> None:
    """Each shape, with BEGIN in the first flight and without: the same results, the same rows."""
    outcomes = []
    for on in (True, False):
        table = f"ff_{shape}_{int(on)}"
        shared_server.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
        engine = _engine(disposing, _url(shared_server, flights), first_flight=on)
        with Session(engine) as session:
            seen = _shapes(table)[shape](session)
            session.commit()
        outcomes.append((seen, sorted(shared_server.execute(f"SELECT v FROM {table}"))))
        shared_server.execute(f"DROP TABLE {table}")
    assert outcomes[0] == outcomes[1]


@pytest.mark.slow
def test_two_phase_is_the_same(disposing) -> None:
    """A two-phase Session: psycopg's tpc_begin sends its own BEGIN; committed once."""
    with (
        PostgresServer(tls=False, settings={"max_prepared_transactions": "2"}) as server,
        FlightProxy(server.port) as proxy,
    ):
        server.execute(f"CREATE TABLE {TABLE} (v int)")
        engine = _engine(disposing, _url(server, proxy))
        with Session(engine, twophase=True) as session:
            session.execute(sa.text(f"INSERT INTO {TABLE} VALUES (70)"))
            session.commit()
        engine.dispose()
        assert server.execute(f"SELECT v FROM {TABLE}") == [("70",)]


# -- a BEGIN that fails, a connection lost in the flight --------------------------------------


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_refused_begin_is_the_error_and_the_statement_does_not_run(shared_server, face) -> None:
    """The server refuses BEGIN (as a standby refuses READ WRITE): its error, no statement.

    ``_begin_statement`` is where psycopg keeps the BEGIN it builds from the connection's
    characteristics; a bogus one is one the server refuses.
    """
    classes = cursor_classes()
    assert classes is not None
    url = sa.make_url(shared_server.url("psycopg")).set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    mark = "SELECT set_config('application_name', 'the statement ran', false)"

    def check(error, status, name):
        assert isinstance(error, psycopg.errors.SyntaxError), error
        assert "BOGUS" in str(error)
        assert status == psycopg.pq.TransactionStatus.IDLE
        assert name != "the statement ran"

    if face == "sync":
        with psycopg.connect(conninfo, cursor_factory=classes[0]) as native:
            native._begin_statement = b"BEGIN ISOLATION LEVEL BOGUS"
            with pytest.raises(psycopg.Error) as raised:
                native.execute(mark)
            status = native.info.transaction_status
            native._begin_statement = b""
            native.autocommit = True
            check(raised.value, status, native.execute("SHOW application_name").fetchone()[0])
        return

    async def main():
        native = await psycopg.AsyncConnection.connect(conninfo, cursor_factory=classes[1])
        async with native:
            native._begin_statement = b"BEGIN ISOLATION LEVEL BOGUS"
            with pytest.raises(psycopg.Error) as raised:
                await native.execute(mark)
            status = native.info.transaction_status
            native._begin_statement = b""
            await native.set_autocommit(True)
            name = (await (await native.execute("SHOW application_name")).fetchone())[0]
            check(raised.value, status, name)

    asyncio.run(asyncio.wait_for(main(), DEADLINE_S))


@pytest.mark.fault
@pytest.mark.parametrize(
    ("phase", "then"),
    [("before", "rst"), ("after", "rst"), ("after", "fin")],
    ids=["request-lost", "reply-lost-rst", "reply-lost-fin"],
)
def test_a_connection_lost_with_begin_and_insert_in_flight_is_replayed_once(  # noqa: PLR0917
    shared_server, flights, disposing, table, phase, then
) -> None:
    """The flight with BEGIN and the INSERT lost (before the server, or its reply): one row."""
    events: list[object] = []
    engine = _engine(disposing, _url(shared_server, flights), events=events)
    with engine.connect() as connection:  # connected and warm: the next flight is the request's
        connection.execute(SELECT_ONE)
    before = int(_rows(shared_server, table))
    flights.reset(Strike(step=1, phase=phase, then=then))
    try:
        with Session(engine) as session:
            session.execute(sa.text(f"INSERT INTO {table} VALUES (80)"))
            session.commit()
        assert flights.strike is not None
        assert flights.strike.done.wait(DEADLINE_S)
        assert flights.strike.fired
    finally:
        flights.reset(None)
    assert int(_rows(shared_server, table)) == before + 1
    assert any(type(event).__name__ == "FirstStatementReplayed" for event in events), events


def test_which_statements_ride() -> None:
    assert rides_first_flight("SELECT 1")
    assert rides_first_flight("  insert into t values (%(v)s)")
    assert rides_first_flight("WITH x AS (SELECT 1) SELECT * FROM x")
    assert not rides_first_flight("SELECT 1; SELECT 2")
    assert not rides_first_flight("COPY t TO STDOUT")
    assert not rides_first_flight("SET LOCAL x = 1")
    assert not rides_first_flight(b"SELECT 1")
    assert not rides_first_flight("selecting")


@pytest.mark.slow
@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_standby_refusing_read_write_is_the_error_on_both_paths(face) -> None:
    """``postgresql_readonly=False`` on a hot standby: BEGIN READ WRITE refused, as before.

    The statement would have run alone (a session setting): it did not, and the error raised,
    with the option on, is the one psycopg's own BEGIN gets with it off.
    """
    mark = sa.text("SELECT set_config('application_name', 'the statement ran', false)")
    with PostgresServer(tls=False) as primary, primary.make_standby() as standby:
        url = sa.make_url(standby.url("psycopg", sslmode="disable"))
        if face == "async":
            url = url.set(drivername="postgresql+psycopg_async")
        seen = []
        for on in (True, False):
            if face == "sync":
                engine = dropsafe.create_engine(url, policy=_policy(first_flight=on))
                try:
                    seen.append(_refused_sync(engine, mark))
                finally:
                    engine.dispose()
            else:
                seen.append(asyncio.run(asyncio.wait_for(_refused_async(url, on, mark), 30)))
    assert seen[0] == seen[1]
    _kind, _sqlstate, message, name = seen[0]
    assert "read-write" in message, seen
    assert name != "the statement ran"


def _refused_sync(engine, mark):
    with engine.connect() as connection:
        tuned = connection.execution_options(postgresql_readonly=False)
        with pytest.raises(sa.exc.DBAPIError) as raised:
            tuned.execute(mark)
        tuned.rollback()
        native = connection.connection.dbapi_connection
        native.autocommit = True  # no BEGIN: the standby refuses READ WRITE ones
        name = native.execute("SHOW application_name").fetchone()[0]
        native.autocommit = False
    error = raised.value.orig
    return type(error).__name__, error.sqlstate, str(error).splitlines()[0], name


async def _refused_async(url, on, mark):
    engine = dropsafe.create_async_engine(url, policy=_policy(first_flight=on), pool_size=1)
    try:
        async with engine.connect() as connection:
            tuned = await connection.execution_options(postgresql_readonly=False)
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await tuned.execute(mark)
            await tuned.rollback()
            native = (await connection.get_raw_connection()).driver_connection
            await native.set_autocommit(True)  # no BEGIN: the standby refuses READ WRITE ones
            name = (await (await native.execute("SHOW application_name")).fetchone())[0]
            await native.set_autocommit(False)
    finally:
        await engine.dispose()
    error = raised.value.orig
    return type(error).__name__, error.sqlstate, str(error).splitlines()[0], name


@pytest.mark.parametrize("first_flight", [True, False], ids=["first-flight", "begin-alone"])
def test_a_cancelled_first_flight_leaves_the_connection_as_psycopg_does(
    shared_server, first_flight
) -> None:
    """asyncio cancels a first statement in flight: psycopg cancels it on the server, reads
    the rest, and the connection goes on (failed transaction, then a new one), either way."""
    classes = cursor_classes()
    assert classes is not None
    url = sa.make_url(shared_server.url("psycopg")).set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    factory = classes[1] if first_flight else psycopg.AsyncCursor

    async def main():
        native = await psycopg.AsyncConnection.connect(conninfo, cursor_factory=factory)
        async with native:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(native.execute("SELECT pg_sleep(20)"), 0.3)
            failed = native.info.transaction_status
            await native.rollback()
            answer = (await (await native.execute("SELECT 42")).fetchone())[0]
            return int(failed), answer, int(native.pgconn.pipeline_status)

    failed, answer, pipeline = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert (failed, answer, pipeline) == (int(psycopg.pq.TransactionStatus.INERROR), 42, 0)


def test_a_flight_abandoned_midway_closes_its_connection(shared_server) -> None:
    """Its wait given up with replies unread: nothing more is sent on it (closed, not reused)."""
    classes = cursor_classes()
    assert classes is not None
    url = sa.make_url(shared_server.url("psycopg")).set(drivername="postgresql")
    with psycopg.connect(
        url.render_as_string(hide_password=False), cursor_factory=classes[0]
    ) as native:
        cursor = native.cursor()
        flight = cursor._execute_gen("SELECT pg_sleep(2)")
        next(flight)  # sent; waiting for the replies
        flight.close()
        assert native.broken or native.closed
        with pytest.raises(psycopg.OperationalError):
            native.execute("SELECT 1")
