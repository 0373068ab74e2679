"""A verified unit's xid read in its first writing statement's flight, not in a mark of its own.

Issue 28: the mark (a statement right before COMMIT) cost a verified unit one round trip more
than an unverified one (tests/units/test_write_path_cost.py counts it gone). The read in flight
sees the transaction earlier than the mark did, so each attack here is something that happens
between the read and the COMMIT and that the mark, reading last, saw for free:

- the unit's transaction ends and another begins (``Session.rollback()`` inside the unit): the
  read is the first transaction's xid, the COMMIT the second's;
- ``synchronous_commit`` turned off after the read, by a statement or by a function: the COMMIT
  then waits for no WAL, a NOTIFY may be heard before a crash loses its commit record;
- a unit that writes only through a raw driver cursor (nothing read in flight: the mark reads).

Each is a lost COMMIT reply, resolved against a real server, per driver.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from commit_faults import (
    SLOW_COMMIT_SCHEMA,
    Recorder,
    WhenCommitRuns,
    crash_once_the_commit_is_done,
    rows,
)
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.testing import PostgresServer

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]
# Off by default until the histories docs/guarantees.md lists are closed; on here.
IN_FLIGHT = dropsafe.PoolPolicy(read_xid_in_flight=True)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]


def _run(driver, url, steps, policy):
    """Run a unit of ``steps`` (SQL texts; ``None``: ``session.rollback()``); its call count."""
    calls = []

    def unit(session):
        calls.append(1)
        for step in steps:
            if step is None:
                session.rollback()
            else:
                session.execute(sa.text(step))

    async def unit_async(session):
        calls.append(1)
        for step in steps:
            if step is None:
                await session.rollback()
            else:
                await session.execute(sa.text(step))

    async def run_async():
        engine = dropsafe.create_async_engine(url, policy=policy)
        try:
            await dropsafe.run_transaction_async(async_sessionmaker(engine), unit_async)
        finally:
            await engine.dispose()

    if driver == "asyncpg":
        asyncio.run(run_async())
        return len(calls)
    engine = dropsafe.create_engine(url, policy=policy)
    try:
        dropsafe.run_transaction(sessionmaker(engine), unit)
    finally:
        engine.dispose()
    return len(calls)


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_unit_that_rolled_back_and_wrote_again_is_resolved_by_its_last_transaction(
    postgres_server, chaos_proxy, driver
):
    """The first transaction's xid (rolled back: aborted) would have the unit run again: twice.

    The read is kept per SQLAlchemy transaction, so the COMMIT is resolved by the xid of the
    transaction it ends: committed (the server finished the slow COMMIT after the cut).
    """
    server = postgres_server
    server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    policy = dropsafe.Policy(
        pool=IN_FLIGHT,
        unit=dropsafe.UnitPolicy(commit_status_timeout=30, deadline=60),
        hooks=(recorder,),
    )
    steps = [
        "INSERT INTO ledger VALUES (7)",
        None,  # Session.rollback(): the 7 is gone, a new transaction begins at the next step
        "SET LOCAL test.commit_sleep = '2'",
        "INSERT INTO ledger VALUES (1)",
    ]
    watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
    calls = _run(driver, chaos_proxy.route(server.url(driver)), steps, policy)
    watcher.join(timeout=30)
    assert (rows(server, 1), rows(server, 7)) == (1, 0)
    assert calls == 1
    assert recorder.outcomes() == ["committed"]


RELAXED_AFTER_THE_READ = {
    # A statement the engine sees: it names synchronous_commit.
    "statement": ["SET LOCAL synchronous_commit = off"],
    # A function the engine cannot see into: the server's code is asked about after a crash.
    "function": ["SELECT relax()"],
}


@pytest.mark.parametrize("how", RELAXED_AFTER_THE_READ)
@pytest.mark.parametrize("driver", DRIVERS)
def test_synchronous_commit_off_after_the_read_leaves_a_crashed_commit_unknown(
    kernel_blackhole, driver, how
):
    """INSERT (the xid read, synchronous_commit on), then off, then NOTIFY; a crash after COMMIT.

    The COMMIT waited for no WAL: its notification may have been heard, and the crash
    (wal_writer_delay 10 s: the record still in memory) lost its commit record. Read as
    aborted, the unit would run again and notify twice; it must be unknown, run once.
    """
    with PostgresServer(settings={"wal_writer_delay": "10s"}) as server:
        server.execute(SLOW_COMMIT_SCHEMA)
        if how == "function":  # (alone: any such function makes every crashed COMMIT unknown)
            server.execute(
                "CREATE FUNCTION relax() RETURNS void LANGUAGE sql "
                "AS $$ SELECT set_config('synchronous_commit', 'off', true) $$"
            )
        statements = [
            "INSERT INTO ledger VALUES (4)",
            *RELAXED_AFTER_THE_READ[how],
            "SELECT pg_notify('dropsafe_test', 'relaxed')",
        ]
        crashed = crash_once_the_commit_is_done(
            server, kernel_blackhole, driver, statements, IN_FLIGHT
        )
    assert crashed == ("unknown", 1, ["unknown"])  # CommitOutcomeUnknown raised, run once
