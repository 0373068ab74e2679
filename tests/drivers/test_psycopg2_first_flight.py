"""psycopg2's connection class that sends BEGIN with the first statement reads as psycopg2's own.

Each scenario is run on a plain psycopg2 connection and on one of
`dropsafe._drivers.psycopg2_first_flight.connection_class` (psycopg2 in autocommit underneath),
and what the app can see is compared: the values returned, the errors raised (class, SQLSTATE),
the connection's flags (``autocommit``, ``status``, ``isolation_level``, ``readonly``,
``deferrable``), libpq's transaction status, the server's view of the transaction and the rows
another connection sees committed. Only loopback; a throwaway table per scenario.
"""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.sql
import pytest
from psycopg2_connections import dsn, flags

from dropsafe._drivers.psycopg2_first_flight import begin_text, connection_class

pytestmark = [pytest.mark.shares_server]

SERVER_VIEW = (
    "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'),"
    " current_setting('transaction_deferrable'),"
    " current_setting('default_transaction_isolation')"
)


def _scenarios():  # noqa: PLR0915 - one function per scenario, named by the test ids
    def commit_and_rollback(conn, table, seen):
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (1)")
        seen.append(flags(conn))
        conn.commit()
        seen.append(flags(conn))
        cur.execute(f"INSERT INTO {table} VALUES (2)")
        conn.rollback()
        seen.append(flags(conn))

    def session_characteristics(conn, table, seen):
        del table
        conn.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)
        seen.append(flags(conn))
        cur = conn.cursor()
        cur.execute(SERVER_VIEW)
        seen.append(cur.fetchone())
        conn.rollback()
        conn.isolation_level = "REPEATABLE READ"
        conn.readonly = False
        conn.deferrable = None
        seen.append(flags(conn))
        cur.execute(SERVER_VIEW)
        seen.append(cur.fetchone())
        conn.rollback()

    def autocommit_with_characteristics(conn, table, seen):
        # psycopg2 sets the session's defaults when characteristics are set in autocommit.
        conn.autocommit = True
        conn.set_session(isolation_level="SERIALIZABLE")
        seen.append(flags(conn))
        cur = conn.cursor()
        cur.execute(SERVER_VIEW)
        seen.append(cur.fetchone())
        cur.execute(f"INSERT INTO {table} VALUES (3)")  # committed alone
        conn.autocommit = False
        seen.append(flags(conn))
        cur.execute(SERVER_VIEW)
        seen.append(cur.fetchone())
        conn.rollback()

    def old_isolation_api(conn, table, seen):
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (4)")
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)  # rolls back
        seen.append(flags(conn))
        cur.execute(f"INSERT INTO {table} VALUES (5)")
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
        seen.append(flags(conn))
        cur.execute(SERVER_VIEW)
        seen.append(cur.fetchone())
        conn.commit()

    def refused_inside_a_transaction(conn, table, seen):
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (6)")
        for change in (
            lambda: setattr(conn, "autocommit", True),
            lambda: conn.set_session(readonly=True),
            lambda: setattr(conn, "isolation_level", 3),
            lambda: conn.tpc_begin(conn.xid(1, "g", "b")),
        ):
            with pytest.raises(psycopg2.ProgrammingError) as raised:
                change()
            seen.append(str(raised.value))
        seen.append(flags(conn))
        conn.commit()

    def bad_values(conn, table, seen):
        del table
        for change in (
            lambda: setattr(conn, "isolation_level", "sometimes"),
            lambda: conn.set_session(readonly="maybe"),
            lambda: conn.set_isolation_level(9),
        ):
            with pytest.raises((ValueError, TypeError)) as raised:
                change()
            seen.append((type(raised.value).__name__, str(raised.value)))
        seen.append(flags(conn))

    def errors(conn, table, seen):
        cur = conn.cursor()
        with pytest.raises(psycopg2.Error) as raised:
            cur.execute("SELECT no_such_column")
        seen.append((type(raised.value).__name__, raised.value.pgcode, flags(conn)))
        with pytest.raises(psycopg2.Error) as raised:
            cur.execute("SELECT 1")
        seen.append((type(raised.value).__name__, raised.value.pgcode))
        conn.rollback()
        with pytest.raises(psycopg2.ProgrammingError) as raised:
            cur.execute("")
        seen.append((str(raised.value), flags(conn)))
        cur.execute(
            psycopg2.sql.SQL("INSERT INTO {} VALUES (%s)").format(psycopg2.sql.Identifier(table)),
            (7,),
        )
        seen.append(flags(conn))
        conn.commit()

    def cursor_classes(conn, table, seen):
        conn.cursor_factory = psycopg2.extras.DictCursor
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (8) RETURNING v")
        seen.append((type(cur).__mro__[-3].__name__, dict(cur.fetchone())))
        conn.commit()
        conn.cursor_factory = None

        def make(*args, **kwargs):
            return psycopg2.extensions.cursor(*args, **kwargs)

        cur = conn.cursor(cursor_factory=make)  # a function: psycopg2's own mode for good
        cur.execute(f"INSERT INTO {table} VALUES (9)")
        seen.append(flags(conn))
        conn.rollback()
        cur.execute(f"INSERT INTO {table} VALUES (10)")
        seen.append(flags(conn))
        conn.commit()

    def named_cursors(conn, table, seen):
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (11)")
        named = conn.cursor("inside")
        named.execute("SELECT generate_series(1, 3)")
        seen.append((named.fetchall(), flags(conn)))
        conn.commit()
        seen.append(flags(conn))
        named = conn.cursor("first", withhold=True)
        named.execute("SELECT generate_series(1, 2)")
        conn.commit()
        seen.append((named.fetchall(), flags(conn)))
        named.close()
        cur.execute(f"INSERT INTO {table} VALUES (12)")  # a cursor made before: BEGIN again
        conn.rollback()
        seen.append(flags(conn))

    def a_cursor_made_in_autocommit(conn, table, seen):
        conn.autocommit = True
        cur = conn.cursor()
        conn.autocommit = False
        cur.execute(f"INSERT INTO {table} VALUES (13)")
        seen.append(flags(conn))
        conn.rollback()  # not committed: the cursor's statement was in a transaction

    def many_and_procedures(conn, table, seen):
        cur = conn.cursor()
        cur.executemany(f"INSERT INTO {table} VALUES (%s)", [])
        seen.append(flags(conn))
        cur.executemany(f"INSERT INTO {table} VALUES (%s)", ((v,) for v in (14, 15)))
        seen.append((cur.rowcount, flags(conn)))
        conn.rollback()
        cur.callproc("pg_backend_pid")
        seen.append(flags(conn))
        conn.rollback()
        psycopg2.extras.execute_values(cur, f"INSERT INTO {table} VALUES %s", [(16,), (17,)])
        seen.append(flags(conn))
        conn.commit()

    def with_blocks(conn, table, seen):
        with conn, conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (18)")
            seen.append(flags(conn))
        seen.append(flags(conn))
        try:
            with conn, conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (19)")
                raise ZeroDivisionError
        except ZeroDivisionError:
            seen.append(flags(conn))
        conn.autocommit = True
        with conn, conn.cursor() as cur:  # psycopg2 2.9: a transaction even in autocommit
            cur.execute(f"INSERT INTO {table} VALUES (20)")
            seen.append(flags(conn))
        conn.autocommit = False
        with pytest.raises(psycopg2.ProgrammingError), conn, conn:
            pass

    def reset_and_encoding(conn, table, seen):
        conn.set_session(readonly=True)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        conn.reset()
        seen.append(flags(conn))
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (21)")
        conn.set_client_encoding("UTF8")  # the same: nothing sent, the transaction kept
        seen.append(flags(conn))
        conn.set_client_encoding("LATIN1")  # another: psycopg2 rolls back first
        seen.append((conn.encoding, flags(conn)))
        conn.set_client_encoding("UTF8")
        cur.execute(f"INSERT INTO {table} VALUES (22)")
        seen.append(conn.tpc_recover())
        seen.append(flags(conn))
        conn.commit()
        seen.append(conn.tpc_recover())
        seen.append(flags(conn))

    def two_phase_and_large_objects(conn, table, seen):
        conn.tpc_begin(conn.xid(1, "dropsafe", "b"))
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (23)")
        seen.append(flags(conn))
        conn.tpc_rollback()
        seen.append(flags(conn))
        lob = conn.lobject(0, "wb")
        lob.write(b"x")
        seen.append(flags(conn))
        conn.rollback()
        cur.execute(f"INSERT INTO {table} VALUES (24)")
        conn.commit()
        seen.append(flags(conn))

    return {
        name: scenario
        for name, scenario in locals().items()
        if callable(scenario) and not name.startswith("_")
    }


SCENARIOS = _scenarios()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_connection_reads_as_psycopg2s(shared_server, scenario) -> None:
    """The same values, errors, flags and committed rows, with the class and without."""
    conninfo = dsn(shared_server)
    outcomes = []
    for factory in (None, connection_class()):
        table = f"ff2_dbapi_{scenario}"
        shared_server.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)")
        conn = psycopg2.connect(conninfo, connection_factory=factory)
        try:
            seen: list[object] = [flags(conn)]
            SCENARIOS[scenario](conn, table, seen)
            seen.append(flags(conn))
        finally:
            conn.close()
        rows = sorted(shared_server.execute(f"SELECT v FROM {table}"))
        shared_server.execute(f"DROP TABLE {table}")
        outcomes.append((seen, rows))
    assert outcomes[0] == outcomes[1]


def test_the_begin_is_psycopg2s() -> None:
    """The BEGIN text for each characteristic as psycopg2's ``pq_begin_locked`` builds it."""
    assert begin_text((None, None, None)) == "BEGIN"
    assert begin_text((3, True, True)) == "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
    assert begin_text((4, False, False)) == (
        "BEGIN ISOLATION LEVEL READ UNCOMMITTED READ WRITE NOT DEFERRABLE"
    )
    assert begin_text((1, None, None)) == "BEGIN ISOLATION LEVEL READ COMMITTED"


def test_a_refused_begin_is_the_error_and_the_statement_does_not_run(shared_server) -> None:
    """The server refuses BEGIN (as a standby refuses READ WRITE): its error, nothing run.

    ``_dropsafe_begin`` is where the class keeps the BEGIN it builds from the connection's
    characteristics; a bogus one is one the server refuses.
    """
    conn = psycopg2.connect(dsn(shared_server), connection_factory=connection_class())
    try:
        conn._dropsafe_begin = "BEGIN ISOLATION LEVEL BOGUS"
        cur = conn.cursor()
        with pytest.raises(psycopg2.errors.SyntaxError, match="BOGUS"):
            cur.execute("SELECT set_config('application_name', 'the statement ran', false)")
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        conn._dropsafe_begin = "BEGIN"
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0] != "the statement ran"
    finally:
        conn.close()
