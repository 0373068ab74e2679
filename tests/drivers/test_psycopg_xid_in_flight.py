"""psycopg 3 reads a transaction's xid in a statement's own flight, and nothing else changes.

`Psycopg.send_reading_xid` sends the app's statement and ``SELECT <question.after>`` in one
libpq pipeline with one Sync (issue 27 item 3, issue 28). Each test runs the same statements
through the driver as the engine will (``dialect.do_execute`` on a DBAPI cursor) with the read
and without it, sync and async, and compares what the app sees and what crosses the wire
(flights counted by a `FlightProxy`): rows, rowcount, description, statusmessage, a failing
statement's error and its failed transaction, a connection cut with the flight unanswered, a
cancelled task; the cases that do not ride read nothing and run psycopg's own execute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import pq

import dropsafe
from dropsafe._bench._flights import FlightProxy, Strike
from dropsafe._commit_truth.server_sql import SERVER_LIFE_SQL, xid_question
from dropsafe._drivers import driver_named
from dropsafe._drivers.base import Capabilities, XidQuestion, driver_connection
from dropsafe.events import CommitResolved

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.shares_server]

TABLE = "xid_in_flight_rows"
DRIVER = driver_named("psycopg")
#: Bounds every run (a cut link is reset at once; a cancelled sleep ends on the cancel).
DEADLINE_S = 30.0
FACES = ("sync", "async")
#: A column that reads a view (its lock taken when the read is parsed, after the statement).
LOCKED_VIEW = ", (SELECT count(*) FROM pg_catalog.pg_stat_bgwriter)"


class Face:
    """One engine of one face (sync, or async on a loop of its own) running sync functions."""

    def __init__(self, url: sa.URL, face: str, **kwargs: Any) -> None:
        self.is_async = face == "async"
        self.flights: FlightProxy | None = None
        if self.is_async:
            self._runner = asyncio.Runner()
            self.engine: Any = dropsafe.create_async_engine(url, **kwargs)
        else:
            self.engine = dropsafe.create_engine(url, **kwargs)

    def run(self, fn: Callable[[sa.Connection], Any]) -> Any:
        """Run ``fn`` with a checked-out connection (on the async face: in ``run_sync``)."""
        if not self.is_async:
            with self.engine.connect() as connection:
                return fn(connection)

        async def main() -> Any:
            async with self.engine.connect() as connection:
                return await connection.run_sync(fn)

        return self._runner.run(asyncio.wait_for(main(), DEADLINE_S))

    def close(self) -> None:
        if self.is_async:
            self._runner.run(self.engine.dispose())
            self._runner.close()
        else:
            self.engine.dispose()


@pytest.fixture(scope="module")
def flights(shared_server):
    """A flight-counting proxy in front of the module's server (plaintext: it reads messages)."""
    shared_server.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (n int PRIMARY KEY, v int)")
    with FlightProxy(shared_server.port) as proxy:
        yield proxy


def _fill(server) -> None:
    server.execute(f"DELETE FROM {TABLE}")
    server.execute(f"INSERT INTO {TABLE} VALUES (1, 10), (2, 20)")


@pytest.fixture(autouse=True)
def _empty(shared_server, flights):
    del flights
    _fill(shared_server)


@pytest.fixture(params=FACES)
def face(request, shared_server, flights):
    url = sa.make_url(shared_server.url("psycopg", sslmode="disable"))
    made = Face(url.set(host="127.0.0.1", port=flights.port), request.param, pool_size=1)
    made.flights = flights
    yield made
    made.close()


def _send(
    connection: sa.Connection,
    statement: str,
    params: dict[str, object] | None = None,
    *,
    read: bool,
    more: str = "",
) -> tuple[Any, Any]:
    """Send ``statement`` as the engine will: through the driver, with the read or without."""
    dbapi_connection = connection.connection.dbapi_connection
    cursor = connection.connection.cursor()

    def send(text: str) -> None:
        connection.dialect.do_execute(cursor, text, params or {}, None)  # type: ignore[arg-type]

    if not read:
        send(statement)
        return cursor, None
    question = xid_question(connection.dialect)
    if more:  # columns the engine does not ask for: the driver reads any question
        question = XidQuestion(question.before + more, question.after + more)
    return cursor, DRIVER.send_reading_xid(send, dbapi_connection, statement, question)


def _seen(cursor: Any) -> tuple[object, ...]:
    """What the app sees of a statement: rows, rowcount, columns, the command tag."""
    native = getattr(cursor, "_cursor", cursor)  # SQLAlchemy's async adapter holds psycopg's
    columns = [column[0] for column in cursor.description or ()]
    rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else None
    return rows, cursor.rowcount, columns, native.statusmessage


def _status(connection: sa.Connection) -> pq.TransactionStatus:
    native = driver_connection(connection.connection.dbapi_connection)
    return pq.TransactionStatus(native.pgconn.transaction_status)


def _end(connection: sa.Connection, *, commit: bool = False) -> None:
    dbapi_connection = connection.connection.dbapi_connection
    (dbapi_connection.commit if commit else dbapi_connection.rollback)()


# -- no flight more -------------------------------------------------------------------------

TRANSACTION = (
    (f"INSERT INTO {TABLE} VALUES (%(n)s, 30)", {"n": 3}),
    (f"UPDATE {TABLE} SET v = v + 1 WHERE n = %(n)s", {"n": 1}),
    (f"DELETE FROM {TABLE} WHERE n = 2 RETURNING v", None),
)


def test_the_read_makes_no_flight_more(face, flights, shared_server) -> None:
    """BEGIN+INSERT, UPDATE, DELETE, COMMIT: 4 flights with the read at each statement, and
    4 without; the xid read is the transaction's, the same at each, committed at the end."""

    def transaction(read: bool):
        def run(connection: sa.Connection):
            start = len(flights.query_flights())
            readings = [
                _send(connection, text, params, read=read)[1] for text, params in TRANSACTION
            ]
            dbapi_connection = connection.connection.dbapi_connection
            native = driver_connection(dbapi_connection)
            _end(connection, commit=True)
            labels = [flight.label for flight in flights.query_flights()[start:]]
            pids = (DRIVER.backend_pid(dbapi_connection), native.pgconn.backend_pid)
            return labels, readings, pids

        return face.run(run)

    plain, nothing, _ = transaction(read=False)
    _fill(shared_server)
    marked, readings, (pid, native_pid) = transaction(read=True)
    assert nothing == [None, None, None]
    assert len(marked) == len(plain) == 4, (plain, marked)
    assert marked[0].startswith("P BEGIN"), marked
    xids = {reading.values[0] for reading in readings}
    assert len(xids) == 1, readings
    assert all(not reading.assigned and reading.values[1] == "on" for reading in readings)
    (xid,) = xids
    assert shared_server.execute(f"SELECT pg_xact_status('{xid}'::xid8)")[0][0] == "committed"
    assert pid == native_pid > 0
    assert DRIVER.capabilities.reads_xid_in_flight


def test_a_read_only_statement_reads_no_xid_and_more_columns_when_asked(face) -> None:
    """A SELECT takes no xid: NULL; a question of more columns (the server's life): all read."""

    def run(connection: sa.Connection):
        _, first = _send(connection, f"SELECT v FROM {TABLE} WHERE n = 1", read=True)
        _, second = _send(
            connection,
            f"UPDATE {TABLE} SET v = 11 WHERE n = 1",
            read=True,
            more=f", {SERVER_LIFE_SQL}",
        )
        server_xid = connection.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar()
        server_pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        _end(connection)
        return first, second, server_xid, server_pid

    first, second, server_xid, server_pid = face.run(run)
    assert first.values[0] is None, first
    # xid, synchronous_commit, the backend's pid (the server's), the server's life (two)
    assert len(second.values) == 5, second
    assert second.values[0] == server_xid
    assert second.values[2] == str(server_pid)
    assert all(value is not None for value in second.values[2:]), second


# -- the app sees the same ------------------------------------------------------------------

STATEMENTS = (
    (f"SELECT n, v FROM {TABLE} ORDER BY n", None),
    (f"INSERT INTO {TABLE} VALUES (%(n)s, %(v)s) RETURNING n, v * 2 AS twice", {"n": 5, "v": 7}),
    (f"UPDATE {TABLE} SET v = v + 1", None),
    (f"WITH gone AS (DELETE FROM {TABLE} WHERE n = 1 RETURNING v) SELECT * FROM gone", None),
    (f"UPDATE {TABLE} SET v = 0 WHERE n = 99", None),
)


@pytest.mark.parametrize("position", ["first", "later"])
def test_the_app_sees_the_same_results(face, shared_server, position) -> None:
    """Rows, rowcount, description and statusmessage, the mark's row never among them."""

    def outcomes(read: bool):
        seen = []
        for text, params in STATEMENTS:
            _fill(shared_server)

            def run(connection: sa.Connection, text=text, params=params):
                if position == "later":
                    _send(connection, "SELECT 1", read=False)
                cursor, reading = _send(connection, text, params, read=read)
                outcome = (*_seen(cursor), _status(connection))
                _end(connection)
                return outcome, reading

            seen.append(face.run(run))
        return seen

    plain = outcomes(read=False)
    marked = outcomes(read=True)
    assert [outcome for outcome, _ in marked] == [outcome for outcome, _ in plain]
    assert all(reading is not None for _, reading in marked)


# -- a failing statement ------------------------------------------------------------------

FAILING = (
    (f"INSERT INTO {TABLE} VALUES (1, 0)", "23505"),  # unique violation
    (f"UPDATE {TABLE} SET v = 1 WHER n = 1", "42601"),  # syntax error
    (f"UPDATE {TABLE} SET v = 1 / (v - 10)", "22012"),  # division by zero at the first row
)


@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize(("statement", "sqlstate"), FAILING)
def test_a_failing_statement_raises_its_own_error(face, position, statement, sqlstate) -> None:
    """The same class, SQLSTATE and message; the transaction left failed; nothing read."""

    def outcome(read: bool):
        def run(connection: sa.Connection):
            if position == "later":
                _send(connection, "SELECT 1", read=False)
            with pytest.raises(psycopg.Error) as raised:
                _send(connection, statement, read=read)
            status = _status(connection)
            _end(connection)
            error = raised.value
            return type(error), error.sqlstate, str(error), status

        return face.run(run)

    plain = outcome(read=False)
    assert plain[1] == sqlstate
    assert outcome(read=True) == plain
    expected = pq.TransactionStatus.INERROR
    assert plain[3] == expected


# -- what does not ride -------------------------------------------------------------------


def test_what_does_not_ride_is_sent_as_psycopg_sends_it(face, shared_server) -> None:
    """Two statements in one text, a failed transaction, AUTOCOMMIT, the app's cursor factory,
    a server-side cursor (sync), the app's own pipeline (sync): nothing read, the same results."""
    select = f"SELECT v FROM {TABLE} WHERE n = 1"

    def two_statements(connection, read):
        cursor, reading = _send(connection, f"{select}; SELECT 2", read=read)
        return _seen(cursor), reading

    def failed_transaction(connection, read):
        with contextlib.suppress(psycopg.Error):
            _send(connection, "SELECT 1/0", read=False)
        with pytest.raises(psycopg.Error) as raised:
            _send(connection, select, read=read)
        return (type(raised.value), str(raised.value)), None

    def autocommit(connection, read):
        connection.connection.dbapi_connection.autocommit = True
        try:
            cursor, reading = _send(connection, f"UPDATE {TABLE} SET v = 3 WHERE n = 2", read=read)
            return _seen(cursor), reading
        finally:
            connection.connection.dbapi_connection.autocommit = False

    def cursor_factory(connection, read):
        native = driver_connection(connection.connection.dbapi_connection)
        kept = native.cursor_factory
        native.cursor_factory = psycopg.AsyncClientCursor if face.is_async else psycopg.ClientCursor
        try:
            cursor, reading = _send(connection, select, read=read)
            return _seen(cursor), reading
        finally:
            native.cursor_factory = kept

    cases = [two_statements, failed_transaction, autocommit, cursor_factory]
    if not face.is_async:

        def server_side(connection, read):
            native = driver_connection(connection.connection.dbapi_connection)
            with native.cursor(name="rows") as cursor:

                def send(text):
                    cursor.execute(text)

                question = xid_question(connection.dialect)
                reading = DRIVER.send_reading_xid(send, native, select, question) if read else None
                if not read:
                    send(select)
                return _seen(cursor), reading

        def own_pipeline(connection, read):
            native = driver_connection(connection.connection.dbapi_connection)
            with native.pipeline():
                cursor, reading = _send(connection, select, read=read)
            return _seen(cursor), reading

        cases += [server_side, own_pipeline]
    for case in cases:

        def run(connection, case=case, read=False):
            try:
                return case(connection, read)
            finally:
                _end(connection)

        plain = face.run(run)
        marked = face.run(lambda connection, run=run: run(connection, read=True))
        assert marked == plain, case.__name__
        assert marked[1] is None, case.__name__


def test_executemany_reads_nothing(face) -> None:
    """executemany (psycopg's own pipeline of its own): nothing read, the same rowcount."""
    update = f"UPDATE {TABLE} SET v = v + %(d)s WHERE n = 1"

    def outcome(read: bool):
        def run(connection: sa.Connection):
            dbapi_connection = connection.connection.dbapi_connection
            cursor = connection.connection.cursor()

            def send(text: str) -> None:
                connection.dialect.do_executemany(cursor, text, [{"d": 1}, {"d": 2}], None)  # type: ignore[arg-type]

            question = xid_question(connection.dialect)
            reading = None
            if read:
                reading = DRIVER.send_reading_xid(send, dbapi_connection, update, question)
            else:
                send(update)
            seen = (cursor.rowcount, _status(connection))
            _end(connection)
            return seen, reading

        return face.run(run)

    plain = outcome(read=False)
    assert outcome(read=True) == plain
    assert plain[1] is None


def test_without_the_first_flight_cursors_nothing_is_read(shared_server) -> None:
    """``begin_in_first_flight=False``: psycopg's own cursors; the statement alone, None."""
    engine = dropsafe.create_engine(
        shared_server.url("psycopg"),
        policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(begin_in_first_flight=False)),
    )
    try:
        with engine.connect() as connection:
            cursor, reading = _send(connection, f"UPDATE {TABLE} SET v = 5", read=True)
            assert reading is None
            assert cursor.rowcount == 2
            _end(connection)
    finally:
        engine.dispose()


# -- a flight cut, a task cancelled -------------------------------------------------------


@pytest.mark.parametrize("cut", ["the server ends", "reply withheld, reset", "sent, reset"])
@pytest.mark.parametrize("position", ["first", "later"])
def test_a_statement_cut_mid_flight_raises_as_before(face, flights, cut, position) -> None:
    """The backend ending itself in the statement, or the link reset before the flight goes
    or after the server answered it: the same error class and the same message."""
    statement = (
        "SELECT pg_terminate_backend(pg_backend_pid())"
        if cut == "the server ends"
        else f"UPDATE {TABLE} SET v = v + 1 WHERE n = 1"
    )

    def outcome(read: bool):
        def run(connection: sa.Connection):
            if position == "later":
                _send(connection, "SELECT 1", read=False)
            if cut != "the server ends":
                flights.strike = Strike(
                    step=len(flights.query_flights()) + 1,
                    phase="after" if cut.startswith("reply") else "before",
                    then="rst",
                )
            try:
                with pytest.raises(psycopg.Error) as raised:
                    _send(connection, statement, read=read)
            finally:
                flights.strike = None
            native = driver_connection(connection.connection.dbapi_connection)
            connection.invalidate()
            return type(raised.value), str(raised.value).split("\n")[0], native.closed

        return face.run(run)

    plain = outcome(read=False)
    assert outcome(read=True) == plain


@pytest.mark.parametrize("position", ["first", "later"])
def test_a_cancelled_task_leaves_the_connection_as_before(shared_server, flights, position):
    """asyncio: the task cancelled while its statement sleeps on the server: CancelledError,
    the transaction failed (psycopg cancels the query), the connection usable after ROLLBACK."""
    url = sa.make_url(shared_server.url("psycopg", sslmode="disable"))
    del flights

    async def outcome(read: bool):
        engine = dropsafe.create_async_engine(url, pool_size=1)
        try:
            async with engine.connect() as connection:
                pid = await connection.run_sync(
                    lambda c: driver_connection(c.connection.dbapi_connection).pgconn.backend_pid
                )
                if position == "later":
                    await connection.run_sync(lambda c: _send(c, "SELECT 1", read=False))
                task = asyncio.ensure_future(
                    connection.run_sync(
                        lambda c: _send(
                            c,
                            f"UPDATE {TABLE} SET v = v + 1 WHERE pg_sleep(20) IS NOT NULL",
                            read=read,
                        )
                    )
                )
                deadline = time.monotonic() + DEADLINE_S
                while not shared_server.execute(
                    f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'PgSleep'"
                ):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                status = await connection.run_sync(_status)
                await connection.run_sync(_end)
                value = (
                    await connection.exec_driver_sql(f"SELECT v FROM {TABLE} WHERE n = 1")
                ).scalar()
                return status, value
        finally:
            await engine.dispose()

    plain = asyncio.run(asyncio.wait_for(outcome(read=False), DEADLINE_S))
    assert asyncio.run(asyncio.wait_for(outcome(read=True), DEADLINE_S)) == plain
    assert plain == (pq.TransactionStatus.INERROR, 10)


# -- through the engine: a plain transaction ------------------------------------------------


def test_the_engines_read_makes_no_flight_more(request, shared_server, flights, monkeypatch):
    """A plain transaction through a hardened engine (replay on: INSERT, UPDATE, COMMIT), sync and
    async: the engine reads the xid in the INSERT's flight, and the transaction makes as many
    flights as with the read turned off (the driver's capability off): 3 (BEGIN+INSERT,
    UPDATE, COMMIT)."""
    url = sa.make_url(shared_server.url("psycopg", sslmode="disable"))
    url = url.set(host="127.0.0.1", port=flights.port)
    readings: list[object] = []
    real = DRIVER.send_reading_xid

    def spy(*args: Any, **kwargs: Any) -> Any:
        reading = real(*args, **kwargs)
        readings.append(reading)
        return reading

    def transaction(connection: sa.Connection) -> list[str]:
        start = len(flights.query_flights())
        connection.execute(sa.text(f"INSERT INTO {TABLE} VALUES (:n, 1)"), {"n": 7})
        connection.execute(sa.text(f"UPDATE {TABLE} SET v = 2 WHERE n = 7"))
        connection.commit()
        return [flight.label for flight in flights.query_flights()[start:]]

    counted: dict[tuple[str, bool], list[str]] = {}
    for name in FACES:
        for reads in (False, True):
            _fill(shared_server)
            with monkeypatch.context() as patch:
                patch.setattr(DRIVER, "send_reading_xid", spy)
                if not reads:
                    patch.setattr(DRIVER, "capabilities", Capabilities(pipelines=True))
                policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(replay_transaction=True))
                made = Face(url, name, pool_size=1, policy=policy)
                try:
                    made.run(lambda connection: None)  # connected, its first reads made
                    readings.clear()
                    counted[name, reads] = made.run(transaction)
                finally:
                    made.close()
            if reads:
                assert len(readings) == 1, readings  # the INSERT's flight; the UPDATE's not
                assert readings[0] is not None
                assert readings[0].values[0] is not None
            else:
                assert readings == []
    for name in FACES:
        assert len(counted[name, True]) == len(counted[name, False]) == 3, counted
        assert counted[name, True][0].startswith("P BEGIN"), counted
    del request


def test_a_statement_psycopg_prepares_reads_the_same(face) -> None:
    """psycopg prepares a statement at its fifth execution (a Parse in the same flight): 7
    executions in one transaction see the same rowcounts, one flight each (psycopg's own
    makes one more for the Parse), one xid."""

    def run_seven(read: bool):
        def run(connection: sa.Connection):
            start = len(face_flights.query_flights())
            seen = []
            for n in range(7):
                cursor, reading = _send(
                    connection, f"UPDATE {TABLE} SET v = %(v)s WHERE n = 1", {"v": n}, read=read
                )
                seen.append((cursor.rowcount, None if reading is None else reading.values[0]))
            flights_made = len(face_flights.query_flights()) - start
            _end(connection)
            return seen, flights_made

        return face.run(run)

    face_flights = face.flights
    plain, plain_flights = run_seven(read=False)
    marked, marked_flights = run_seven(read=True)
    assert [rowcount for rowcount, _ in marked] == [rowcount for rowcount, _ in plain]
    # psycopg's own sends the fifth one's Parse in a flight of its own (Parse, Sync); with
    # the read, the Parse rides the statement's pipeline: one flight fewer, never one more.
    assert (marked_flights, plain_flights) == (7, 8)
    assert len({xid for _, xid in marked}) == 1
    assert marked[0][1] is not None


def test_a_read_that_fails_after_its_statement_is_raised_at_the_statement(face, shared_server):
    """The statement succeeds and the read after it fails: the read's error is raised at the
    statement and the transaction is failed, so the app never takes an INSERT that COMMIT
    would silently drop (a failed transaction's COMMIT says ROLLBACK). The engine's question
    fails only where a cancel or a timeout strikes it; here a column of the question names a
    view another session holds locked, and the statement set a lock timeout."""
    statement = (
        "WITH s AS (SELECT set_config('lock_timeout', '200ms', true)) "
        f"INSERT INTO {TABLE} SELECT 9, 9 FROM s"
    )
    holder_url = sa.make_url(shared_server.url("psycopg")).set(drivername="postgresql")
    with psycopg.connect(holder_url.render_as_string(hide_password=False)) as holder:
        holder.execute("LOCK TABLE pg_catalog.pg_stat_bgwriter IN ACCESS EXCLUSIVE MODE")

        def run(connection: sa.Connection):
            with pytest.raises(psycopg.errors.LockNotAvailable):
                _send(connection, statement, read=True, more=LOCKED_VIEW)
            status = _status(connection)
            _end(connection, commit=True)
            return status

        assert face.run(run) == pq.TransactionStatus.INERROR
        holder.rollback()
    assert int(shared_server.execute(f"SELECT count(*) FROM {TABLE} WHERE n = 9")[0][0]) == 0


@pytest.mark.parametrize("name", FACES)
def test_a_commit_whose_reply_is_lost_is_resolved_committed(shared_server, flights, name):
    """Through a hardened engine (replay on): the server commits, the reply is withheld and
    the link reset. The xid read in the INSERT's flight resolves it: the COMMIT returns, the
    row is there once. (On the async face the server's life was looked up by SQLAlchemy's
    adapter instead of psycopg's connection it is kept by: 'committed' was unknown there.)"""
    url = sa.make_url(shared_server.url("psycopg", sslmode="disable"))
    url = url.set(host="127.0.0.1", port=flights.port)
    events: list[object] = []
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
    )
    made = Face(url, name, pool_size=1, policy=policy)

    def transaction(connection: sa.Connection) -> None:
        connection.execute(sa.text(f"INSERT INTO {TABLE} VALUES (8, 8)"))
        flights.strike = Strike(step=len(flights.query_flights()) + 1, phase="after", then="rst")
        try:
            connection.commit()  # the reply withheld: resolved by the xid
        finally:
            flights.strike = None

    try:
        made.run(lambda connection: None)  # connected, its session learned
        made.run(transaction)
    finally:
        made.close()
    assert [e.outcome for e in events if isinstance(e, CommitResolved)] == ["committed"]
    assert int(shared_server.execute(f"SELECT count(*) FROM {TABLE} WHERE n = 8")[0][0]) == 1
