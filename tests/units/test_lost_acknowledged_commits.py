"""Acknowledged commits that a failover lost are reported, each once; replicated ones are not.

The fault: a primary with an asynchronous standby whose replication connection runs through a
`ChaosProxy`. The proxy stops forwarding (the standby receives no more WAL), units of work
commit on the primary (acknowledged: asynchronous replication does not wait), the primary is
stopped at once (immediate: a crash), the standby is promoted and the app's proxy switched to it,
and one more unit commits there. Its COMMIT makes dropsafe ask the new primary about the
commits it remembers (src/dropsafe/_unit/failover_audit.py).

Checked, for psycopg2, psycopg 3 and asyncpg: every acknowledged commit the new primary lacks is
reported (`AcknowledgedCommitLost`, outcome "lost") exactly once, none that was replicated is,
and the rows on the new primary confirm both. On the code before the audit, nothing is reported
(and the first lost xid is handed out again by the new primary and reads "committed" there).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from commit_faults import right_before_commit, wait_until

import dropsafe
from dropsafe.testing import ChaosProxy, PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(120)]

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]
INSERT = sa.text("INSERT INTO acks (id) VALUES (:id) RETURNING pg_current_xact_id()::text")


class Lost(list):
    """A hook that keeps the reports of lost commits (found by name: the old code has none)."""

    def __call__(self, event):
        if type(event).__name__ == "AcknowledgedCommitLost":
            self.append(event)


class Pair:
    """A primary, its asynchronous standby fed through a proxy, and the app's proxy."""

    def __init__(self):
        self.primary = PostgresServer()
        self.primary.start()
        self.primary.execute("CREATE TABLE acks (id int PRIMARY KEY)")
        self.standby = self.primary.make_standby()
        self.replication = ChaosProxy(self.primary.host, self.primary.port)
        self.replication.start()
        self.app = ChaosProxy(self.primary.host, self.primary.port)
        self.app.start()
        conninfo = (
            f"host={self.primary.host} port={self.replication.port} user=postgres "
            f"password={self.primary.password} application_name=standby sslmode=disable"
        )
        self.standby.execute(f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'")
        self.standby.execute("SELECT pg_reload_conf()")
        # The walreceiver restarts on the new conninfo: streaming again, through the proxy.
        wait_until(
            lambda: (
                self.replication.stats.connections_open >= 1
                and self.primary.execute(
                    "SELECT 1 FROM pg_stat_replication WHERE state = 'streaming'"
                )
            ),
            30,
            "the standby streaming through the proxy",
        )

    def wait_replayed(self):
        lsn = self.primary.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
        wait_until(
            lambda: (
                self.standby.execute(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'")[0][0] == "t"
            ),
            30,
            "the standby to replay the replicated commits",
        )

    def fail_over(self):
        """Crash the primary, promote the standby, and point the app's proxy at it."""
        self.primary.stop("immediate")
        self.replication.cut("rst")
        self.standby.promote()
        self.app.upstream_port = self.standby.port
        self.app.cut("rst")

    def ids_on_new_primary(self):
        return {int(row[0]) for row in self.standby.execute("SELECT id FROM acks")}

    def close(self):
        for part in (self.app, self.replication, self.standby, self.primary):
            part.close()


@pytest.fixture
def pair():
    pair = Pair()
    yield pair
    pair.close()


class Units:
    """Runs a unit of work that inserts one id and returns its xid, for any driver."""

    def __init__(self, url, driver, hook):
        policy = dropsafe.Policy(hooks=(hook,))
        self.is_async = driver == "asyncpg"
        self.loop = asyncio.new_event_loop() if self.is_async else None
        if self.is_async:
            self.engine = dropsafe.create_async_engine(url, policy=policy)
            self.sync_engine = self.engine.sync_engine
        else:
            self.engine = dropsafe.create_engine(url, policy=policy)
            self.sync_engine = self.engine

    def insert(self, op_id):
        def unit(connection):
            return int(connection.execute(INSERT, {"id": op_id}).scalar_one())

        async def unit_async(connection):
            return int((await connection.execute(INSERT, {"id": op_id})).scalar_one())

        if self.is_async:
            return self.loop.run_until_complete(
                dropsafe.run_transaction_async(self.engine, unit_async, deadline=30)
            )
        return dropsafe.run_transaction(self.engine, unit, deadline=30)

    def close(self):
        if self.is_async:
            self.loop.run_until_complete(self.engine.dispose())
            self.loop.close()
        else:
            self.engine.dispose()


@pytest.fixture
def units_for(pair):
    made = []

    def make(driver, hook):
        units = Units(pair.app.route(pair.primary.url(driver)), driver, hook)
        made.append(units)
        return units

    yield make
    for units in made:
        units.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_commits_a_failover_lost_are_reported_once_and_only_those(pair, units_for, driver):
    lost = Lost()
    units = units_for(driver, lost)
    replicated = {op_id: units.insert(op_id) for op_id in range(1, 6)}
    pair.wait_replayed()
    pair.replication.blackhole()  # the standby receives nothing more
    not_replicated = {op_id: units.insert(op_id) for op_id in range(101, 106)}

    pair.fail_over()
    started = time.monotonic()
    after = units.insert(1000)  # commits on the new primary: the audit runs after it
    elapsed = time.monotonic() - started
    units.insert(1001)  # a second unit reports nothing again

    on_new_primary = pair.ids_on_new_primary()
    assert set(replicated) <= on_new_primary
    assert not set(not_replicated) & on_new_primary, "the fault did not lose those commits"
    reported = sorted(event.xid for event in lost)
    assert reported == sorted(not_replicated.values()), (
        f"{driver}: reported {reported}, lost {sorted(not_replicated.values())}, "
        f"replicated {sorted(replicated.values())}"
    )
    assert {event.outcome for event in lost} == {"lost"}
    function = "unit_async" if driver == "asyncpg" else "unit"
    assert {event.unit for event in lost} == {f"Units.insert.<locals>.{function}"}
    # The new primary hands the first lost xid out again (`after`, here): that commit reads
    # "committed" there, and only its WAL position shows it was lost.
    assert after not in replicated.values()
    assert elapsed < 20


@pytest.mark.parametrize("driver", ["psycopg2"])
def test_a_lost_commit_whose_mark_lies_before_the_fork_is_told_by_its_status(
    pair, units_for, driver
):
    """The mark (L0) lies below the fork point, but the COMMIT itself was not replicated.

    Between the unit's mark and its COMMIT, another transaction commits and is replicated
    (the test's, run right before the COMMIT is sent, after dropsafe's mark): the
    standby replays past L0, then the replication stops and the COMMIT is sent. The new
    primary has the unit's INSERT record (and so its xid) but no commit: it says "aborted".
    """
    lost = Lost()
    units = units_for(driver, lost)
    units.insert(1)  # dropsafe's hooks are in place: the test's goes under them
    armed = {"on": True}

    def replicate_someone_else_then_cut(connection):
        if not armed["on"]:
            return
        armed["on"] = False
        pair.primary.execute("INSERT INTO acks (id) VALUES (500)")  # a commit past our mark
        pair.wait_replayed()
        pair.replication.blackhole()

    right_before_commit(units.sync_engine, replicate_someone_else_then_cut)
    xid = units.insert(2)
    assert not armed["on"]
    pair.fail_over()
    units.insert(1000)

    on_new_primary = pair.ids_on_new_primary()
    assert 500 in on_new_primary
    assert 2 not in on_new_primary
    assert [(event.xid, event.outcome) for event in lost] == [(xid, "lost")]
    assert "'aborted'" in lost[0].reason


@pytest.fixture
def wal_hiding_role(postgres_server):
    """A role that may not read the WAL position (as a fork without PostgreSQL's WAL may)."""
    server = postgres_server
    password = secrets.token_hex(8)
    server.execute(
        "CREATE TABLE acks (id int PRIMARY KEY); "
        f"CREATE ROLE wal_hidden LOGIN PASSWORD '{password}'; "
        "GRANT INSERT ON acks TO wal_hidden; "
        "GRANT EXECUTE ON FUNCTION pg_current_wal_insert_lsn() TO wal_hidden; "
        "REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC"
    )

    def hide():
        server.execute("REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM wal_hidden")

    return server.url("psycopg2", user="wal_hidden", password=password), hide


@pytest.mark.parametrize("answered_first", [False, True])
def test_a_server_that_hides_the_wal_position_still_commits_units(
    wal_hiding_role, answered_first, disposing
):
    """The WAL position is read in the marks only once a server of the engine answered it.

    Hidden from the start: no unit fails (the engine's first read, outside the app's
    transaction, finds it hidden). Hidden after the engine's server answered it (another host
    behind the same URL): one unit at most meets the error, as for the server's life.
    """
    url, hide = wal_hiding_role
    engine = disposing(dropsafe.create_engine(url, pool_size=1, max_overflow=0))
    insert = sa.text("INSERT INTO acks (id) VALUES (:id)")
    failures = 0
    if answered_first:
        dropsafe.run_transaction(engine, lambda c: c.execute(insert, {"id": 0}))
    hide()
    for op_id in range(1, 4):
        engine.pool.dispose()  # a new connection each time
        try:
            dropsafe.run_transaction(
                engine, lambda c, op_id=op_id: c.execute(insert, {"id": op_id})
            )
        except sa.exc.ProgrammingError as exc:
            assert "pg_current_wal_insert_lsn" in str(exc)
            failures += 1
    assert failures <= (1 if answered_first else 0)


def test_a_wal_position_hidden_later_fails_one_plain_transaction_at_most(
    wal_hiding_role, disposing
):
    """The same for a plain transaction whose xid is read in flight (the transaction replay on).

    The read in the INSERT's flight asked for the WAL position on every new connection once
    the engine's server had answered it: hidden later, every transaction failed (3 of 3).
    """
    url, hide = wal_hiding_role
    policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(replay_transaction=True))
    engine = disposing(dropsafe.create_engine(url, policy=policy, pool_size=1, max_overflow=0))
    insert = sa.text("INSERT INTO acks (id) VALUES (:id)")
    with engine.begin() as connection:
        connection.execute(insert, {"id": 10})
    hide()
    failures = 0
    for op_id in range(11, 14):
        engine.pool.dispose()  # a new connection each time
        try:
            with engine.begin() as connection:
                connection.execute(insert, {"id": op_id})
        except sa.exc.ProgrammingError as exc:
            assert "pg_current_wal_insert_lsn" in str(exc)
            failures += 1
    assert failures <= 1


def test_writers_that_meet_the_new_primary_at_once_report_each_lost_commit_once(pair, units_for):
    """Four threads commit on the new primary at the same moment: one report per lost commit."""
    lost = Lost()
    units = units_for("psycopg2", lost)
    units.insert(1)
    pair.wait_replayed()
    pair.replication.blackhole()
    with ThreadPoolExecutor(4) as writers:
        not_replicated = set(writers.map(units.insert, range(101, 121)))
    pair.fail_over()
    barrier = threading.Barrier(4, timeout=30)

    def write_after(op_id):
        barrier.wait()
        return units.insert(op_id)

    with ThreadPoolExecutor(4) as writers:
        list(writers.map(write_after, range(1000, 1004)))
    assert not set(range(101, 121)) & pair.ids_on_new_primary()
    assert Counter(event.xid for event in lost) == Counter(not_replicated)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_stats_reset_is_no_failover_and_reports_nothing(postgres_server, driver):
    """An administrator's ``pg_stat_reset_shared('bgwriter')``, no failover: nothing is lost.

    The code before this test took the moved ``stats_reset`` for a new server life and
    reported each durable commit before it as ``unknown`` (20 of 20).
    """
    server = postgres_server
    server.execute("CREATE TABLE acks (id int PRIMARY KEY)")
    lost = Lost()
    units = Units(server.url(driver), driver, lost)
    try:
        for op_id in range(20):
            units.insert(op_id)
        server.execute("SELECT pg_stat_reset_shared('bgwriter')")
        if units.is_async:  # new connections: each reads the server's life afresh
            units.loop.run_until_complete(units.engine.dispose())
        else:
            units.engine.dispose()
        units.insert(100)
        units.insert(101)
    finally:
        units.close()
    assert lost == []
    assert int(server.execute("SELECT count(*) FROM acks")[0][0]) == 22
