"""A plain transaction's lost COMMIT reply, resolved by the xid its first write read in flight.

Issue 27 item 3. Before, a COMMIT sent on a connection that looked alive and then lost failed
the request with the driver's error, whatever the server had done: these tests failed there
(the committed write raised; the aborted one was never done). Now the first statement that may
write reads the transaction's xid in its own flight (no round trip of its own: counted on the
wire below), and a lost COMMIT is resolved as a unit's is: committed returns, aborted is replayed
(verified) and committed on a fresh connection, unknown raises `CommitOutcomeUnknown`, and a
COMMIT the server refused raises its own error, never asked about. What the app receives must
not change: compared with the read off (rows, rowcount, errors, the app's own notices).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import psycopg2
import pytest
import sqlalchemy as sa
from xid_faults import client_port, lost_at_commit, wait_committed

import dropsafe
from dropsafe._bench._turns import TurnCounter
from dropsafe._drivers import driver_named, driver_names, tcp_bytes_sent
from dropsafe.events import CommitResolved, TransactionReplayed
from dropsafe.testing import (
    PostgresServer,
    ServerError,
    kernel_blackhole,
    kernel_blackhole_unavailable,
)
from dropsafe.testing._runtime import wait_until

pytestmark = pytest.mark.fault

READS = [
    name
    for name in driver_names(sync=True, replays=True)
    if driver_named(name).capabilities.reads_xid_in_flight
]
SCHEMA = """
CREATE TABLE lost_commit (v int NOT NULL);
CREATE TABLE lost_commit_unique (v int NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED);
CREATE FUNCTION lost_commit_notice() RETURNS int LANGUAGE plpgsql AS $$ BEGIN
  RAISE NOTICE 'the app''s own notice'; RETURN 1;
END $$;
"""
INSERT = sa.text("INSERT INTO lost_commit (v) VALUES (:v)")
NO_BLACKHOLE = kernel_blackhole_unavailable()


@pytest.fixture(scope="module")
def server():
    with PostgresServer(name="xid-in-flight") as server:
        server.execute(SCHEMA)
        yield server


@pytest.fixture(autouse=True)
def _empty(server):
    # A test's COMMIT lost into a blackhole may leave its backend in its transaction, holding
    # locks, until the server notices: ended first (waited for), so that TRUNCATE never waits.
    server.terminate_backends()
    server.execute("TRUNCATE lost_commit, lost_commit_unique")


def _engine(server, driver, events, *, reads=True, url=None, tcp_user_timeout=2, **pool):
    """A hardened engine, a pool of one; ``reads``: the transaction replay (and the read) on."""
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=tcp_user_timeout),
        pool=dropsafe.PoolPolicy(replay_transaction=reads, **pool),
        unit=dropsafe.UnitPolicy(commit_status_timeout=20),
        hooks=(events.append,),
    )
    return dropsafe.create_engine(
        url or server.url(driver), policy=policy, pool_size=1, max_overflow=0
    )


def _count(server, table="lost_commit") -> int:
    return int(server.execute(f"SELECT count(*) FROM {table}")[0][0])


def _answers(server) -> bool:
    with contextlib.suppress(ServerError):
        return bool(server.execute("SELECT 1"))
    return False


def _resolved(events):
    return [e.outcome for e in events if isinstance(e, CommitResolved)]


def _replays(events):
    return [e.outcome for e in events if isinstance(e, TransactionReplayed)]


# -- a lost COMMIT, resolved -------------------------------------------------------------------


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
@pytest.mark.parametrize("driver", READS)
def test_a_committed_write_whose_reply_was_lost_returns(server, driver, disposing):
    events = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn, lost_at_commit(engine, "to"):
        conn.execute(INSERT, {"v": 1})
        conn.commit()  # before: OperationalError (the reply timed out)
    assert _count(server) == 1
    assert _resolved(events) == ["committed"]
    assert _replays(events) == []
    with engine.connect() as conn:  # the lost connection was not put back in the pool
        assert conn.execute(sa.text("SELECT count(*) FROM lost_commit")).scalar() == 1


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
@pytest.mark.parametrize("driver", READS)
def test_a_commit_that_never_arrived_is_fenced_replayed_and_committed_once(
    server, driver, disposing
):
    """The old backend still holds the transaction (and its unique key): fenced first."""
    events = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn, lost_at_commit(engine, "both"):
        conn.execute(sa.text("INSERT INTO lost_commit_unique (v) VALUES (7)"))
        conn.commit()  # before: OperationalError
    assert _count(server, "lost_commit_unique") == 1
    assert _resolved(events) == ["aborted"]
    assert _replays(events) == ["replayed"]


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
@pytest.mark.parametrize("driver", READS)
def test_a_commit_lost_then_a_crash_is_unknown(server, driver, disposing):
    """Committed, then the server crashed: 'committed' may be a reuse of the xid: unknown."""
    events = []
    engine = disposing(_engine(server, driver, events))
    bystander = psycopg2.connect(
        server.url("psycopg2").replace("postgresql+psycopg2", "postgresql")
    )
    crashed = threading.Event()

    def crash_once_committed(conn):
        pid = conn.connection.dbapi_connection.info.backend_pid

        def crash():
            wait_committed(server, pid)
            os.kill(bystander.get_backend_pid(), signal.SIGKILL)  # every backend reset
            crashed.set()

        threading.Thread(target=crash, daemon=True).start()

    sa.event.listen(engine, "commit", crash_once_committed)
    try:
        with engine.connect() as conn, lost_at_commit(engine, "to"):
            conn.execute(INSERT, {"v": 3})
            with pytest.raises(dropsafe.CommitOutcomeUnknown) as raised:
                conn.commit()
    finally:
        with contextlib.suppress(psycopg2.Error):
            bystander.close()
    assert crashed.is_set()
    assert raised.value.xid is not None
    assert _resolved(events) == ["unknown"]
    wait_until(lambda: _count(server) == 1, timeout=30, what="the server back, the write kept")


@pytest.mark.parametrize("driver", READS)
def test_a_commit_the_server_refused_raises_its_own_error_unasked(server, driver, disposing):
    events = []
    engine = disposing(_engine(server, driver, events))
    with engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO lost_commit_unique (v) VALUES (1), (1)"))
        with pytest.raises(sa.exc.IntegrityError):
            conn.commit()  # the deferred unique check fails at COMMIT
    assert _resolved(events) == []
    assert _count(server, "lost_commit_unique") == 0


# -- what the app receives is the same, and costs no round trip --------------------------------


def _what_the_app_sees(engine, caplog):
    """Rows, rowcounts, errors and the notices logged, through ``engine``: compared below."""
    seen = []
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="sqlalchemy.dialects.postgresql"),
        engine.connect() as conn,
    ):
        insert = "INSERT INTO lost_commit (v) VALUES (1), (2) RETURNING v, lost_commit_notice()"
        seen.append(conn.execute(sa.text(insert)).all())
        seen.append(conn.execute(sa.text("UPDATE lost_commit SET v = v + 10")).rowcount)
        conn.rollback()
    # SQLAlchemy's psycopg2 dialect logs every notice at INFO (and empties the list)
    seen.append([r.getMessage() for r in caplog.records if "NOTICE" in r.getMessage()])
    with engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO lost_commit_unique (v) VALUES (5)"))
        conn.commit()
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as raised:
        conn.execute(sa.text("UPDATE lost_commit SET nope = 1"))
    orig = raised.value.orig  # psycopg2's pgcode, psycopg 3's sqlstate
    seen.append((type(orig), getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)))
    seen.append(str(raised.value.orig).splitlines()[0])
    with engine.connect() as conn:
        conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(INSERT, {"v": 9})
    seen.append((type(raised.value.orig), str(raised.value.orig).splitlines()[0]))
    return seen


@pytest.mark.parametrize("driver", READS)
def test_the_app_sees_the_same_with_the_read(server, driver, disposing, caplog):
    events = []
    with_read = _what_the_app_sees(disposing(_engine(server, driver, events)), caplog)
    server.execute("TRUNCATE lost_commit, lost_commit_unique")
    without = _what_the_app_sees(disposing(_engine(server, driver, [], reads=False)), caplog)
    assert with_read == without
    if driver == "psycopg2":
        assert len(with_read[2]) == 2  # the app's own notices, logged as before
        assert all("the app's own notice" in line for line in with_read[2])


@pytest.mark.parametrize("driver", READS)
def test_the_read_makes_no_round_trip_of_its_own(server, driver, disposing):
    def turns(reads):
        with TurnCounter("127.0.0.1", server.port) as relay:
            engine = disposing(
                _engine(server, driver, [], reads=reads, url=relay.route(server.url(driver)))
            )
            with engine.connect():  # connected, and its first questions asked
                pass
            relay.reset()
            for v in range(3):
                with engine.connect() as conn:
                    conn.execute(INSERT, {"v": v})
                    conn.execute(INSERT, {"v": v})
                    conn.commit()
            return relay.turns

    assert turns(reads=True) == turns(reads=False)


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
@pytest.mark.parametrize("driver", READS)
def test_a_session_refused_do_blocks_is_not_read_and_works_as_before(server, driver, disposing):
    """Where the read needs a DO block (psycopg2) and the role may not run one, nothing is read:
    the app's statements run as without dropsafe, and a lost COMMIT raises as before."""
    server.execute(
        # Its grant from the previous driver's run is dropped with it (DROP OWNED drops grants).
        "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'no_plpgsql') THEN "
        "DROP OWNED BY no_plpgsql; END IF; END $$; "
        "DROP ROLE IF EXISTS no_plpgsql; CREATE ROLE no_plpgsql LOGIN PASSWORD 'pw'; "
        "GRANT ALL ON lost_commit TO no_plpgsql; REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC"
    )
    try:
        url = sa.make_url(server.url(driver)).set(username="no_plpgsql", password="pw")  # noqa: S106 - a test role
        events = []
        engine = disposing(_engine(server, driver, events, url=url))
        with engine.connect() as conn:
            conn.execute(INSERT, {"v": 1})  # a DO block here: permission denied for language
            conn.commit()
        needs_do = driver_named(driver).capabilities.xid_read_runs_do_block
        with engine.connect() as conn, lost_at_commit(engine, "to"):
            conn.execute(INSERT, {"v": 2})
            if needs_do:
                with pytest.raises(sa.exc.OperationalError):
                    conn.commit()  # not read, so not resolved: as before
            else:
                conn.commit()
        assert _resolved(events) == ([] if needs_do else ["committed"])
        assert _count(server) == 2
    finally:
        server.execute("GRANT USAGE ON LANGUAGE plpgsql TO PUBLIC")


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
@pytest.mark.parametrize("driver", READS)
def test_a_commit_a_crash_lost_is_told_from_its_xid_handed_out_again(driver, disposing):
    """The COMMIT never arrives; the server crashes with the write's WAL still in memory
    (``wal_writer_delay = 10s``) and hands its xid out again to a transaction that commits:
    'committed' on another life. The last checkpoint (the one that ends a crash recovery) is
    redone at or before the WAL position read with the xid: the COMMIT record was not
    recovered, so the transaction did not commit. Before: `CommitOutcomeUnknown`."""
    with PostgresServer(name="xid-reuse", settings={"wal_writer_delay": "10s"}) as server:
        server.execute("CREATE TABLE lost_commit (v int NOT NULL); CHECKPOINT")
        events = []
        # The COMMIT's lost reply is noticed after 10 s: the crash and the xid's new owner
        # (a few seconds under load) come first, so the resolution asks after them.
        engine = disposing(_engine(server, driver, events, tcp_user_timeout=10))
        libpq = server.url("psycopg2").replace("postgresql+psycopg2", "postgresql")
        bystander = psycopg2.connect(libpq)
        holes = contextlib.ExitStack()
        xids = []
        threads = []

        def crash_and_hand_the_xid_out_again(fd, before):
            # Once the COMMIT is on its way (into the blackhole): so that the socket looked
            # alive when it left, whatever the crash's goodbye does (`unsent_commit`).
            wait_until(
                lambda: (tcp_bytes_sent(fd) or 0) > before, timeout=20, what="the COMMIT sent"
            )
            os.kill(bystander.get_backend_pid(), signal.SIGKILL)  # every backend reset
            wait_until(lambda: _answers(server), timeout=30, what="the server back after its crash")
            for _ in range(20):  # the lost xid is handed out again, to one of these
                server.execute("INSERT INTO lost_commit VALUES (-1)")
            xids.append(int(server.execute("SELECT pg_current_xact_id()::text::bigint")[0][0]))

        def at_commit(conn):
            holes.enter_context(kernel_blackhole(client_port(conn), direction="both"))
            fd = conn.connection.dbapi_connection.fileno()
            thread = threading.Thread(
                target=crash_and_hand_the_xid_out_again, args=(fd, tcp_bytes_sent(fd) or 0)
            )
            threads.append(thread)
            thread.start()

        sa.event.listen(engine, "commit", at_commit)
        try:
            with holes, engine.connect() as conn:
                conn.execute(INSERT, {"v": 1})
                conn.commit()  # before: CommitOutcomeUnknown
        finally:
            for thread in threads:
                thread.join(60)
            with contextlib.suppress(psycopg2.Error):
                bystander.close()
        assert xids, "the crash and the xid's new owner did not happen"
        resolved = [e for e in events if isinstance(e, CommitResolved)]
        assert [e.outcome for e in resolved] == ["aborted"]
        assert resolved[0].xid < xids[0]  # its xid was handed out again, and committed
        status = server.execute(f"SELECT pg_xact_status('{resolved[0].xid}'::xid8)")[0][0]
        assert status == "committed"
        assert int(server.execute("SELECT count(*) FROM lost_commit WHERE v = 1")[0][0]) == 1
        assert _replays(events) == ["replayed"]


@pytest.mark.skipif(NO_BLACKHOLE is not None, reason=str(NO_BLACKHOLE))
@pytest.mark.parametrize("driver", READS)
def test_an_apps_functions_of_the_same_names_never_answer_the_read(server, driver, disposing):
    """A session whose search_path puts an app's schema before pg_catalog, with functions named
    as the read's: an xid of theirs (an old committed one) would resolve a COMMIT that never
    arrived as committed, the row missing. The read names pg_catalog's own, and so does every
    question of the resolver (before: 'future', unknown, the old backend never fenced)."""
    server.execute(
        "DROP SCHEMA IF EXISTS shadow CASCADE; CREATE SCHEMA shadow; "
        "CREATE FUNCTION shadow.pg_current_xact_id() RETURNS xid8 LANGUAGE sql "
        "AS $$ SELECT '3'::xid8 $$; "
        "CREATE FUNCTION shadow.pg_current_xact_id_if_assigned() RETURNS xid8 LANGUAGE sql "
        "AS $$ SELECT '3'::xid8 $$; "
        "CREATE FUNCTION shadow.current_setting(text) RETURNS text LANGUAGE sql "
        "AS $$ SELECT 'on' $$"
    )
    try:
        url = sa.make_url(server.url(driver)).update_query_dict(
            {"options": "-csearch_path=shadow,pg_catalog,public"}
        )
        events = []
        engine = disposing(_engine(server, driver, events, url=url))
        with engine.connect() as conn, lost_at_commit(engine, "both"):
            conn.execute(sa.text("INSERT INTO lost_commit_unique (v) VALUES (11)"))
            conn.commit()
        assert _resolved(events) == ["aborted"]
        assert _count(server, "lost_commit_unique") == 1
    finally:
        server.execute("DROP SCHEMA IF EXISTS shadow CASCADE")
