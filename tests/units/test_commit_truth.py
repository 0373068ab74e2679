"""The promise under attack: an acknowledged unit of work exists exactly once, whatever
PostgreSQL goes through during its COMMIT; one that is not acknowledged is reported honestly.

Each test makes one history that broke dropsafe 0.1 (acknowledged writes lost after a crash
restart, writes made at COMMIT time run twice, a standby believed, a pooler's error taken for a
refusal, a half-open COMMIT left unknown) and checks the promise on it, for psycopg2, psycopg 3
and asyncpg.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import threading

import psycopg2
import pytest
import sqlalchemy as sa
from commit_faults import (
    SLOW_COMMIT_SCHEMA,
    PoolerErrorAtCommit,
    Recorder,
    Unit,
    WhenCommitRuns,
    acknowledged_when_struck_at_commit,
    committing_xid,
    crash_once_the_commit_is_done,
    heard_with_the_commit_reply_lost,
    insert,
    libpq_url,
    lose_the_first_reply,
    rows,
    struck_once_the_commit_is_done,
    wait_until,
)
from sqlalchemy.orm import Session

import dropsafe
from dropsafe import CommitOutcomeUnknown
from dropsafe.testing import ChaosProxy, PgBouncer, PostgresServer

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]

pytestmark = pytest.mark.fault


@pytest.fixture
def server(postgres_server):
    postgres_server.execute(SLOW_COMMIT_SCHEMA)
    return postgres_server


# -- 1. a crash restart hands the lost xid to another transaction ---------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_crash_restart_during_commit_never_acknowledges_a_lost_write(driver):
    # WAL stays in memory until COMMIT (wal_writer_delay), so a crash loses the transaction and
    # its xid is handed out again: the resolver must not take the newcomer's commit for ours.
    with (
        PostgresServer(settings={"wal_writer_delay": "10s"}) as server,
        ChaosProxy(server.host, server.port) as proxy,
    ):
        server.execute(SLOW_COMMIT_SCHEMA)
        bystander = psycopg2.connect(libpq_url(server))
        bystander_pid = bystander.get_backend_pid()
        lost = {}

        def crash_and_reuse_the_xid():
            lost["xid"] = committing_xid(server)
            proxy.refuse()  # the resolver waits until the xid has been handed out again
            # Any backend dying hard resets them all.
            assert server.signal_backend(bystander_pid, signal.SIGKILL)
            wait_until(lambda: server.execute("SELECT 1"), 30, "crash recovery")
            wait_until(
                lambda: int(server.execute("SELECT pg_current_xact_id()")[0][0]) > lost["xid"],
                30,
                "the lost xid to be committed by another transaction",
            )
            proxy.heal()

        url = proxy.route(server.url(driver))
        acknowledged, outcomes = acknowledged_when_struck_at_commit(
            server, url, driver, crash_and_reuse_the_xid
        )
        with contextlib.suppress(psycopg2.Error):
            bystander.close()
        written = rows(server, 1)
        status = server.execute(f"SELECT pg_xact_status('{lost['xid']}'::xid8)")[0][0]
    assert not (acknowledged and written == 0), "an acknowledged write does not exist"
    assert written <= 1
    # The history really was the dangerous one: ours lost, its xid committed by another.
    assert status == "committed"
    # The server's last checkpoint (its crash recovery's) was redone before the WAL position
    # the mark read: the COMMIT record was not recovered, so 'committed' is the newcomer's and
    # the unit ran again, once (session 11; before, the answer was unknown).
    assert (written, acknowledged) == (1, True)
    assert outcomes == ["aborted"]


# -- 2. writes made at COMMIT time ------------------------------------------------------------


class AuditedSession(Session):
    """A session whose before_commit hook writes (an audit row, an outbox message)."""


@sa.event.listens_for(AuditedSession, "before_commit")
def _write_audit_row(session):
    session.execute(sa.text("SET LOCAL test.commit_sleep = '1'"))
    session.execute(sa.text("INSERT INTO ledger VALUES (2)"))


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_write_made_by_a_before_commit_hook_is_resolved_not_run_again(
    server, chaos_proxy, driver
):
    recorder = Recorder()
    unit = Unit(
        driver,
        chaos_proxy.route(server.url(driver)),
        ["SELECT 1"],  # the unit itself only reads
        policy=dropsafe.Policy(hooks=(recorder,)),
        session_class=AuditedSession,
    )
    watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
    assert unit.run() == "done"
    watcher.join(timeout=20)
    assert rows(server, 2) == 1
    assert unit.calls == 1
    assert recorder.outcomes() == ["committed"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_notify_whose_commit_reply_is_lost_is_heard_once(server, kernel_blackhole, driver):
    # NOTIFY takes its xid only at COMMIT. The COMMIT reaches the server, its reply does not.
    notify = ["SELECT pg_notify('dropsafe_test', 'once')"]
    heard = heard_with_the_commit_reply_lost(server, kernel_blackhole, driver, notify)
    assert heard == (["once", "end"], 1, ["committed"])  # heard once, run once, resolved


# -- 3. a standby answers the resolver ----------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_standby_answering_the_resolver_is_not_believed(server, chaos_proxy, driver):
    standby = server.make_standby()
    try:

        def fail_over_to_the_standby_for_a_while():
            chaos_proxy.upstream_port = standby.port  # a load balancer that went astray
            chaos_proxy.cut("rst")
            back = threading.Timer(1.5, lambda: setattr(chaos_proxy, "upstream_port", server.port))
            back.daemon = True
            back.start()

        recorder = Recorder()
        unit = Unit(
            driver,
            chaos_proxy.route(server.url(driver)),
            insert(3, commit_sleep=3),
            policy=dropsafe.Policy(hooks=(recorder,)),
        )
        watcher = WhenCommitRuns(server, fail_over_to_the_standby_for_a_while)
        assert unit.run() == "done"
        watcher.join(timeout=20)
        assert rows(server, 3) == 1
    finally:
        standby.close()
    assert recorder.outcomes() in (["committed"], ["aborted"])


# -- 4. a pooler's error at COMMIT --------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_pooler_error_at_commit_is_resolved_not_taken_for_a_refusal(server, driver):
    # The COMMIT took effect; the client hears only the pooler's FATAL 08P01. Only PostgreSQL's
    # own ERROR refuses a COMMIT: this one is resolved by asking, not run again blind.
    pooler = PoolerErrorAtCommit(server.port)
    try:
        recorder = Recorder()
        plain = {"asyncpg": {"ssl": "disable"}}.get(driver, {"sslmode": "disable"})
        url = server.url(driver, **plain).replace(f":{server.port}/", f":{pooler.port}/")
        unit = Unit(driver, url, insert(4), policy=dropsafe.Policy(hooks=(recorder,)))
        assert unit.run() == "done"
        assert pooler.struck.is_set()
    finally:
        pooler.close()
    assert rows(server, 4) == 1
    assert unit.calls == 1
    assert recorder.outcomes() == ["committed"]


# -- refusals are refusals ----------------------------------------------------------------------

DEFERRED_REFUSALS = """
CREATE TABLE refusals (v int NOT NULL);
CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF current_setting('test.refuse', true) = 'unique' THEN
    RAISE EXCEPTION 'duplicate at commit' USING ERRCODE = '23505';
  ELSIF current_setting('test.refuse', true) = 'serialization' THEN
    RAISE EXCEPTION 'conflict at commit' USING ERRCODE = '40001';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON refusals
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
"""


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", DRIVERS)
def test_postgresql_s_own_refusal_of_a_commit_is_not_resolved(server, driver):
    # A constraint checked at COMMIT: PostgreSQL's own ERROR, nothing committed. It is raised
    # once and unchanged; a serialization failure at COMMIT is retried. No resolution either way.
    server.execute(DEFERRED_REFUSALS)
    recorder = Recorder()
    policy = dropsafe.Policy(hooks=(recorder,))

    def refused_at_commit(refusal, value):
        statements = [
            f"SET LOCAL test.refuse = '{refusal}'",
            f"INSERT INTO refusals VALUES ({value})",
        ]
        return Unit(driver, server.url(driver), statements, policy=policy)

    refused = refused_at_commit("unique", 1)
    with pytest.raises(sa.exc.IntegrityError, match="duplicate at commit"):
        refused.run()
    assert refused.calls == 1
    conflicted = refused_at_commit("serialization", 2)
    with pytest.raises(sa.exc.DBAPIError, match="conflict at commit"):
        conflicted.run()
    assert conflicted.calls == policy.unit.max_attempts
    assert recorder.outcomes() == []
    assert server.execute("SELECT count(*) FROM refusals") == [("0",)]


# -- 5. a COMMIT lost on a half-open link -------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_half_open_commit_is_fenced_and_settled_in_bounded_time(server, kernel_blackhole, driver):
    # COMMIT goes into a link the kernel drops: the old backend sits idle in its transaction
    # (for hours, with the server's keepalives). Fencing it gives an answer in seconds.
    holes = contextlib.ExitStack()
    recorder = Recorder()
    unit = Unit(
        driver,
        server.url(driver),
        insert(5),
        policy=dropsafe.Policy(
            connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
            unit=dropsafe.UnitPolicy(commit_status_timeout=20),
            hooks=(recorder,),
        ),
    )
    with holes:
        assert (
            unit.run(before_commit=lose_the_first_reply(holes, kernel_blackhole, "both")) == "done"
        )
    assert rows(server, 5) == 1
    assert unit.calls == 2  # the first never committed: the fenced backend rolled it back
    assert recorder.outcomes() == ["aborted"]
    assert unit.elapsed < 2 + 6, f"took {unit.elapsed:.1f}s"


# -- 6. a NOTIFY that no statement spells --------------------------------------------------------

NOTIFYING_SCHEMA = """
CREATE FUNCTION announce(payload text) RETURNS void LANGUAGE sql
  AS $$ SELECT pg_notify('dropsafe_test', payload) $$;
CREATE TABLE watched (v int);
CREATE FUNCTION watched_changed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_notify('dropsafe_test', 'trigger');
  RETURN NULL;
END $$;
CREATE TRIGGER watched_changed AFTER UPDATE ON watched
  FOR EACH STATEMENT EXECUTE FUNCTION watched_changed();
"""

# Each unit queues one notification at COMMIT and writes nothing (no xid before COMMIT).
SILENT_NOTIFIERS = {
    "function": ["SELECT announce('function')"],
    "statement trigger": ["UPDATE watched SET v = v WHERE false"],  # 0 rows, one notification
    "read only": ["SET TRANSACTION READ ONLY", "SELECT announce('read only')"],
}


@pytest.mark.parametrize("shape", SILENT_NOTIFIERS)
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_notify_queued_by_a_function_or_trigger_is_heard_once(
    server, kernel_blackhole, driver, shape
):
    # The COMMIT reaches the server and its reply is lost. The statement does not say "notify",
    # so on the code before this test the transaction had no xid: run again, heard twice.
    server.execute(NOTIFYING_SCHEMA)
    notifier = SILENT_NOTIFIERS[shape]
    heard = heard_with_the_commit_reply_lost(server, kernel_blackhole, driver, notifier)
    payload = notifier[-1].split("'")[1] if shape != "statement trigger" else "trigger"
    assert heard == ([payload, "end"], 1, ["committed"])


@pytest.mark.parametrize("shape", ["function", "spelled"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_notify_whose_commit_a_crash_may_have_lost_is_unknown(
    server, kernel_blackhole, driver, shape
):
    # A transaction that wrote nothing but a NOTIFY commits without a WAL flush (PostgreSQL's
    # rule, and synchronous_commit off in the xid read): listeners may hear it before its
    # commit record is flushed, so after a crash it is neither committed nor aborted for sure.
    # Running it again (the code before this test: no xid for a function's NOTIFY, and
    # "aborted" for a spelled one whose commit record the crash lost) may notify twice.
    server.execute(NOTIFYING_SCHEMA)
    notify = (
        SILENT_NOTIFIERS["function"]
        if shape == "function"
        else ["SELECT pg_notify('dropsafe_test', 'spelled')"]
    )
    crashed = crash_once_the_commit_is_done(server, kernel_blackhole, driver, notify)
    assert crashed == ("unknown", 1, ["unknown"])  # CommitOutcomeUnknown raised, run once


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_notify_after_a_write_of_no_row_whose_commit_a_crash_lost_is_unknown(
    kernel_blackhole, driver
):
    # A 0-row UPDATE writes no WAL, so the transaction's COMMIT (it notifies) waits for no
    # flush either. Where the engine reads the xid in the UPDATE's flight (psycopg2's read
    # gives the transaction its xid before the statement), the mark before COMMIT finds an xid
    # already assigned and must still not take the COMMIT for one that flushed.
    with PostgresServer(settings={"wal_writer_delay": "10s"}) as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        statements = [
            "UPDATE ledger SET v = 0 WHERE false",
            "SELECT pg_notify('dropsafe_test', 'zero')",
        ]
        crashed = crash_once_the_commit_is_done(server, kernel_blackhole, driver, statements)
    assert crashed == ("unknown", 1, ["unknown"])  # CommitOutcomeUnknown raised, run once


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_silent_notify_behind_a_transaction_mode_pooler_is_heard_once(
    server, kernel_blackhole, driver
):
    # PgBouncer (transaction mode) between: the xid read and the COMMIT may run on any server
    # connection; PgBouncer's reply to the COMMIT is dropped on its way to the client.
    server.execute(NOTIFYING_SCHEMA)
    with PgBouncer(server, pool_mode="transaction") as bouncer:
        heard = heard_with_the_commit_reply_lost(
            server,
            kernel_blackhole,
            driver,
            SILENT_NOTIFIERS["function"],
            url=bouncer.url(driver),
            pooler="transaction",
        )
    assert heard == (["function", "end"], 1, ["committed"])


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_unit_on_a_hot_standby_takes_no_xid(server, driver):
    # A standby assigns no xid: the read before COMMIT must not try (every read-only unit on
    # a standby would fail), and NOTIFY stays refused there.
    standby = server.make_standby()
    try:
        reader = Unit(
            driver, standby.url(driver), ["SELECT count(*) FROM ledger"], policy=dropsafe.Policy()
        )
        assert reader.run() == "done"
        notifier = Unit(
            driver,
            standby.url(driver),
            ["SELECT pg_notify('dropsafe_test', 'standby')"],
            policy=dropsafe.Policy(unit=dropsafe.UnitPolicy(max_attempts=1)),
        )
        with pytest.raises(sa.exc.DBAPIError, match="during recovery"):
            notifier.run()
    finally:
        standby.close()


# -- 7. routine maintenance is not a crash -------------------------------------------------------


def _app_role(server):
    """A role with no privileges beyond its table: what an application connects as."""
    password = secrets.token_hex(8)
    server.execute(
        f"CREATE ROLE app LOGIN PASSWORD '{password}'; GRANT INSERT, SELECT ON ledger TO app"
    )
    return lambda driver: server.url(driver, user="app", password=password)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_stats_reset_during_a_slow_commit_is_not_taken_for_a_crash(server, chaos_proxy, driver):
    # An administrator's pg_stat_reset_shared('bgwriter') while a COMMIT is slow and its
    # connection is cut: the code before this test read a new server life, called the running
    # xid "aborted" and ran the unit again (2 rows).
    app_url = _app_role(server)
    recorder = Recorder()
    unit = Unit(
        driver,
        chaos_proxy.route(app_url(driver)),
        insert(7, commit_sleep=2),
        policy=dropsafe.Policy(hooks=(recorder,)),
    )

    def reset_then_cut():
        server.execute("SELECT pg_stat_reset_shared('bgwriter'), pg_stat_reset()")
        chaos_proxy.cut("rst")

    watcher = WhenCommitRuns(server, reset_then_cut)
    assert unit.run() == "done"
    watcher.join(timeout=20)
    assert rows(server, 7) == 1
    assert unit.calls == 1
    assert recorder.outcomes() == ["committed"]


def test_a_server_life_moves_on_a_crash_and_on_nothing_routine(server):
    """As a role without privileges: resets, reload, CHECKPOINT, VACUUM and a fast restart keep
    the history; a backend SIGKILLed (crash restart: same postmaster) and an immediate stop
    move it."""
    from dropsafe._commit_truth.server_life import ServerLife
    from dropsafe._commit_truth.server_sql import SERVER_LIFE_SQL

    app_url = _app_role(server)("psycopg2").replace("postgresql+psycopg2", "postgresql")

    def life():
        connection = psycopg2.connect(app_url)
        try:
            cursor = connection.cursor()
            cursor.execute(f"SELECT {SERVER_LIFE_SQL}")
            return ServerLife.read(*cursor.fetchone())
        finally:
            connection.close()

    first = life()
    assert first.provable
    assert first.checkpointer is not None, "a role without privileges must see its pid"
    for routine in [
        "SELECT pg_stat_reset_shared('bgwriter')",
        "SELECT pg_stat_reset_shared('wal'), pg_stat_reset_shared('archiver'), pg_stat_reset()",
        "SELECT pg_stat_reset_slru(NULL)",
        "SELECT pg_reload_conf()",
        "CHECKPOINT",
        "VACUUM",
    ]:
        server.execute(routine)
        assert life().same_history(first), routine
    before_restart = life()
    server.restart("fast")
    after_clean_restart = life()
    assert after_clean_restart.same_history(before_restart)
    # A reset and then a clean restart, both between two reads: a new history to the first read
    # (an answer unknown, never wrong; see dropsafe._commit_truth.server_life).
    assert not after_clean_restart.same_history(first)
    bystander = psycopg2.connect(libpq_url(server))
    os.kill(bystander.get_backend_pid(), signal.SIGKILL)

    def moved():
        try:
            return not life().same_history(after_clean_restart)
        except psycopg2.OperationalError:
            return False  # still recovering

    wait_until(moved, 30, "a life after the crash restart")
    after_crash = life()
    assert after_crash.postmaster_start == after_clean_restart.postmaster_start  # same postmaster
    server.restart("immediate")
    assert not life().same_history(after_crash)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_commit_whose_reply_a_clean_restart_lost_is_still_proven(
    server, kernel_blackhole, driver
):
    # The COMMIT is done, its reply lost; the server restarts cleanly (fast) before the resolver
    # asks. A clean restart reuses no xid: the new checkpointer is another process, but the
    # statistics are kept, so "committed" is still proven (as it was before issue 26).
    restart = functools.partial(server.restart, "fast")
    struck = struck_once_the_commit_is_done(server, kernel_blackhole, driver, insert(8), restart)
    assert struck == ("acknowledged", 1, ["committed"])
    assert rows(server, 8) == 1


# -- 8. a COMMIT that waits for a synchronous standby ------------------------------------------


@pytest.fixture(scope="module")
def synchronous_pair():
    with PostgresServer() as primary:
        primary.execute(SLOW_COMMIT_SCHEMA)
        standby = primary.make_standby(synchronous=True)
        try:
            yield primary, standby
        finally:
            standby.close()


SYNC_REP_WAITING = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_commit_waiting_for_its_synchronous_standby_is_neither_fenced_nor_acknowledged(
    synchronous_pair, driver
):
    # The synchronous standby is down: COMMIT is flushed locally and waits in SyncRep; its
    # connection is cut. pg_xact_status says "committed" already: the code before this test
    # acknowledged the unit, though a standby promoted then would lack the row. Now: unknown
    # when the time is up, and the backend is left waiting (terminating it would keep the
    # commit locally only), so the commit reaches the standby once it is back.
    primary, standby = synchronous_pair
    value = 100 + DRIVERS.index(driver)
    standby.stop("fast")
    recorder = Recorder()
    try:
        with ChaosProxy(primary.host, primary.port) as proxy:
            unit = Unit(
                driver,
                proxy.route(primary.url(driver)),
                insert(value),
                policy=dropsafe.Policy(
                    unit=dropsafe.UnitPolicy(commit_status_timeout=3), hooks=(recorder,)
                ),
            )
            watcher = WhenCommitRuns(primary, lambda: proxy.cut("rst"), query=SYNC_REP_WAITING)
            with pytest.raises(CommitOutcomeUnknown, match="synchronous standby"):
                unit.run()
            watcher.join(timeout=20)
        assert unit.calls == 1
        assert recorder.outcomes() == ["unknown"]
        assert primary.execute(SYNC_REP_WAITING), "the waiting backend was terminated"
    finally:
        standby.start()
    wait_until(lambda: not primary.execute(SYNC_REP_WAITING), 30, "the standby to confirm")
    wait_until(lambda: standby.execute(f"SELECT 1 FROM ledger WHERE v = {value}"), 30, "the row")
    assert rows(primary, value) == 1
