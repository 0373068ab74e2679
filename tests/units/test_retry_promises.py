"""Retries that keep their word: an outage is waited out within the deadline, the deadline is
absolute (also when the server hangs mid-statement), and only the database's errors are
retried."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
import sqlalchemy as sa
from commit_faults import SLOW_COMMIT_SCHEMA, Recorder, Unit, WhenCommitRuns, insert, rows
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.events import RetriesGaveUp
from dropsafe.testing._runtime import wait_until

pytestmark = pytest.mark.fault

SCHEMA = "CREATE TABLE ops (op text NOT NULL)"


def _ops(server):
    return [op for (op,) in server.execute("SELECT op FROM ops")]


# -- outages are waited out -------------------------------------------------------------------


class _Writers:
    """Writers that each start a unit of work every 50 ms, as request handlers would."""

    def __init__(self, write, count=3):
        self.write, self.count = write, count
        self.stop = threading.Event()
        self.acknowledged, self.failed = [], []
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def _run(self, number):
        for n in range(100_000):
            if self.stop.is_set():
                return
            op = f"{number}-{n}"
            try:
                self.write(op)
            except Exception as exc:
                self.failed.append((op, repr(exc)))
            else:
                self.acknowledged.append(op)
            self.stop.wait(0.05)  # the pace of the load, not a synchronisation

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self.threads)


def _write_sync(url):
    engine = dropsafe.create_engine(url)
    factory = sessionmaker(engine)

    def write(op):
        dropsafe.run_transaction(
            factory, lambda s: s.execute(sa.text("INSERT INTO ops VALUES (:op)"), {"op": op})
        )

    return engine, write


def _write_through_a_loop(url):
    """asyncpg: the writers' units run on one event loop in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = asyncio.run_coroutine_threadsafe(_make_async_engine(url), loop).result(10)
    factory = async_sessionmaker(engine)

    async def unit(session, op):
        await session.execute(sa.text("INSERT INTO ops VALUES (:op)"), {"op": op})

    def write(op):
        coroutine = dropsafe.run_transaction_async(factory, lambda s: unit(s, op))
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    class Engine:
        def dispose(self):
            asyncio.run_coroutine_threadsafe(engine.dispose(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    return Engine(), write


async def _make_async_engine(url):
    return dropsafe.create_async_engine(url)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_outages_of_1_4_and_8_seconds_are_waited_out(postgres_server, driver):
    postgres_server.execute(SCHEMA)
    make = _write_through_a_loop if driver == "asyncpg" else _write_sync
    engine, write = make(postgres_server.url(driver))
    try:
        with _Writers(write) as writers:
            for down in (1, 4, 8):
                wait_until(
                    lambda: len(writers.acknowledged) >= 10,
                    timeout=60,
                    what="writes before the outage",
                )
                writers.acknowledged.clear()
                postgres_server.stop("fast")
                time.sleep(down)  # the outage's length: a fault schedule, not a synchronisation
                postgres_server.start()
            wait_until(
                lambda: len(writers.acknowledged) >= 10,
                timeout=60,
                what="writes after the last outage",
            )
    finally:
        engine.dispose()
    ops = _ops(postgres_server)
    assert writers.failed == []
    assert len(ops) == len(set(ops)), "an op was written twice"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_a_lost_commit_is_resolved_once_its_server_is_back_within_the_deadline(
    postgres_server, driver
):
    """``commit_status_timeout`` bounds how long an answer of "in progress" is waited on; a
    server that cannot be asked at all (stopped during the COMMIT, down for longer than that
    timeout) is waited for until the unit's deadline, as a connect is (before: unknown after the
    timeout, with the server back 2 s later)."""
    postgres_server.execute(SLOW_COMMIT_SCHEMA)
    recorder = Recorder()
    policy = dropsafe.Policy(
        unit=dropsafe.UnitPolicy(commit_status_timeout=1, deadline=40), hooks=(recorder,)
    )
    unit = Unit(driver, postgres_server.url(driver), insert(1, commit_sleep=3), policy=policy)

    def outage():
        postgres_server.stop("fast")  # the slow COMMIT's backend terminated mid-COMMIT
        time.sleep(3)  # the outage's length: a fault schedule, not a synchronisation
        postgres_server.start()

    striker = WhenCommitRuns(postgres_server, outage)
    assert unit.run() == "done"
    striker.join(30)
    assert rows(postgres_server, 1) == 1
    assert unit.calls == 2  # the stopped COMMIT was resolved aborted, then run again
    assert recorder.outcomes() == ["aborted"]


# -- the deadline is absolute -----------------------------------------------------------------


def test_the_deadline_holds_while_the_server_refuses_connections(postgres_server):
    url = postgres_server.url("psycopg2")
    postgres_server.stop("fast")
    events = []
    policy = dropsafe.Policy(unit=dropsafe.UnitPolicy(deadline=0.5), hooks=(events.append,))
    engine = dropsafe.create_engine(url, policy=policy)
    started = time.monotonic()
    try:
        # The last error itself, as without dropsafe: the app's handlers still catch it.
        with pytest.raises(sa.exc.OperationalError):
            dropsafe.run_transaction(engine, lambda c: c.execute(sa.text("SELECT 1")))
    finally:
        engine.dispose()
    elapsed = time.monotonic() - started
    assert elapsed <= 0.5 * 1.1 + 0.1, f"gave up after {elapsed:.2f}s"
    (gave_up,) = [event for event in events if isinstance(event, RetriesGaveUp)]
    assert gave_up.reason == "deadline"
    assert gave_up.attempts == 1  # no run reached the server: no attempt was used up


def _stop_own_backend(server, stopped):
    def stop(pid):
        # Its kernel still acknowledges: no TCP timeout fires.
        assert server.signal_backend(pid, signal.SIGSTOP)
        stopped.append(pid)

    return stop


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_a_backend_that_hangs_mid_statement_is_left_at_the_deadline(postgres_server, driver):
    stopped = []
    stop = _stop_own_backend(postgres_server, stopped)
    policy = dropsafe.Policy(unit=dropsafe.UnitPolicy(deadline=2))
    url = postgres_server.url(driver)
    started = time.monotonic()
    try:
        with pytest.raises(sa.exc.DBAPIError):  # noqa: PT012 - the socket shut at the deadline
            if driver == "asyncpg":

                async def unit(connection):
                    pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
                    stop(pid)
                    await connection.execute(sa.text("SELECT 1"))

                async def scenario():
                    engine = dropsafe.create_async_engine(url, policy=policy)
                    try:
                        await dropsafe.run_transaction_async(engine, unit)
                    finally:
                        await engine.dispose()

                asyncio.run(scenario())
            else:

                def unit(connection):
                    stop(connection.execute(sa.text("SELECT pg_backend_pid()")).scalar())
                    connection.execute(sa.text("SELECT 1"))

                engine = dropsafe.create_engine(url, policy=policy)
                try:
                    dropsafe.run_transaction(engine, unit)
                finally:
                    engine.dispose()
    finally:
        for pid in stopped:
            postgres_server.signal_backend(pid, signal.SIGCONT)
    elapsed = time.monotonic() - started
    assert stopped, "the backend was never stopped"
    # The deadline, within 10% (the first run holds the only budget), plus one connect timeout.
    assert elapsed <= 2 * 1.1 + 5, f"took {elapsed:.1f}s"
