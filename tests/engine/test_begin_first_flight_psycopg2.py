"""BEGIN rides the first statement's query string on psycopg2, and nothing else changes (issue 28).

Counted on the wire through a `FlightProxy`: on the code before, psycopg2 sent BEGIN in a flight
of its own (``pq_begin_locked``): a single query in a Session was 3 flights (BEGIN, SELECT,
ROLLBACK), a verified one-INSERT unit 3 (BEGIN, the DO block's xid read with the INSERT,
COMMIT); the first tests failed there. The rest attack what must not change, each request shape
run with the option on and off and compared: transaction characteristics, AUTOCOMMIT,
savepoints, raw cursors of every psycopg2 class, server-side cursors (psycopg2's own BEGIN),
COPY, executemany pages, an app's commit() on the driver's connection, ``with connection``, two
phase, a connection lost with BEGIN and the INSERT in flight (replayed once, never twice), the
app's own ``connection_factory``, the opt-out.
"""

from __future__ import annotations

import io

import psycopg2
import psycopg2.extras
import pytest
import sqlalchemy as sa
from first_flight import CHARACTERISTICS, counted, flight_url
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._bench._flights import FlightProxy, Strike
from dropsafe._drivers.psycopg2_first_flight import connection_class
from dropsafe.testing import PostgresServer

pytestmark = [pytest.mark.shares_server]

SELECT_ONE = sa.text("SELECT 1")
TABLE = "first_flight_rows_pg2"
#: Bounds every wait on a fault (a link held silent is reset after Strike.hold_s).
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def table(shared_server):
    shared_server.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (v int)")
    return TABLE


def _url(server, proxy, **query):
    return flight_url(server, proxy, "psycopg2", **query)


def _engine(disposing, url, *, first_flight=True, events=None, **kwargs):
    policy = dropsafe.Policy(
        hooks=() if events is None else (events.append,),
        pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight),
    )
    return disposing(dropsafe.create_engine(url, policy=policy, pool_size=1, **kwargs))


def _rows(server, table):
    return int(server.execute(f"SELECT count(*) FROM {table}")[0][0])


# -- the flights ----------------------------------------------------------------------------


def test_a_single_query_in_a_session_is_two_flights(shared_server, flights, disposing) -> None:
    """BEGIN and SELECT in one query string, the checkin ROLLBACK in another: 2 (was 3)."""
    engine = _engine(disposing, _url(shared_server, flights))

    def request():
        with Session(engine) as session:
            assert session.execute(SELECT_ONE).scalar() == 1

    per_request, labels = counted(flights, engine, request)
    assert per_request == 2, labels
    assert labels[0] == "Q BEGIN; SELECT 1", labels


@pytest.mark.parametrize("verified", [False, True], ids=["unverified", "verified"])
def test_a_one_insert_unit_is_two_flights(
    shared_server, flights, table, disposing, verified
) -> None:
    """A one-INSERT unit: BEGIN+INSERT (verified: with the DO block's xid read), COMMIT."""
    engine = _engine(disposing, _url(shared_server, flights))
    before = _rows(shared_server, table)
    insert = sa.text(f"INSERT INTO {TABLE} VALUES (1)")

    def request():
        dropsafe.run_transaction(
            engine,
            lambda connection: connection.execute(insert),
            policy=dropsafe.UnitPolicy(verify_commits=verified),
        )

    per_request, labels = counted(flights, engine, request)
    assert per_request == 2, labels
    assert labels[0].startswith("Q BEGIN; DO" if verified else "Q BEGIN; INSERT"), labels
    assert _rows(shared_server, table) == before + 4


def test_the_opt_out_sends_begin_alone(shared_server, flights, disposing) -> None:
    """``begin_in_first_flight=False`` (policy, or the URL flag): psycopg2's own BEGIN."""
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
        with engine.connect() as connection:
            assert type(connection.connection.dbapi_connection) is psycopg2.extensions.connection


class AppConnection(psycopg2.extensions.connection):
    """A connection class of the app's own."""


def test_the_apps_own_connection_factory_is_kept(shared_server, flights, disposing) -> None:
    """A ``connection_factory`` of the app's: its class, psycopg2's own BEGIN."""
    engine = _engine(
        disposing,
        _url(shared_server, flights),
        connect_args={"connection_factory": AppConnection},
    )
    with engine.connect() as connection:
        assert type(connection.connection.dbapi_connection) is AppConnection

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
        native = tuned.connection.dbapi_connection
        seen_flags = (native.autocommit, native.isolation_level, native.readonly)
        with tuned.begin():
            first = tuple(tuned.execute(ISOLATION).one())
            second = tuple(tuned.execute(ISOLATION).one())
            status = native.status
        after = (native.autocommit, native.isolation_level, native.readonly, native.deferrable)
    with engine.connect() as connection:  # the pool's reset of the characteristics
        native = connection.connection.dbapi_connection
        reset = (native.autocommit, native.isolation_level, native.readonly, native.deferrable)
        plain = tuple(connection.execute(ISOLATION).one())
    # The first statement's now() is its own statement_timestamp() (the transaction starts
    # with the query string that carries BEGIN): compared apart, below.
    return first[:-1], second[-1], status, seen_flags, after, reset, plain[:-1]


@pytest.mark.parametrize(
    "options",
    [*CHARACTERISTICS, pytest.param({"isolation_level": "AUTOCOMMIT"}, id="autocommit")],
)
def test_transaction_characteristics_are_the_same(
    shared_server, flights, disposing, options
) -> None:
    """Isolation, read only, deferrable and AUTOCOMMIT as psycopg2's BEGIN; its flags read alike."""
    seen = [
        _characteristics(
            _engine(disposing, _url(shared_server, flights), first_flight=on), **options
        )
        for on in (True, False)
    ]
    assert seen[0] == seen[1]
    assert seen[0][1] is (options.get("isolation_level") == "AUTOCOMMIT")


def _shapes(table):  # noqa: PLR0915 - one function per shape, named by the test ids
    """Request shapes that use psycopg2 beyond one execute, each returning what it saw."""
    insert = f"INSERT INTO {table} VALUES (%s)"

    def native_of(session):
        return session.connection().connection.dbapi_connection

    def savepoints(session):
        session.execute(sa.text(f"INSERT INTO {table} VALUES (10)"))
        nested = session.begin_nested()
        session.execute(sa.text(f"INSERT INTO {table} VALUES (11)"))
        nested.rollback()
        return session.execute(sa.text(f"SELECT count(*) FROM {table} WHERE v >= 10")).scalar()

    def raw_cursors(session):
        native = native_of(session)
        seen = []
        for factory in (
            None,
            psycopg2.extras.DictCursor,
            psycopg2.extras.RealDictCursor,
            psycopg2.extras.NamedTupleCursor,
        ):
            with native.cursor(cursor_factory=factory) as cursor:
                cursor.execute(insert, (20,))
                cursor.execute(f"SELECT count(*) AS n FROM {table} WHERE v = 20")
                row = cursor.fetchone()
                seen.append(list(row.values()) if isinstance(row, dict) else list(row))
        return seen, native.get_transaction_status(), native.status

    def server_side_cursor(session):
        session.execute(sa.text(f"INSERT INTO {table} VALUES (25)"))
        result = session.execute(
            sa.text("SELECT generate_series(1, 50)"), execution_options={"stream_results": True}
        )
        return sum(row[0] for row in result)

    def server_side_cursor_first(session):
        result = session.execute(
            sa.text("SELECT generate_series(1, 50)"), execution_options={"stream_results": True}
        )
        total = sum(row[0] for row in result)
        session.execute(sa.text(f"INSERT INTO {table} VALUES (26)"))
        return total

    def copy(session):
        native = native_of(session)
        with native.cursor() as cursor:
            cursor.copy_expert(f"COPY {table} (v) FROM STDIN", io.StringIO("40\n41\n"))
            cursor.copy_from(io.StringIO("42\n"), table, columns=("v",))
            cursor.execute(f"SELECT count(*) FROM {table} WHERE v >= 40")
            return cursor.fetchone()[0], native.get_transaction_status()

    def executemany(session):
        session.execute(sa.text(f"INSERT INTO {table} VALUES (:v)"), [{"v": 50}, {"v": 51}])
        return session.execute(sa.text(f"SELECT count(*) FROM {table} WHERE v >= 50")).scalar()

    def raw_executemany(session):
        native = native_of(session)
        with native.cursor() as cursor:
            cursor.executemany(insert, [])
            idle = native.get_transaction_status()
            cursor.executemany(insert, iter([(52,), (53,)]))
            return idle, cursor.rowcount, native.get_transaction_status()

    def multi_statement(session):
        native = native_of(session)
        with native.cursor() as cursor:
            cursor.execute(f"SELECT 1; INSERT INTO {table} VALUES (60)")
            return cursor.statusmessage, cursor.rowcount, native.get_transaction_status()

    def app_commits_the_driver(session):
        native = native_of(session)
        with native.cursor() as cursor:
            cursor.execute(insert, (70,))
        native.commit()  # the app's own, around SQLAlchemy: committed
        with native.cursor() as cursor:
            cursor.execute(insert, (71,))
        native.rollback()  # and this one rolled back
        return native.get_transaction_status(), native.status

    def with_connection_block(session):
        native = native_of(session)
        native.rollback()
        with native, native.cursor() as cursor:
            cursor.execute(insert, (80,))
        try:
            with native, native.cursor() as cursor:
                cursor.execute(insert, (81,))
                raise ZeroDivisionError
        except ZeroDivisionError:
            pass
        return native.get_transaction_status()

    def failed_statement(session):
        native = native_of(session)
        native.rollback()
        with native.cursor() as cursor:
            try:
                cursor.execute("SELECT no_such_column")
            except psycopg2.Error as error:
                seen = (type(error).__name__, error.pgcode, native.get_transaction_status())
        native.rollback()
        with native.cursor() as cursor:
            cursor.execute(insert, (85,))
        return seen

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
        native = native_of(session)
        del native.notices[:]
        value = session.execute(sa.text("SELECT pg_temp.noisy()")).scalar()
        return value, [text.strip() for text in native.notices]

    def session_settings_inside(session):
        native = native_of(session)
        session.execute(sa.text(f"INSERT INTO {table} VALUES (90)"))
        refused = []
        for name, value in (("autocommit", True), ("readonly", True), ("deferrable", True)):
            try:
                setattr(native, name, value)
            except psycopg2.ProgrammingError as error:
                refused.append(str(error))
        native.set_isolation_level(2)  # rolls the INSERT back, as psycopg2's does
        level = native.isolation_level
        native.set_isolation_level(None)
        return refused, level, native.get_transaction_status()

    def large_object(session):
        native = native_of(session)
        session.execute(sa.text(f"INSERT INTO {table} VALUES (95)"))
        lob = native.lobject(0, "wb")
        lob.write(b"hello")
        oid = lob.oid
        lob.close()
        return bool(oid), native.get_transaction_status()

    return {
        name: shape
        for name, shape in locals().items()
        if callable(shape) and not name.startswith("_") and name != "native_of"
    }


SHAPES = tuple(_shapes("t"))


@pytest.mark.parametrize("shape", SHAPES)
def test_request_shapes_are_the_same(shared_server, flights, disposing, shape) -> None:
    """Each shape, with BEGIN in the first flight and without: the same results, the same rows."""
    outcomes = []
    for on in (True, False):
        table = f"ff2_{shape}_{int(on)}"
        shared_server.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
        engine = _engine(disposing, _url(shared_server, flights), first_flight=on)
        with engine.connect() as connection:
            assert (type(connection.connection.dbapi_connection) is connection_class()) is on
        with Session(engine) as session:
            seen = _shapes(table)[shape](session)
            session.commit()
        outcomes.append((seen, sorted(shared_server.execute(f"SELECT v FROM {table}"))))
        shared_server.execute(f"DROP TABLE {table}")
    assert outcomes[0] == outcomes[1]


@pytest.mark.slow
def test_two_phase_is_the_same(disposing) -> None:
    """A two-phase Session: psycopg2's tpc_begin sends its own BEGIN; committed once."""
    with (
        PostgresServer(tls=False, settings={"max_prepared_transactions": "2"}) as server,
        FlightProxy(server.port) as proxy,
    ):
        server.execute(f"CREATE TABLE {TABLE} (v int)")
        engine = _engine(disposing, _url(server, proxy))
        for value in (70, 71):
            with Session(engine, twophase=True) as session:
                session.execute(sa.text(f"INSERT INTO {TABLE} VALUES ({value})"))
                session.commit()
        with Session(engine) as session:  # after two phase: BEGIN in the flight again
            session.execute(sa.text(f"INSERT INTO {TABLE} VALUES (72)"))
            session.commit()
        engine.dispose()
        assert sorted(server.execute(f"SELECT v FROM {TABLE}")) == [("70",), ("71",), ("72",)]
        assert [f.label for f in proxy.query_flights()][-3:] == [
            "Q BEGIN; INSERT INTO first_flight_rows_pg2 VALUES (72)",
            "Q COMMIT",
            "terminate",
        ]


# -- a connection lost in the flight ----------------------------------------------------------


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
        connection.rollback()
    before = _rows(shared_server, table)
    flights.reset(Strike(step=1, phase=phase, then=then))
    try:
        with Session(engine) as session:
            session.execute(sa.text(f"INSERT INTO {TABLE} VALUES (80)"))
            session.commit()
        assert flights.strike is not None
        assert flights.strike.done.wait(DEADLINE_S)
        assert flights.strike.fired
    finally:
        flights.reset(None)
    assert _rows(shared_server, table) == before + 1
    assert any(type(event).__name__ == "FirstStatementReplayed" for event in events), events
