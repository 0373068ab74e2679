"""Attacks on psycopg2's connection class that sends BEGIN with the first statement.

Each scenario runs on a plain psycopg2 connection and on one of
`dropsafe._drivers.psycopg2_first_flight.connection_class`, and what the app can see is
compared, as in tests/drivers/test_psycopg2_first_flight.py: values, errors, the cursor's
``query``, ``statusmessage`` and ``rowcount``, the connection's flags and notices, the rows
committed. Besides: another thread's statement while a COMMIT is under way, the scenarios of
that module under a green wait callback, and what cannot read alike (the server's error text
numbers the lines of the whole query string).
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
import time

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.sql
import pytest
import sqlalchemy as sa
from psycopg2_connections import dsn, flags

import dropsafe
from dropsafe._drivers import psycopg2_first_flight
from dropsafe._drivers.psycopg2_first_flight import connection_class

pytestmark = [pytest.mark.shares_server]

DEADLINE_S = 20.0
SERVER_VIEW = (
    "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'),"
    " current_setting('transaction_deferrable')"
)


def _outcome(run):
    """What ``run()`` returned, or its error's class, SQLSTATE and message."""
    try:
        return ("returned", run())
    except psycopg2.Error as exc:
        return ("raised", type(exc).__name__, exc.pgcode, str(exc))


class LoggingCursor(psycopg2.extensions.cursor):
    """Logs every query it sent, read as psycopg2.extras.LoggingCursor reads it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged = []

    def execute(self, query, vars=None):  # noqa: A002 - psycopg2's
        try:
            return super().execute(query, vars)
        finally:
            self.logged.append(self.query)


def _scenarios():  # noqa: PLR0915 - one function per scenario, named by the test ids
    def statement_less_queries(conn, table, seen):
        # After "BEGIN;" a query without a statement would read as BEGIN's success; psycopg2
        # sends BEGIN, then the query, refused: "can't execute an empty query".
        del table
        cur = conn.cursor()
        for query in (
            "-- nothing",
            ";",
            " ;\n; ",
            "/* a /* nested */ comment */",
            "-- one\n/* two */ ;",
            b"-- bytes",
            "\t",
        ):
            seen.append((query, _outcome(lambda q=query: cur.execute(q)), flags(conn)))
            conn.rollback()
        # Statements after blanks and comments.
        for query in ("-- a\nSELECT 1", "/* a */ SELECT 2", ";SELECT 3"):
            seen.append(
                (
                    query,
                    _outcome(lambda q=query: (cur.execute(q), cur.fetchall())[1]),
                    flags(conn),
                )
            )
            conn.rollback()

    def syntax_errors(conn, table, seen):
        # The server parses a whole query string before it runs any of it: BEGIN and a
        # statement with a syntax error, in one string, leave no transaction open; psycopg2's
        # own BEGIN, sent alone, opened the one the error aborts.
        cur = conn.cursor()
        for query in (
            "SELEC 1",
            f"INSERT INTO {table} VALUES (1); SELEC 2",
            "SELECT 'unterminated",
            "/* a /* b */ SELECT 4",
            b"SELEC 5",
            "DO $$BEGIN EXECUTE 'SELEC 6'; END$$",  # while running: BEGIN ran
        ):
            seen.append((query, _outcome(lambda q=query: cur.execute(q)), flags(conn)))
            seen.append(_outcome(lambda: cur.execute(f"INSERT INTO {table} VALUES (2)")))
            seen.append((cur.query, flags(conn)))
            conn.commit()
        # Parameters: the query sent again, the same.
        seen.append(_outcome(lambda: cur.execute("SELECT %s FROM", (3,))))
        seen.append((cur.query, flags(conn)))
        conn.rollback()

    def psycopg2s_own_begin_inside_with_characteristics(conn, table, seen):
        # A named cursor (SQLAlchemy's stream_results, yield_per) or a large object inside a
        # transaction the class began: psycopg2 sends its own BEGIN there. With DEFERRABLE in
        # it, the server refuses it after the first query ("SET TRANSACTION [NOT] DEFERRABLE
        # must be called before any query"), and the transaction is aborted.
        for characteristics in (
            {"deferrable": True},
            {"isolation_level": "REPEATABLE READ", "readonly": False, "deferrable": False},
            {"isolation_level": "SERIALIZABLE", "readonly": True},
        ):
            conn.set_session(**characteristics)
            cur = conn.cursor()
            cur.execute(f"SELECT count(*) FROM {table}")
            named = conn.cursor("streamed")
            seen.append(_outcome(lambda n=named: (n.execute("SELECT 1"), n.fetchall())[1]))
            seen.append(_outcome(lambda c=cur: c.execute(SERVER_VIEW) or c.fetchall()))
            seen.append(flags(conn))
            conn.rollback()
            cur.execute(SERVER_VIEW)  # the characteristics kept for the next transaction
            seen.append((cur.fetchall(), flags(conn)))
            conn.rollback()
            conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")

    def a_large_object_inside_with_characteristics(conn, table, seen):
        conn.set_session(deferrable=True)
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (40)")
        lob = conn.lobject(0, "wb")
        lob.write(b"x")
        seen.append(flags(conn))
        conn.commit()
        cur.execute(SERVER_VIEW)
        seen.append((cur.fetchall(), flags(conn)))
        conn.rollback()

    def the_apps_own_transaction_statements(conn, table, seen):
        # psycopg2's status is its own, not the server's: after the app's COMMIT statement
        # (Alembic's old op.execute("COMMIT") before CREATE INDEX CONCURRENTLY) it still reads
        # "in a transaction", sends no BEGIN, and the next statements run alone.
        cur = conn.cursor()
        for end in ("COMMIT", "ROLLBACK", "END", "ABORT", "COMMIT AND CHAIN"):
            cur.execute(f"INSERT INTO {table} VALUES (50)")
            cur.execute(end)
            seen.append((end, cur.statusmessage, flags(conn)))
            seen.append(
                _outcome(lambda c=cur: c.execute(f"CREATE INDEX CONCURRENTLY ON {table} (v)"))
            )
            seen.append(_outcome(lambda c=cur: c.execute(f"INSERT INTO {table} VALUES (51)")))
            seen.append(flags(conn))
            conn.rollback()
            seen.append((list(conn.notices), flags(conn)))
            del conn.notices[:]
        cur.execute("BEGIN")  # the app's own BEGIN, first: psycopg2's BEGIN before it
        cur.execute(f"INSERT INTO {table} VALUES (52)")
        cur.execute("COMMIT")
        seen.append(_outcome(conn.commit))
        cur.execute(f"INSERT INTO {table} VALUES (53)")
        conn.rollback()
        seen.append((list(conn.notices), flags(conn)))

    def register_helpers(conn, table, seen):
        # psycopg2.extras' helpers read conn.status, query the catalog, and roll back only
        # where they opened the transaction themselves.
        del table
        cur = conn.cursor()
        cur.execute("DROP TYPE IF EXISTS ff2_pair; CREATE TYPE ff2_pair AS (a int, b text)")
        conn.commit()
        psycopg2.extras.register_composite("ff2_pair", conn)
        seen.append(flags(conn))
        cur.execute("SELECT (1, 'x')::ff2_pair")
        seen.append((tuple(cur.fetchone()[0]), flags(conn)))
        psycopg2.extras.register_composite("ff2_pair", cur)  # inside: left open
        seen.append(flags(conn))
        conn.rollback()
        psycopg2.extras.register_default_jsonb(conn)
        seen.append(flags(conn))
        cur.execute("DROP TYPE ff2_pair")
        conn.commit()

    def what_the_cursor_reads(conn, table, seen):
        cur = conn.cursor()
        for query, params in (
            (f"INSERT INTO {table} VALUES (%s), (%s)", (1, 2)),
            ("SELECT 100 %% 7, %s", ("a%b",)),
            ("SELECT '100 %% 7'", None),
            (b"SELECT 1", None),
            (
                psycopg2.sql.SQL("SELECT {}").format(psycopg2.sql.Literal("composed")),
                None,
            ),
        ):
            cur.execute(query, params)
            seen.append((cur.query, cur.statusmessage, cur.rowcount, cur.description is None))
            conn.rollback()
        cur.execute("SELECT 1")
        cur.executemany(f"INSERT INTO {table} VALUES (%s)", [(3,), (4,)])
        seen.append((cur.query, cur.statusmessage, cur.rowcount))
        conn.commit()
        cur.executemany(f"INSERT INTO {table} VALUES (%s)", [(5,)])
        seen.append((cur.query, cur.statusmessage, cur.rowcount))
        conn.rollback()
        psycopg2.extras.execute_batch(
            cur, f"INSERT INTO {table} VALUES (%s)", [(v,) for v in range(6, 11)], page_size=2
        )
        seen.append((cur.query, cur.rowcount, flags(conn)))
        conn.rollback()
        psycopg2.extras.execute_values(
            cur, f"INSERT INTO {table} VALUES %s", [(v,) for v in range(11, 16)], page_size=2
        )
        seen.append((cur.query, cur.rowcount, flags(conn)))
        conn.commit()
        with pytest.raises(IndexError):  # psycopg2's own error, before anything is sent
            cur.execute("SELECT %s, %s", (1,))
        seen.append((cur.query, flags(conn)))

    def a_cursor_that_logs_its_query(conn, table, seen):
        # As psycopg2.extras.LoggingCursor: the query read after psycopg2's execute.
        conn.cursor_factory = LoggingCursor
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (20,))
        with pytest.raises(psycopg2.errors.UndefinedColumn):
            cur.execute("SELECT no_such_column")
        conn.rollback()
        cur.execute(b"SELECT 1")
        conn.commit()
        seen.append(cur.logged)

    def statements_outside_a_transaction_block(conn, table, seen):
        cur = conn.cursor()
        for query in (f"VACUUM {table}", "CREATE DATABASE never_made"):
            seen.append(_outcome(lambda q=query: cur.execute(q)))
            seen.append(flags(conn))
            conn.rollback()

    def commit_after_an_error(conn, table, seen):
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (30)")
        seen.append(_outcome(lambda: cur.execute("SELECT 1/0")))
        seen.append(_outcome(conn.commit))  # the server answers ROLLBACK: nothing committed
        seen.append((cur.statusmessage, flags(conn)))

    def notices_and_notifies(conn, table, seen):
        del table
        cur = conn.cursor()
        cur.execute("DO $$BEGIN RAISE NOTICE 'first'; END$$")
        cur.execute("LISTEN dropsafe_ff")
        cur.execute("NOTIFY dropsafe_ff, 'payload'")
        seen.append((list(conn.notices), list(conn.notifies), flags(conn)))
        conn.commit()
        conn.poll()
        seen.append(([(n.channel, n.payload) for n in conn.notifies], flags(conn)))
        cur.execute("BEGIN")  # the app's own: a transaction is open already, in both
        seen.append((list(conn.notices), cur.statusmessage, flags(conn)))
        conn.rollback()

    return {
        name: scenario
        for name, scenario in locals().items()
        if callable(scenario) and not name.startswith("_")
    }


SCENARIOS = _scenarios()


def _compare(server, scenario, name):
    conninfo = dsn(server)
    outcomes = []
    for factory in (None, connection_class()):
        table = f"ff2_attack_{name}"
        server.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
        conn = psycopg2.connect(conninfo, connection_factory=factory)
        try:
            seen: list[object] = [flags(conn)]
            scenario(conn, table, seen)
            seen.append(flags(conn))
        finally:
            conn.close()
        rows = sorted(server.execute(f"SELECT v FROM {table}"))
        server.execute(f"DROP TABLE {table}")
        outcomes.append((seen, rows))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_connection_reads_as_psycopg2s(shared_server, scenario) -> None:
    """The same values, errors, cursor attributes, flags, notices and rows, with the class."""
    _compare(shared_server, SCENARIOS[scenario], scenario)


@pytest.fixture
def green():
    """psycopg2 with a wait callback (psycogreen's way), removed after the test."""
    psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)
    try:
        yield
    finally:
        psycopg2.extensions.set_wait_callback(None)


def _base_scenarios():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    try:
        import test_psycopg2_first_flight as base
    finally:
        sys.path.pop(0)
    return base.SCENARIOS


BASE_SCENARIOS = _base_scenarios()


#: psycopg2 refuses large objects under a wait callback ("lobject cannot be used ...").
GREEN_SCENARIOS = [name for name in [*BASE_SCENARIOS, *SCENARIOS] if "large_object" not in name]


@pytest.mark.parametrize("scenario", GREEN_SCENARIOS)
def test_under_a_wait_callback_it_reads_as_psycopg2s(shared_server, green, scenario) -> None:
    """Every scenario, with psycopg2's queries run through a wait callback (green)."""
    del green
    scenarios = {**BASE_SCENARIOS, **SCENARIOS}
    _compare(shared_server, scenarios[scenario], scenario)


def _blocked_in_c(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits in a call into C: psycopg2's ``execute``, or a lock.

    From the first-flight module: in psycopg2's ``execute`` (the transaction status read
    already) or on the connection's lock (not read yet: the COMMIT holds it). From the test
    (plain psycopg2): in its ``execute``.
    """
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    if frame.f_code.co_filename == psycopg2_first_flight.__file__:
        return "super().execute(" in line or "lock.acquire()" in line
    return frame.f_code.co_filename == __file__ and "VALUES (2)" in line


def _until_waiting_on_a_lock(holder, conn, what, deadline) -> None:
    """Wait until ``conn``'s backend waits on a lock, as ``holder`` sees it, by ``deadline``."""
    look = holder.cursor()
    while True:
        look.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
            (conn.get_backend_pid(),),
        )
        if look.fetchone()[0] == "Lock":
            return
        assert time.monotonic() < deadline, f"{what} never waited on the lock"


@pytest.mark.parametrize("factory", ["psycopg2", "first_flight"])
def test_a_statement_while_another_thread_commits_is_in_a_transaction(
    shared_server, factory
) -> None:
    """Another thread's statement, sent while a COMMIT is under way, opens a transaction.

    psycopg2 reads its status and sends under its lock: the statement waits for the COMMIT,
    then sends BEGIN. The class read libpq's status unlocked: "active" during the COMMIT, so
    no BEGIN; the statement ran alone in autocommit and was committed, the app's rollback()
    rolled nothing back. The COMMIT is held by a deferred trigger waiting on an advisory lock.
    """
    table = f"ff2_attack_commit_race_{factory}"
    shared_server.execute(
        f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int);"
        f" CREATE OR REPLACE FUNCTION {table}_hold() RETURNS trigger LANGUAGE plpgsql"
        " AS $$BEGIN PERFORM pg_advisory_xact_lock(7717); RETURN NULL; END$$;"
        f" CREATE CONSTRAINT TRIGGER hold AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED"
        f" FOR EACH ROW WHEN (NEW.v = 1) EXECUTE FUNCTION {table}_hold()"
    )
    conninfo = dsn(shared_server)
    holder = psycopg2.connect(conninfo)
    holder.autocommit = True
    conn = psycopg2.connect(
        conninfo, connection_factory=connection_class() if factory == "first_flight" else None
    )
    threads: list[threading.Thread] = []
    seen: dict[str, object] = {}
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(7717)")
        conn.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        committer = threading.Thread(target=conn.commit, daemon=True)
        threads.append(committer)
        committer.start()
        deadline = time.monotonic() + DEADLINE_S
        _until_waiting_on_a_lock(holder, conn, "the COMMIT", deadline)

        def insert() -> None:
            conn.cursor().execute(f"INSERT INTO {table} VALUES (2)")
            seen["flags"] = flags(conn)

        inserter = threading.Thread(target=insert, daemon=True)
        threads.append(inserter)
        inserter.start()
        while not _blocked_in_c(inserter):
            assert inserter.is_alive(), "the statement did not wait for the COMMIT"
            assert time.monotonic() < deadline, "the statement never waited"
        holder.cursor().execute("SELECT pg_advisory_unlock(7717)")
        for thread in threads:
            thread.join(DEADLINE_S)
            assert not thread.is_alive()
        conn.rollback()
    finally:
        holder.close()
        conn.close()
    rows = sorted(shared_server.execute(f"SELECT v FROM {table}"))
    assert (seen["flags"], rows) == ((False, 2, None, None, None, 2), [("1",)])


@pytest.mark.xfail(
    strict=True,
    reason="the server numbers the lines and positions of the whole query string: BEGIN's "
    "line is LINE 1, the app's statement LINE 2, its position shifted by BEGIN's length",
)
def test_an_errors_position_reads_as_psycopg2s(shared_server) -> None:
    """An error's text and ``diag.statement_position`` point into the app's statement."""
    seen = []
    for factory in (None, connection_class()):
        conn = psycopg2.connect(dsn(shared_server), connection_factory=factory)
        try:
            with pytest.raises(psycopg2.errors.UndefinedColumn) as raised:
                conn.cursor().execute("SELECT no_such_column")
            seen.append((str(raised.value), raised.value.diag.statement_position))
        finally:
            conn.close()
    assert seen[0] == seen[1]


def _terminate(server, conn) -> None:
    """Terminate ``conn``'s backend and wait until it is gone."""
    pid = conn.get_backend_pid()
    server.execute(f"SELECT pg_terminate_backend({pid})")
    deadline = time.monotonic() + DEADLINE_S
    while server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != [("0",)]:
        assert time.monotonic() < deadline, "the backend outlived its termination"


def _after_a_kill(conn, seen):
    seen.append((conn.closed, _outcome(conn.rollback), _outcome(conn.commit), conn.closed))
    seen.append(_outcome(lambda: setattr(conn, "autocommit", True)))
    seen.append(_outcome(lambda: conn.cursor("named")))
    seen.append(_outcome(lambda: conn.set_session(readonly=True)))


@pytest.mark.parametrize("at", ["commit", "rollback", "first_statement", "next_statement"])
def test_a_terminated_backend_reads_as_psycopg2s(shared_server, at) -> None:
    """The backend terminated between statements: the same errors, flags and closed state.

    At ``commit()``/``rollback()`` (the class's own COMMIT and ROLLBACK through a cursor), at
    the first statement (BEGIN in its query string) and at one inside the transaction.
    """
    outcomes = []
    for factory in (None, connection_class()):
        conn = psycopg2.connect(dsn(shared_server), connection_factory=factory)
        seen: list[object] = []
        try:
            cur = conn.cursor()
            if at != "first_statement":
                cur.execute("SELECT 1")
            _terminate(shared_server, conn)
            end = {"commit": conn.commit, "rollback": conn.rollback}
            seen.append(_outcome(end.get(at, lambda c=cur: c.execute("SELECT 2"))))
            _after_a_kill(conn, seen)
        finally:
            conn.close()
        outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0][:2] == ("raised", "OperationalError")


def _sqlalchemy_requests(engine, table):
    """What an app does through SQLAlchemy where psycopg2 sends a BEGIN of its own."""
    seen = []
    view = sa.text(SERVER_VIEW)
    options = {"postgresql_deferrable": True, "isolation_level": "SERIALIZABLE"}
    with engine.connect().execution_options(**options) as conn:
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (60)"))
        streamed = conn.execution_options(stream_results=True, yield_per=2)
        seen.append([row[0] for row in streamed.execute(sa.text("SELECT generate_series(1, 5)"))])
        seen.append(conn.execute(view).all())
        conn.commit()
        seen.append(conn.execute(view).all())
        conn.rollback()
    with engine.connect() as conn:  # the characteristics reset at checkin
        seen.append(conn.execute(view).all())
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (61)"))
        conn.exec_driver_sql("COMMIT")  # the app's own, as Alembic's op.execute("COMMIT")
        conn.execute(sa.text(f"CREATE INDEX CONCURRENTLY ON {table} (v)"))
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (62)"))
        conn.rollback()
    return seen


@pytest.mark.parametrize("first_flight", [False, True])
def test_through_sqlalchemy_it_reads_as_psycopg2s(shared_server, disposing, first_flight) -> None:
    """Streamed results in a DEFERRABLE transaction; an app's COMMIT before a statement that
    cannot run in a transaction block: the same rows, values and committed rows, option on
    and off (psycopg2's own BEGIN inside a transaction the class began was refused; the
    CREATE INDEX CONCURRENTLY ran in a new transaction block, refused).
    """
    table = f"ff2_attack_sqlalchemy_{first_flight}"
    shared_server.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
    policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight))
    engine = disposing(
        dropsafe.create_engine(shared_server.url("psycopg2"), policy=policy, pool_size=1)
    )
    seen = _sqlalchemy_requests(engine, table)
    with engine.connect() as conn:
        native = conn.connection.dbapi_connection
        assert (type(native) is connection_class()) is first_flight
    rows = sorted(shared_server.execute(f"SELECT v FROM {table}"))
    assert (seen, rows) == (
        [
            [1, 2, 3, 4, 5],
            [("serializable", "off", "on")],
            [("serializable", "off", "on")],
            [("read committed", "off", "off")],
        ],
        [("60",), ("61",), ("62",)],
    )


@pytest.mark.parametrize("factory", ["psycopg2", "first_flight"])
def test_a_cancel_during_the_first_flight(shared_server, factory) -> None:
    """``cancel()`` from another thread while BEGIN and a long statement are in flight.

    The statement is canceled, the transaction open and failed (BEGIN ran), as psycopg2's;
    the cancel does not wait for the connection's lock.
    """
    conninfo = dsn(shared_server)
    conn = psycopg2.connect(
        conninfo, connection_factory=connection_class() if factory == "first_flight" else None
    )
    seen: dict[str, object] = {}
    try:
        pid = conn.get_backend_pid()

        def sleep() -> None:
            seen["outcome"] = _outcome(lambda: conn.cursor().execute("SELECT pg_sleep(60)"))

        sleeper = threading.Thread(target=sleep, daemon=True)
        sleeper.start()
        deadline = time.monotonic() + DEADLINE_S
        while shared_server.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND state = 'active'"
            " AND query LIKE '%pg_sleep%'"
        ) != [("1",)]:
            assert time.monotonic() < deadline, "the statement never ran"
        conn.cancel()
        sleeper.join(DEADLINE_S)
        assert not sleeper.is_alive()
        after = flags(conn)
        conn.rollback()
        assert (seen["outcome"][:3], after, flags(conn)) == (
            ("raised", "QueryCanceled", "57014"),
            (False, 2, None, None, None, 3),
            (False, 1, None, None, None, 0),
        )
    finally:
        conn.close()


@pytest.mark.parametrize("factory", ["psycopg2", "first_flight"])
def test_under_a_wait_callback_a_rollback_waits_for_another_threads_statement(
    shared_server, green, factory
) -> None:
    """A wait callback (psycopg2.extras.wait_select, for Ctrl-C) and two threads.

    psycopg2's ``rollback()`` from another thread waits for the statement under way (its
    lock), then rolls back. The class's, which let go of its lock under a wait callback (for
    green threads), sent its ROLLBACK through a cursor that psycopg2 refused ("execute cannot
    be used while an asynchronous query is underway") and believed the transaction over.
    """
    del green
    conninfo = dsn(shared_server)
    holder = psycopg2.connect(conninfo)
    holder.autocommit = True
    conn = psycopg2.connect(
        conninfo, connection_factory=connection_class() if factory == "first_flight" else None
    )
    seen: dict[str, object] = {}
    threads: list[threading.Thread] = []
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(7718)")
        conn.cursor().execute("SELECT 1")

        def wait_for_the_lock() -> None:
            seen["statement"] = _outcome(
                lambda: conn.cursor().execute("SELECT pg_advisory_xact_lock(7718)")
            )

        def roll_back() -> None:
            seen["rollback"] = _outcome(conn.rollback)

        statement = threading.Thread(target=wait_for_the_lock, daemon=True)
        threads.append(statement)
        statement.start()
        deadline = time.monotonic() + DEADLINE_S
        _until_waiting_on_a_lock(holder, conn, "the statement", deadline)
        rollback = threading.Thread(target=roll_back, daemon=True)
        threads.append(rollback)
        rollback.start()
        while not _waiting_to_roll_back(rollback):
            assert rollback.is_alive(), f"the rollback did not wait: {seen}"
            assert time.monotonic() < deadline, "the rollback never waited"
        holder.cursor().execute("SELECT pg_advisory_unlock(7718)")
        for thread in threads:
            thread.join(DEADLINE_S)
            assert not thread.is_alive()
        assert (seen, flags(conn)) == (
            {"statement": ("returned", None), "rollback": ("returned", None)},
            (False, 1, None, None, None, 0),
        )
    finally:
        holder.close()
        conn.close()


def _waiting_to_roll_back(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits in ``rollback()``: on the class's lock, or in psycopg2's."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    if frame.f_code.co_filename == psycopg2_first_flight.__file__:
        return "with self._dropsafe_lock" in line
    caller = frame.f_back  # psycopg2's rollback, called by _outcome, in C
    return (
        frame.f_code is _outcome.__code__
        and caller is not None
        and "_outcome(conn.rollback)" in linecache.getline(__file__, caller.f_lineno)
    )


#: 120 requests take about 2 s on a loaded 2-core machine.
GEVENT_DEADLINE_S = 12.0
GEVENT_REQUESTS = """
import os
import sys
from gevent import monkey
monkey.patch_all()
import gevent
import sqlalchemy as sa
import dropsafe

url, defer = os.environ["FF2_ATTACK_URL"], sys.argv[1] == "defer"
policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(defer_checkin_rollback=defer))
engine = dropsafe.create_engine(url, pool_size=3, policy=policy)

def work(i):
    for _ in range(20):
        with engine.connect() as conn:  # its ROLLBACK at checkin: deferred
            conn.execute(sa.text("SELECT 1")).all()

jobs = [gevent.spawn(work, i) for i in range(6)]
gevent.joinall(jobs, raise_error=True)
engine.dispose()
print("DONE")
"""


@pytest.mark.parametrize("defer", ["no_defer", "defer"])
def test_greenlets_under_gevents_monkey_patching(shared_server, defer) -> None:
    """120 requests of six greenlets on three psycopg2 connections, gevent patched, no wait
    callback (psycopg2 blocks the hub on its I/O): all end within the deadline. Deferred, they
    hung after about a dozen requests until session 18 (the worker waited on gevent's queue,
    parked on a hub of its own thread that the app's hub never woke)."""
    pytest.importorskip("gevent")
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-c", GEVENT_REQUESTS, defer],
            env={**os.environ, "FF2_ATTACK_URL": str(shared_server.url("psycopg2"))},
            capture_output=True,
            text=True,
            timeout=GEVENT_DEADLINE_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the greenlets' requests hung")
    assert done.stdout.strip() == "DONE", done.stderr[-2000:]


@pytest.mark.parametrize("first_flight", [False, True])
def test_a_checkin_listener_sets_a_characteristic(shared_server, disposing, first_flight) -> None:
    """An app's ``checkin`` listener that resets a session characteristic on the driver's
    connection, after requests whose ROLLBACK at checkin is deferred (a new connection's first
    few are). psycopg2 refused it while the ROLLBACK ran in the worker ("set_session cannot be
    used inside a transaction") until session 18: on a pool with the app's checkin listeners
    that ROLLBACK is awaited."""
    refused = []
    for _ in range(3):
        policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(begin_in_first_flight=first_flight))
        engine = disposing(
            dropsafe.create_engine(shared_server.url("psycopg2"), policy=policy, pool_size=1)
        )

        @sa.event.listens_for(engine, "checkin")
        def reset_readonly(dbapi_connection, record) -> None:
            del record
            try:
                dbapi_connection.readonly = None
            except psycopg2.ProgrammingError as exc:
                refused.append(str(exc))

        for _ in range(6):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1")).all()
        engine.dispose()
    assert refused == []
