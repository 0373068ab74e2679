"""Attacks on the plain COMMIT resolved by the xid read in flight (issue 27 item 3).

Each test tries one way to make the resolution lie: a write done twice, a write acknowledged
and missing, a NOTIFY heard twice, or a result, rowcount or error the app sees changed by the
read. Real servers, real faults (the kernel drops the COMMIT's packets; a crash restart with the
WAL writer slowed so that an unflushed commit record is lost). A test marked ``xfail(strict)``
is a break found and not fixed; its reason says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from xid_faults import client_port, lost_at_commit, wait_committed

import dropsafe
from dropsafe._drivers import driver_named, driver_names
from dropsafe.events import CommitResolved, TransactionReplayed
from dropsafe.testing import PostgresServer, kernel_blackhole, kernel_blackhole_unavailable
from dropsafe.testing._runtime import wait_until

pytestmark = pytest.mark.fault

READS = [
    name
    for name in driver_names(sync=True, replays=True)
    if driver_named(name).capabilities.reads_xid_in_flight
]
NO_BLACKHOLE = kernel_blackhole_unavailable()
needs_blackhole = pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
SCHEMA = """
CREATE TABLE attack (v int NOT NULL);
CREATE TABLE attack_unique (v int NOT NULL UNIQUE);
CREATE TABLE attack_relaxing (v int NOT NULL);
CREATE FUNCTION attack_relax() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM set_config('synchronous_commit', 'off', true);
  PERFORM pg_notify('dropsafe_attack', 'relaxed');
  RETURN NEW;
END $$;
CREATE TRIGGER attack_relax AFTER INSERT ON attack_relaxing
  FOR EACH ROW EXECUTE FUNCTION attack_relax();
CREATE TABLE attack_noted (note text NOT NULL);
CREATE FUNCTION attack_note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  RAISE NOTICE '%', NEW.note;
  RETURN NEW;
END $$;
CREATE TRIGGER attack_note AFTER INSERT ON attack_noted
  FOR EACH ROW EXECUTE FUNCTION attack_note();
CREATE TABLE attack_slow (v int NOT NULL UNIQUE);
CREATE FUNCTION attack_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_sleep(1);
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER attack_slow AFTER INSERT ON attack_slow
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION attack_slow();
CREATE VIEW attack_view AS SELECT v FROM attack;
CREATE FUNCTION attack_instead() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_notify('dropsafe_attack', 'instead');
  RETURN NEW;
END $$;
CREATE TRIGGER attack_instead INSTEAD OF INSERT ON attack_view
  FOR EACH ROW EXECUTE FUNCTION attack_instead();
"""
CHANNEL = "dropsafe_attack"


@pytest.fixture(scope="module")
def server():
    with PostgresServer(name="xid-attacks") as server:
        server.execute(SCHEMA)
        yield server


@pytest.fixture
def crashable():
    """A server of the test's own, its WAL kept in memory 10 s: a crash loses what was unflushed."""
    with PostgresServer(name="xid-attacks-crash", settings={"wal_writer_delay": "10s"}) as server:
        server.execute(SCHEMA)
        yield server


@pytest.fixture(autouse=True)
def _empty(server):
    # A test's COMMIT lost into a blackhole may leave its backend in its transaction, holding
    # locks, until the server notices: ended first (waited for), so that TRUNCATE never waits.
    server.terminate_backends()
    server.execute("TRUNCATE attack, attack_unique")


def _engine(server, driver, events, *, reads=True, pool_timeout=30.0, **pool):
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
        pool=dropsafe.PoolPolicy(replay_transaction=reads, **pool),
        unit=dropsafe.UnitPolicy(commit_status_timeout=30),
        hooks=(events.append,),
    )
    return dropsafe.create_engine(
        server.url(driver), policy=policy, pool_size=1, max_overflow=0, pool_timeout=pool_timeout
    )


def _count(server, table="attack", where="true") -> int:
    return int(server.execute(f"SELECT count(*) FROM {table} WHERE {where}")[0][0])


def _resolved(events):
    return [e.outcome for e in events if isinstance(e, CommitResolved)]


def _replays(events):
    return [e.outcome for e in events if isinstance(e, TransactionReplayed)]


def _commit(conn) -> str:
    """Commit ``conn``: "returned", "unknown" (CommitOutcomeUnknown), or the driver error's."""
    try:
        conn.commit()
    except dropsafe.CommitOutcomeUnknown:
        return "unknown"
    except sa.exc.DBAPIError as error:
        return type(error.orig).__name__
    return "returned"


def _libpq(server) -> str:
    return server.url("psycopg2").replace("postgresql+psycopg2", "postgresql")


class _Listener:
    """A LISTEN on its own connection: the notifications heard on ``CHANNEL``."""

    def __init__(self, server) -> None:
        self.conn = psycopg2.connect(_libpq(server))
        self.conn.autocommit = True
        self.conn.cursor().execute(f"LISTEN {CHANNEL}")
        self.heard: list[str] = []

    def hear(self, timeout: float) -> list[str]:
        """Wait at most ``timeout`` for one more notification; return all heard."""
        if select.select([self.conn], [], [], timeout)[0]:
            self.conn.poll()
            self.heard += [n.payload for n in self.conn.notifies]
            self.conn.notifies.clear()
        return self.heard

    def close(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self.conn.close()


def _crash_once_committed(server, engine, listener):
    """Once the COMMIT is done on the server (its reply dropped), the listener heard it: crash
    the server (a backend SIGKILLed, every backend reset; the WAL not yet flushed is lost)."""
    bystander = psycopg2.connect(_libpq(server))
    crashed = threading.Event()

    def at_commit(conn):
        pid = conn.connection.dbapi_connection.info.backend_pid

        def crash():
            try:
                wait_committed(server, pid)
                listener.hear(5)  # delivered at the COMMIT, before the crash
            finally:
                os.kill(bystander.get_backend_pid(), signal.SIGKILL)
                crashed.set()

        threading.Thread(target=crash, daemon=True).start()

    sa.event.listen(engine, "commit", at_commit)
    return crashed, bystander


def _commit_lost_then_crash(server, driver, statements):
    """Run ``statements`` in a plain transaction whose COMMIT reply is lost, then crash the
    server once the COMMIT is done. Returns (the app's outcome, resolutions, replays, heard)."""
    events: list[object] = []
    listener = _Listener(server)
    engine = _engine(server, driver, events)
    crashed, bystander = _crash_once_committed(server, engine, listener)
    try:
        with engine.connect() as conn, lost_at_commit(engine, "to"):
            for statement in statements:
                conn.execute(sa.text(statement))
            outcome = _commit(conn)
        assert crashed.wait(30)
    finally:
        engine.dispose()
        listener.close()
        with contextlib.suppress(psycopg2.Error):
            bystander.close()
    return outcome, _resolved(events), _replays(events), listener.heard


# -- a NOTIFY heard twice: a COMMIT that waited for no flush, lost to a crash ------------------


@needs_blackhole
@pytest.mark.slow
def test_a_with_that_writes_nothing_and_notifies_is_not_replayed_after_a_crash(crashable):
    """psycopg2's read gives the xid before the statement; a WITH that writes nothing returns
    rows (its rowcount), so its COMMIT was taken as flushed: a crash lost its commit record,
    the xid read aborted, and the transaction (its NOTIFY) was replayed. Before the fix:
    ('returned', ['aborted'], ['replayed']), the notification heard before the crash."""
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable,
        "psycopg2",
        [
            "WITH n AS (SELECT pg_notify('" + CHANNEL + "', 'with')) SELECT 1 FROM n",
        ],
    )
    assert heard == ["with"]  # heard once, before the crash
    # Never sent again: the COMMIT may have been delivered (it was): unknown.
    assert (outcome, resolved, replays) == ("unknown", ["unknown"], [])


@needs_blackhole
@pytest.mark.slow
@pytest.mark.parametrize("driver", READS)
def test_synchronous_commit_off_in_a_trigger_after_the_read_is_not_replayed(crashable, driver):
    """A trigger turns synchronous_commit off after the read (no statement names it), and
    notifies: a crash lost its commit record after the NOTIFY was delivered. Before the fix:
    the xid read aborted, and the replay notified again (both drivers). The database's code
    may notify or turn synchronous_commit off: after a crash, unknown."""
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable,
        driver,
        ["INSERT INTO attack VALUES (1)", "INSERT INTO attack_relaxing VALUES (1)"],
    )
    assert heard == ["relaxed"]
    assert (outcome, resolved, replays) == ("unknown", ["unknown"], [])


@needs_blackhole
@pytest.mark.slow
def test_an_insert_into_a_view_that_only_notifies_is_not_replayed_after_a_crash(crashable):
    """psycopg2's read assigns the xid before the statement; an INSERT into a view whose
    INSTEAD OF trigger only notifies counts a row but writes no WAL: its COMMIT flushed
    nothing, a crash lost it. Before the fix: the xid read aborted, and the replay notified
    again. The database's code may notify: after a crash, unknown."""
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable, "psycopg2", ["INSERT INTO attack_view VALUES (1)"]
    )
    assert heard == ["instead"]
    assert (outcome, resolved, replays) == ("unknown", ["unknown"], [])


@pytest.fixture
def crashable_plain():
    """``crashable`` with one table and no code of its own."""
    with PostgresServer(name="xid-attacks-plain", settings={"wal_writer_delay": "10s"}) as server:
        server.execute("CREATE TABLE attack (v int NOT NULL)")
        yield server


@needs_blackhole
@pytest.mark.slow
@pytest.mark.parametrize("driver", READS)
def test_synchronous_commit_off_by_a_reload_after_the_read_is_not_replayed(crashable_plain, driver):
    """``ALTER SYSTEM SET synchronous_commit = off`` reloaded while the transaction runs: its
    backend applies it before its next statement, which names nothing. The COMMIT then waits
    for no flush, its NOTIFY is heard, a crash loses it. Before the fix: read aborted, replayed,
    heard twice. The resolver's session sees the server's setting: off, after a crash, unknown."""
    crashable_plain.execute("ALTER SYSTEM SET synchronous_commit = off")
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable_plain,
        driver,
        [
            "INSERT INTO attack VALUES (1)",
            "SELECT pg_reload_conf()",
            "SELECT pg_notify('" + CHANNEL + "', 'reloaded')",
        ],
    )
    assert heard == ["reloaded"]
    assert (outcome, resolved, replays) == ("unknown", ["unknown"], [])


# The only code of each database that notifies, where no body says NOTIFY: contrib's tcn
# trigger (a C function named triggered_change_notification), and a NOTIFY built at run time.
ANNOUNCERS = {
    "tcn": "CREATE EXTENSION tcn; "
    "CREATE TRIGGER attack_announce AFTER INSERT ON attack_announced FOR EACH ROW "
    f"EXECUTE FUNCTION triggered_change_notification('{CHANNEL}')",
    "dynamic": "CREATE FUNCTION attack_announce() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"EXECUTE 'NOT' || 'IFY {CHANNEL}'; RETURN NEW; END $$; "
    "CREATE TRIGGER attack_announce AFTER INSERT ON attack_announced FOR EACH ROW "
    "EXECUTE FUNCTION attack_announce()",
}


@pytest.fixture(params=sorted(ANNOUNCERS))
def crashable_announcing(request):
    """``crashable`` with an unlogged table whose INSERTs one of ``ANNOUNCERS`` announces."""
    settings = {"wal_writer_delay": "10s"}
    with PostgresServer(name="xid-attacks-announce", settings=settings) as server:
        server.execute(
            "CREATE UNLOGGED TABLE attack_announced (v int PRIMARY KEY); "
            + ANNOUNCERS[request.param]
        )
        yield server


@needs_blackhole
@pytest.mark.slow
@pytest.mark.parametrize("driver", READS)
def test_an_unlogged_write_announced_is_not_replayed_after_a_crash(crashable_announcing, driver):
    """An INSERT into an unlogged table writes no WAL: its COMMIT waited for no flush, and a
    trigger notified. A crash lost the commit after the notification was heard: unknown, never
    replayed. Before: replayed, on both drivers, with tcn (the question looked for 'notify',
    and tcn's body is a C symbol, ``triggered_change_notification``); the NOTIFY built at run
    time is caught by its EXECUTE."""
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable_announcing, driver, ["INSERT INTO attack_announced VALUES (1)"]
    )
    assert len(heard) == 1
    assert (outcome, resolved, replays) == ("unknown", ["unknown"], [])


@needs_blackhole
@pytest.mark.slow
@pytest.mark.parametrize("driver", READS)
def test_an_update_of_no_row_that_notifies_is_not_replayed_after_a_crash(crashable, driver):
    """The brief's case: a 0-row UPDATE (psycopg2's read assigns the xid, no WAL), a NOTIFY."""
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable,
        driver,
        [
            "UPDATE attack SET v = 0 WHERE false",
            "SELECT pg_notify('" + CHANNEL + "', 'nothing')",
        ],
    )
    assert heard == ["nothing"]
    assert replays == []
    # psycopg 3 reads no xid here (none assigned yet): the driver's error, as before.
    assert outcome in {"unknown", "OperationalError"}
    assert resolved == (["unknown"] if outcome == "unknown" else [])


# -- savepoints, hooks and failed statements after the read ------------------------------------


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("direction", ["to", "both"])
def test_a_write_in_a_rolled_back_savepoint(server, driver, direction, disposing):
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn, lost_at_commit(engine, direction):
        savepoint = conn.begin_nested()
        conn.execute(sa.text("INSERT INTO attack_unique VALUES (1)"))
        savepoint.rollback()
        conn.execute(sa.text("INSERT INTO attack_unique VALUES (2)"))
        outcome = _commit(conn)
    rows = [int(r[0]) for r in server.execute("SELECT v FROM attack_unique ORDER BY v")]
    # Done: it returns, the transaction's row alone. Never done: proven aborted, and a
    # transcript with a savepoint is not replayed: the driver's error, nothing written.
    assert (outcome, rows, _resolved(events)) == (
        ("returned", [2], ["committed"])
        if direction == "to"
        else ("OperationalError", [], ["aborted"])
    )


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("direction", ["to", "both"])
def test_a_failed_statement_in_a_savepoint_after_the_read(server, driver, direction, disposing):
    """A unique violation after the read (caught in a savepoint), more work, COMMIT lost."""
    server.execute("INSERT INTO attack_unique VALUES (5)")
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn, lost_at_commit(engine, direction):
        conn.execute(sa.text("INSERT INTO attack VALUES (1)"))
        savepoint = conn.begin_nested()
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("INSERT INTO attack_unique VALUES (5)"))
        savepoint.rollback()
        conn.execute(sa.text("INSERT INTO attack VALUES (2)"))
        outcome = _commit(conn)
    count = _count(server)
    if outcome == "returned":
        assert count == 2
    else:  # aborted and not replayable (a statement failed): the original error, nothing kept
        assert count in {0, 2}
        assert (direction, count) == ("both", 0), (outcome, _resolved(events))
    assert _count(server, "attack_unique") == 1


class _Base(orm.DeclarativeBase):
    pass


class _Attack(_Base):
    __tablename__ = "attack"
    __mapper_args__ = {"primary_key": ["v"]}  # noqa: RUF012 - SQLAlchemy's mapping
    v: orm.Mapped[int] = orm.mapped_column(primary_key=True)


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("direction", ["to", "both"])
def test_a_before_commit_hook_that_writes_after_the_read(server, driver, direction, disposing):
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    session = orm.Session(engine)

    def also(sess):
        sess.execute(sa.text("INSERT INTO attack VALUES (100)"))

    sa.event.listen(session, "before_commit", also)
    with session, lost_at_commit(engine, direction):
        session.add(_Attack(v=1))
        session.flush()
        session.execute(sa.text("UPDATE attack SET v = v + 1 WHERE v = 1"))
        session.commit()
    assert sorted(int(r[0]) for r in server.execute("SELECT v FROM attack")) == [2, 100]
    assert _resolved(events) == (["committed"] if direction == "to" else ["aborted"])


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
def test_the_app_s_own_client_min_messages_warning(server, driver, disposing):
    """The app hides notices: psycopg2's NOTICE is not sent, nothing read; never resolved wrong."""
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn, lost_at_commit(engine, "to"):
        conn.execute(sa.text("SET client_min_messages = warning"))
        conn.execute(sa.text("INSERT INTO attack VALUES (1)"))
        outcome = _commit(conn)
    assert _count(server) == 1
    assert (outcome, _resolved(events)) in [("returned", ["committed"]), ("OperationalError", [])]


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("isolation", ["SERIALIZABLE", "REPEATABLE READ"])
def test_an_isolation_level_s_commit_that_never_arrived(server, driver, isolation, disposing):
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    with (
        engine.connect().execution_options(isolation_level=isolation) as conn,
        lost_at_commit(engine, "both"),
    ):
        conn.execute(sa.text("INSERT INTO attack_unique VALUES (3)"))
        conn.execute(sa.text("SELECT count(*) FROM attack")).scalar()
        conn.commit()
    assert _count(server, "attack_unique") == 1
    assert _resolved(events) == ["aborted"]
    assert _replays(events) == ["replayed"]


# -- what the app sees: texts the read rides with ------------------------------------------


def _seen(engine, statements, *, nested=True):
    """What each statement gives the app (rows or rowcount, or its error), rolled back."""
    seen = []
    with engine.connect() as conn:
        for statement, params in statements:
            try:
                with conn.begin_nested() if nested else contextlib.nullcontext():
                    result = conn.execute(sa.text(statement), params)
                    seen.append(result.all() if result.returns_rows else result.rowcount)
            except sa.exc.DBAPIError as error:
                orig = error.orig
                diag = getattr(orig, "diag", None)
                seen.append(
                    (
                        type(orig).__name__,
                        str(orig),
                        getattr(diag, "statement_position", None),
                    )
                )
        conn.rollback()
    return seen


TEXTS = [
    ("INSERT INTO attack VALUES (length('50%')) RETURNING v", {}),
    ("INSERT INTO attack VALUES (length('50%') + :n) RETURNING v", {"n": 1}),
    ("/* a comment */ INSERT INTO attack VALUES (7) RETURNING v", {}),
    ("-- a line comment\nINSERT INTO attack VALUES (8) RETURNING v", {}),
    ("INSERT INTO attack VALUES (length($$a'b$dropsafe$$$)) RETURNING v", {}),
    ("INSERT INTO attack VALUES (9); SELECT v FROM attack ORDER BY v", {}),
    ("WITH w AS (INSERT INTO attack VALUES (11) RETURNING v) SELECT v * 2 FROM w", {}),
    ("UPDATE attack SET v = v WHERE v > :n", {"n": 0}),
]
ERRORS = [
    "INSERT INTO attack VALUES (nope)",
    "INSERT INTO attack VALUES (1/0)",
    "UPDATE attack SET v = 'x'",
]


@pytest.mark.parametrize("driver", READS)
def test_texts_the_read_rides_with_give_the_same_results(server, driver, disposing):
    with_read = _seen(disposing(_engine(server, driver, [])), TEXTS)
    without = _seen(disposing(_engine(server, driver, [], reads=False)), TEXTS)
    assert with_read == without


@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("statement", ERRORS)
def test_errors_are_the_same_with_the_read(server, driver, statement, disposing, request):
    if driver == "psycopg2" and statement != ERRORS[1]:
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="psycopg2's read is a line of its own in the same query string: an error "
                "with a position says 'LINE 2:' instead of 'LINE 1:' in its text, and its "
                "diag.statement_position counts the DO block's characters",
            )
        )
    # Each statement as the first of its transaction (the read rides the first write).
    with_read = _seen(disposing(_engine(server, driver, [])), [(statement, {})], nested=False)
    without = _seen(
        disposing(_engine(server, driver, [], reads=False)), [(statement, {})], nested=False
    )
    assert with_read == without


# -- the read's answer forged by the app's own data (psycopg2's NOTICE) -----------------------


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
def test_a_notice_of_the_app_s_data_cannot_forge_the_xid(server, driver, disposing):
    """A trigger echoes a row's text as a NOTICE (an audit log); the row's text, a user's,
    looks like the read's NOTICE and names an old committed xid. The COMMIT never arrives.
    Before the fix (psycopg2): the forged xid was believed, 'committed', and commit() returned
    with the row missing."""
    old = int(server.execute("SELECT txid_current()")[0][0])  # committed, long done
    forged = f'dropsafe-xid ["{old}", "on"]'  # each test's own: no TRUNCATE (a fenced lock)
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn, lost_at_commit(engine, "both"):
        conn.execute(sa.text("INSERT INTO attack_noted VALUES (:note)"), {"note": forged})
        outcome = _commit(conn)
    kept = _count(server, "attack_noted", f"note = '{forged}'")
    assert (outcome, kept) in [("returned", 1), ("OperationalError", 0)], _resolved(events)
    assert all(e.xid != old for e in events if isinstance(e, CommitResolved))


# -- the COMMIT lost again, and after a replay -------------------------------------------------


@needs_blackhole
@pytest.mark.slow
@pytest.mark.parametrize("driver", READS)
def test_the_replay_s_own_commit_lost_too(server, driver, disposing):
    """The COMMIT never arrives (aborted: replayed on a fresh connection), and the replay's
    COMMIT (a 1 s deferred trigger) has its reply lost too: never a write twice, never
    acknowledged and missing; the app is told the outcome is unknown."""
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    value = 31 if driver == "psycopg2" else 32
    with contextlib.ExitStack() as holes:
        cut_fresh = threading.Event()

        def cut_the_replay_s_commit(original_pid):
            def running():
                return server.execute(
                    "SELECT client_port FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' "
                    f"AND state = 'active' AND pid <> {original_pid}"
                )

            wait_until(lambda: bool(running()), timeout=20, what="the replay's COMMIT")
            port = int(running()[0][0])
            holes.enter_context(kernel_blackhole(port, direction="to"))
            cut_fresh.set()

        def cut(conn):
            pid = conn.connection.dbapi_connection.info.backend_pid
            holes.enter_context(kernel_blackhole(client_port(conn), direction="both"))
            threading.Thread(target=cut_the_replay_s_commit, args=(pid,), daemon=True).start()

        sa.event.listen(engine, "commit", cut)
        with engine.connect() as conn:
            conn.execute(sa.text(f"INSERT INTO attack_slow VALUES ({value})"))
            outcome = _commit(conn)
        assert cut_fresh.is_set()
    kept = _count(server, "attack_slow", f"v = {value}")
    assert kept == 1  # the replay's COMMIT was done
    assert _resolved(events) == ["aborted"]
    # The replay's lost COMMIT is not resolved (it reads no xid): unknown. Before the fix: the
    # driver's OperationalError, though the write is there (the app would write it again).
    assert outcome == "unknown"


# -- a replay before the COMMIT, then the COMMIT lost --------------------------------------


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("direction", ["to", "both"])
def test_a_transaction_replayed_midway_then_its_commit_lost(server, driver, direction, disposing):
    """The read's xid belongs to the lost connection's transaction: after a replay midway it
    must not be the one asked about; the next write reads the fresh transaction's."""
    events: list[object] = []
    engine = disposing(_engine(server, driver, events, pool_timeout=0.2))
    base = 40 if driver == "psycopg2" else 50
    with engine.connect() as conn:
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({base + 1})"))
        pid = conn.connection.dbapi_connection.info.backend_pid
        server.execute(f"SELECT pg_terminate_backend({pid})")
        wait_until(
            lambda: not server.execute(f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"),
            timeout=10,
            what="the backend gone",
        )
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({base + 2})"))  # replayed
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({base + 3})"))  # reads again
        with lost_at_commit(engine, direction):
            conn.commit()
    rows = [int(r[0]) for r in server.execute("SELECT v FROM attack_unique ORDER BY v")]
    assert rows == [base + 1, base + 2, base + 3]
    assert _resolved(events) == (["committed"] if direction == "to" else ["aborted"])
    assert _replays(events) == (["replayed"] if direction == "to" else ["replayed", "replayed"])
    assert all(e.xid for e in events if isinstance(e, CommitResolved))


# -- psycopg 3's async face ----------------------------------------------------------------


def _async_port(conn) -> int:
    fd = conn.connection.dbapi_connection.driver_connection.fileno()
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


@needs_blackhole
@pytest.mark.parametrize("direction", ["to", "both"])
async def test_async_psycopg_a_savepoint_and_a_hook_then_the_commit_lost(
    server, direction, disposing_async
):
    events: list[object] = []
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
        pool=dropsafe.PoolPolicy(replay_transaction=True),
        unit=dropsafe.UnitPolicy(commit_status_timeout=30),
        hooks=(events.append,),
    )
    engine = disposing_async(
        dropsafe.create_async_engine(
            server.url("psycopg"), policy=policy, pool_size=1, max_overflow=0
        )
    )
    holes = contextlib.ExitStack()

    def cut(conn):
        if not holes._exit_callbacks:
            holes.enter_context(kernel_blackhole(_async_port(conn), direction=direction))

    sa.event.listen(engine.sync_engine, "commit", cut)
    value = 60 if direction == "to" else 70
    with holes:
        async with engine.connect() as conn:
            await conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({value})"))
            await conn.execute(sa.text("SELECT count(*) FROM attack"))
            await conn.execute(sa.text(f"UPDATE attack_unique SET v = v + 1 WHERE v = {value}"))
            await conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({value + 5})"))
            await conn.commit()
    rows = [int(r[0]) for r in server.execute("SELECT v FROM attack_unique ORDER BY v")]
    assert rows == [value + 1, value + 5]
    assert _resolved(events) == (["committed"] if direction == "to" else ["aborted"])


# -- psycopg2: the app's own notices container ---------------------------------------------


class _Notices(list):
    """An app's own notices list (psycopg2 takes any appendable; SQLAlchemy slices it)."""


def _notices_kept(engine, caplog):
    """The notices the app's own list kept, and the ones SQLAlchemy logged from it."""
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="sqlalchemy.dialects.postgresql"),
        engine.connect() as conn,
    ):
        dbapi = conn.connection.dbapi_connection
        dbapi.notices = _Notices()
        conn.execute(sa.text("INSERT INTO attack VALUES (1)"))
        kept = list(dbapi.notices)
        conn.rollback()
        dbapi.notices = []
    return kept, [r.getMessage() for r in caplog.records if "NOTICE" in r.getMessage()]


def test_psycopg2_an_app_s_own_notices_container_gets_no_notice_of_the_read(
    server, disposing, caplog
):
    """Before the fix: the read sent its NOTICE, then found the container not a list and left
    the NOTICE there, for SQLAlchemy to log as the app's ('NOTICE:  dropsafe-xid ...')."""
    with_read = _notices_kept(disposing(_engine(server, "psycopg2", [])), caplog)
    without = _notices_kept(disposing(_engine(server, "psycopg2", [], reads=False)), caplog)
    assert with_read == without == ([], [])


# -- AUTOCOMMIT and read-only transactions -------------------------------------------------


def _autocommit_and_read_only(engine):
    seen = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        seen.append(conn.execute(sa.text("INSERT INTO attack VALUES (81) RETURNING v")).all())
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("INSERT INTO attack_unique VALUES (1/0)"))
        seen.append(str(raised.value.orig).splitlines()[0])
    with engine.connect().execution_options(postgresql_readonly=True) as conn:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("INSERT INTO attack VALUES (82)"))
        seen.append((type(raised.value.orig).__name__, str(raised.value.orig).splitlines()[0]))
        conn.rollback()
    return seen


@pytest.mark.parametrize("driver", READS)
def test_autocommit_and_read_only_see_the_same(server, driver, disposing):
    with_read = _autocommit_and_read_only(disposing(_engine(server, driver, [])))
    assert _count(server, where="v = 81") == 1  # AUTOCOMMIT: written once, kept
    without = _autocommit_and_read_only(disposing(_engine(server, driver, [], reads=False)))
    assert with_read == without
    assert _count(server, where="v = 81") == 2


# -- the ORM's batched INSERT (insertmanyvalues) -------------------------------------------


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("direction", ["to", "both"])
def test_an_orm_batch_insert_then_the_commit_lost(server, driver, direction, disposing):
    """Several objects flushed at once: SQLAlchemy's insertmanyvalues (each batch one
    ``execute`` on psycopg2). Before: not read, so never resolved (the driver's error); now
    its first batch reads: committed returns; aborted raises (a batch is not replayed),
    nothing written."""
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    base = {"psycopg2": 100, "psycopg": 200}[driver] + (0 if direction == "to" else 50)
    with orm.Session(engine) as session, lost_at_commit(engine, direction):
        session.add_all([_Attack(v=base + i) for i in range(3)])
        session.flush()
        outcome = _commit(session)
    kept = _count(server, where=f"v BETWEEN {base} AND {base + 2}")
    expected = (
        ("returned", 3, ["committed"])
        if direction == "to"
        else ("OperationalError", 0, ["aborted"])
    )
    if driver == "psycopg":  # SQLAlchemy sends it by psycopg's executemany: not read, as before
        expected = ("OperationalError", 3 if direction == "to" else 0, [])
    assert (outcome, kept, _resolved(events)) == expected


# -- the app's own functions on its search_path --------------------------------------------

SHADOW = """
CREATE SCHEMA IF NOT EXISTS attack_shadow;
CREATE OR REPLACE FUNCTION attack_shadow.current_setting(text) RETURNS text LANGUAGE sql
  AS $$ SELECT 'the app''s own current_setting' $$;
"""


@pytest.mark.parametrize("driver", READS)
def test_an_app_function_named_like_the_read_s_changes_nothing(server, driver, disposing):
    """The app's schema before pg_catalog on its search_path, with a function of the name the
    read calls: the read must call PostgreSQL's, and change nothing the app sees."""
    server.execute(SHADOW)

    def seen(engine):
        with engine.connect() as conn:
            conn.execute(sa.text("SET LOCAL search_path = attack_shadow, pg_catalog, public"))
            rows = conn.execute(sa.text("INSERT INTO attack VALUES (91) RETURNING v")).all()
            conn.rollback()
        return rows

    assert seen(disposing(_engine(server, driver, []))) == seen(
        disposing(_engine(server, driver, [], reads=False))
    )


# -- transaction control sent as a statement -----------------------------------------------


#: psycopg2 with its own BEGIN (``begin_in_first_flight=False``), beside the default: the
#: connection class keeps psycopg2's status, so a write after the app's own COMMIT statement
#: lands where psycopg2's own lands (alone).
OWN_BEGIN = [pytest.param(False, id="first-flight"), pytest.param(True, id="own-begin")]


def _psycopg2_own_begin(driver, own_begin):
    """Whether psycopg2's own BEGIN runs (a psycopg 3 engine has no such variant: skipped)."""
    if own_begin and driver != "psycopg2":
        pytest.skip("psycopg2 only")
    return own_begin


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("own_begin", OWN_BEGIN)
@pytest.mark.parametrize(
    "ends", ["COMMIT", "INSERT INTO attack_unique VALUES ({a2}); COMMIT"], ids=["commit", "multi"]
)
def test_a_commit_sent_as_a_statement_then_more_writes_then_the_commit_lost(
    server, driver, own_begin, ends, disposing
):
    """The app ends the server's transaction itself (``text("COMMIT")``, or inside a text of
    several statements), writes more (the driver opens another server transaction, another
    xid), and the final COMMIT never arrives: the xid read belongs to the transaction already
    committed; the later writes were never committed and must not be acknowledged."""
    events: list[object] = []
    own = _psycopg2_own_begin(driver, own_begin)
    engine = disposing(_engine(server, driver, events, begin_in_first_flight=not own))
    a = {"psycopg2": 300, "psycopg": 400}[driver] + (0 if ends == "COMMIT" else 50) + 20 * own
    with engine.connect() as conn, lost_at_commit(engine, "both"):
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({a})"))
        try:
            conn.execute(sa.text(ends.format(a2=a + 1)))
        except sa.exc.DBAPIError:
            pytest.skip("the driver refuses several statements in one text")
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({a + 5})"))
        outcome = _commit(conn)
    later = _count(server, "attack_unique", f"v = {a + 5}")
    # Before the fix (psycopg 3, 2 of 2): ('returned', 0), resolved 'committed' by the xid of
    # the transaction the app's own COMMIT had ended. Now the later write reads its own
    # transaction's xid. psycopg 3 opened one (BEGIN): the COMMIT never arrived, aborted,
    # not replayed (transaction control in the text). psycopg2 sent no BEGIN (it believes its
    # transaction open), with its own BEGIN or with BEGIN in the first flight (its connection
    # class keeps psycopg2's status as psycopg2 keeps it): the write committed on its own, and
    # its xid says so. The dropped read (the transaction the app's COMMIT ended) is asked about
    # too since session 15: committed, so CommitOutcomeUnknown says the app committed part of
    # the work (the driver's error before, as if nothing had).
    assert not own or driver == "psycopg2"
    assert (outcome, later, _resolved(events)) == (
        ("returned", 1, ["committed"]) if driver == "psycopg2" else ("unknown", 0, ["aborted"])
    )


@needs_blackhole
@pytest.mark.parametrize("driver", READS)
@pytest.mark.parametrize("own_begin", OWN_BEGIN)
def test_a_commit_sent_around_sqlalchemy_then_more_writes_then_the_commit_lost(
    server, driver, own_begin, disposing
):
    """The app commits on the driver's connection itself, around SQLAlchemy (a raw cursor),
    then writes more through SQLAlchemy; the final COMMIT never arrives. Before the fix
    (psycopg 3): ('returned', 0), resolved 'committed' by the ended transaction's xid."""
    events: list[object] = []
    own = _psycopg2_own_begin(driver, own_begin)
    engine = disposing(_engine(server, driver, events, begin_in_first_flight=not own))
    a = {"psycopg2": 500, "psycopg": 600}[driver] + 20 * own
    with engine.connect() as conn, lost_at_commit(engine, "both"):
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({a})"))
        raw = conn.connection.dbapi_connection.cursor()
        raw.execute("COMMIT")
        raw.close()
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({a + 5})"))
        outcome = _commit(conn)
    later = _count(server, "attack_unique", f"v = {a + 5}")
    assert not own or driver == "psycopg2"
    assert (outcome, later, _resolved(events)) == (
        ("returned", 1, ["committed"])  # psycopg2 sent no BEGIN: the write committed alone
        if driver == "psycopg2"
        else ("unknown", 0, ["aborted"])  # the raw COMMIT's (dropped read) committed: said
    )


# -- a NOTIFY of the app's own after a write that wrote no WAL (no code of the database's) -------

# A view whose INSTEAD OF trigger writes only a value not there yet: the INSERT counts its row
# and writes nothing when the value is there. Its body neither notifies nor names
# synchronous_commit (the resolver's question about the database's code says no).
ONCE_VIEW = """
CREATE UNLOGGED TABLE attack_scratch (v int NOT NULL);
CREATE VIEW attack_once AS SELECT v FROM attack;
CREATE FUNCTION attack_once_put() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NOT EXISTS (SELECT FROM attack WHERE v = NEW.v) THEN
    INSERT INTO attack VALUES (NEW.v);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER attack_once_put INSTEAD OF INSERT ON attack_once
  FOR EACH ROW EXECUTE FUNCTION attack_once_put();
INSERT INTO attack VALUES (4);
SELECT count(*) FROM attack;
CHECKPOINT;
"""

_NOTIFY = "SELECT pg_notify('" + CHANNEL + "', 'app')"
NO_WAL_WRITES = {
    # The write takes its xid but writes no WAL: the COMMIT waits for no flush.
    "unlogged": ["INSERT INTO attack_scratch VALUES (1)", _NOTIFY],
    # The NOTIFY before the write that reads the xid.
    "notify_first": [_NOTIFY, "INSERT INTO attack_scratch VALUES (1)"],
    # psycopg2's read assigns the xid before a statement that then writes nothing (rowcount 1).
    "view_wrote_nothing": ["INSERT INTO attack_once VALUES (4)", _NOTIFY],
}


@needs_blackhole
@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(NO_WAL_WRITES))
@pytest.mark.parametrize("driver", READS)
def test_a_notify_after_a_write_of_no_wal_is_not_replayed_after_a_crash(
    crashable_plain, driver, shape
):
    """The app's own NOTIFY in a transaction whose writes wrote no WAL (an UNLOGGED table; a
    view's INSTEAD OF trigger that found its value there, the xid given by psycopg2's read):
    PostgreSQL's COMMIT then waits for no flush (RecordTransactionCommit: no WAL written, no
    flush), the NOTIFY is heard, a crash loses the commit record. Before the fix: the xid read
    'aborted' (synchronous_commit on, an xid, no code of the database's that notifies), the
    transaction was replayed and its NOTIFY heard twice. Now: unknown, never replayed."""
    crashable_plain.execute(ONCE_VIEW)
    outcome, resolved, replays, heard = _commit_lost_then_crash(
        crashable_plain, driver, NO_WAL_WRITES[shape]
    )
    assert heard == ["app"]
    if driver == "psycopg" and shape == "view_wrote_nothing":
        # psycopg 3 reads after the statement: no xid yet, nothing to resolve by: the
        # driver's error, never replayed.
        assert (outcome, resolved, replays) == ("OperationalError", [], [])
        return
    assert (outcome, resolved, replays) == ("unknown", ["unknown"], [])


# -- a role without USAGE on plpgsql: psycopg2's read is a DO block -----------------------------

TENANT = """
CREATE ROLE tenant NOLOGIN;
GRANT INSERT, SELECT ON attack TO tenant;
REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
"""


@pytest.mark.parametrize("where", ["transaction", "connect"])
def test_a_role_without_plpgsql_set_by_the_app_writes_as_before(crashable_plain, where):
    """``SET LOCAL ROLE tenant`` in the transaction (or ``SET ROLE`` in the app's own connect
    listener, which runs after dropsafe's learning), a role without USAGE on plpgsql, then an
    INSERT: psycopg2's read is a DO block in front of it. Before the fix the session's leave
    was learned for the user at connect, and the app's INSERT failed with 42501."""
    crashable_plain.execute(TENANT)
    events: list[object] = []
    engine = _engine(crashable_plain, "psycopg2", events)
    if where == "connect":

        @sa.event.listens_for(engine, "connect")
        def as_tenant(dbapi_connection, record):
            del record
            cursor = dbapi_connection.cursor()
            cursor.execute("SET ROLE tenant")
            cursor.close()
            dbapi_connection.commit()

    try:
        with engine.connect() as conn:
            if where == "transaction":
                conn.execute(sa.text("SET LOCAL ROLE tenant"))
            conn.execute(sa.text("INSERT INTO attack VALUES (1)"))
            assert conn.execute(sa.text("SELECT current_user")).scalar() == "tenant"
            conn.commit()
    finally:
        engine.dispose()
    assert _count(crashable_plain, where="v = 1") == 1


def test_a_role_without_plpgsql_made_after_connect_fails_one_transaction_at_most(crashable_plain):
    """The leave was learned at connect, when every role had USAGE on plpgsql; then a role
    without it is made and reached by ``SET LOCAL ROLE``. The DO block in front of the INSERT is
    refused (42501): that transaction fails, once; the connection's leave is taken back, and
    its next transaction writes as before (no read in flight: the COMMIT is plain). Before
    the fix every transaction on that connection failed with 42501."""
    events: list[object] = []
    engine = _engine(crashable_plain, "psycopg2", events)
    failures = []
    try:
        with engine.connect() as conn:  # the pool's one connection, learned now
            conn.execute(sa.text("INSERT INTO attack VALUES (1)"))
            conn.commit()
        crashable_plain.execute(TENANT)
        for value in (2, 3, 4):
            with engine.connect() as conn:
                conn.execute(sa.text("SET LOCAL ROLE tenant"))
                try:
                    conn.execute(sa.text(f"INSERT INTO attack VALUES ({value})"))
                except sa.exc.ProgrammingError as error:
                    failures.append(error.orig.pgcode)
                    conn.rollback()
                    continue
                conn.commit()
    finally:
        engine.dispose()
    assert failures == ["42501"]
    assert [_count(crashable_plain, where=f"v = {v}") for v in (1, 2, 3, 4)] == [1, 0, 1, 1]


@needs_blackhole
@pytest.mark.parametrize("then", ["nothing", "select"])
@pytest.mark.parametrize("driver", READS)
def test_a_raw_commit_and_a_raw_write_then_the_commit_lost(server, driver, then, disposing):
    """The app commits with the DBAPI connection's own commit() and writes through a raw
    cursor (a new server transaction, another xid), perhaps a SELECT through SQLAlchemy after,
    and the final COMMIT never arrives: the raw write was never committed. Before the fix
    (what the socket sent since the last statement through SQLAlchemy is counted: more, and
    the xid read is dropped) it was resolved 'committed' by the ended transaction's xid and
    returned, the raw write missing, both drivers."""
    events: list[object] = []
    engine = disposing(_engine(server, driver, events))
    a = {"psycopg2": 700, "psycopg": 800}[driver] + (0 if then == "nothing" else 50)
    with engine.connect() as conn, lost_at_commit(engine, "both"):
        conn.execute(sa.text(f"INSERT INTO attack_unique VALUES ({a})"))
        dbapi_connection = conn.connection.dbapi_connection
        dbapi_connection.commit()
        raw = dbapi_connection.cursor()
        raw.execute(f"INSERT INTO attack_unique VALUES ({a + 5})")
        raw.close()
        if then == "select":
            conn.execute(sa.text("SELECT 1"))
        outcome = _commit(conn)
    later = _count(server, "attack_unique", f"v = {a + 5}")
    assert (outcome, later, _resolved(events)) == ("OperationalError", 0, [])
