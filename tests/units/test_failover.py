"""Failover on plain PostgreSQL: a synchronous standby promoted while writers keep writing.

Writers insert op ids through run_transaction on a multi-host URL (primary, standby;
target_session_attrs=read-write). The primary is stopped or vanishes (its packets dropped in
the kernel) and the standby is promoted. Checked: how soon writes succeed after the promotion,
that no acknowledged write is missing on the new primary and none is written twice. A COMMIT
whose outcome cannot be known after the switch may raise CommitOutcomeUnknown, never a guess.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe._classify import sqlstate_of
from dropsafe.testing import PostgresServer, multi_host_url

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(150)]

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]
WRITERS = 3
INSERT = sa.text("INSERT INTO ledger (op_id) VALUES (:op_id)")
SERVER_PORT = sa.text("SELECT inet_server_port()")


@dataclass
class Writes:
    acknowledged: dict[str, float] = field(default_factory=dict)  # op id -> when
    unknown: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cleanup: object = None  # disposes the writers' engine once they stopped

    def record(self, op_id, error):
        with self.lock:
            if error is None:
                self.acknowledged[op_id] = time.monotonic()
            elif isinstance(error, dropsafe.CommitOutcomeUnknown):
                self.unknown.append(op_id)
            else:
                self.failed.append(op_id)

    def acked_after(self, moment):
        with self.lock:
            return sorted(t for t in self.acknowledged.values() if t > moment)

    def wait_for_acks(self, count, after, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.acked_after(after)) >= count:
                return self.acked_after(after)
            time.sleep(0.01)
        raise AssertionError(f"fewer than {count} writes acknowledged in {timeout}s")


def _start_writers(url, driver, writes):
    """Writers in threads (sync drivers) or tasks in a thread's loop (asyncpg)."""
    if driver == "asyncpg":

        async def main():
            engine = dropsafe.create_async_engine(url)
            session_factory = async_sessionmaker(engine)

            async def insert(session, op_id):
                await session.execute(INSERT, {"op_id": op_id})

            async def writer(number):
                for n in range(100_000):
                    if writes.stop.is_set():
                        return
                    op_id = f"{number}-{n}"
                    try:
                        await dropsafe.run_transaction_async(
                            session_factory, lambda s, op_id=op_id: insert(s, op_id)
                        )
                    except Exception as exc:
                        writes.record(op_id, exc)
                    else:
                        writes.record(op_id, None)

            try:
                await asyncio.gather(*(writer(i) for i in range(WRITERS)))
            finally:
                await engine.dispose()

        threads = [threading.Thread(target=asyncio.run, args=(main(),), daemon=True)]
        writes.cleanup = lambda: None
    else:
        engine = dropsafe.create_engine(url)
        session_factory = sessionmaker(engine)

        def writer(number):
            for n in range(100_000):
                if writes.stop.is_set():
                    return
                op_id = f"{number}-{n}"
                try:
                    dropsafe.run_transaction(
                        session_factory, lambda s, op_id=op_id: s.execute(INSERT, {"op_id": op_id})
                    )
                except Exception as exc:
                    writes.record(op_id, exc)
                else:
                    writes.record(op_id, None)

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(WRITERS)]
        writes.cleanup = engine.dispose
    for thread in threads:
        thread.start()
    return threads


def _stop_writers(writes, threads):
    writes.stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    writes.cleanup()


def _audit(writes, new_primary):
    rows = Counter(
        {
            op: int(n)
            for op, n in new_primary.execute("SELECT op_id, count(*) FROM ledger GROUP BY 1")
        }
    )
    missing = [op for op in writes.acknowledged if rows[op] == 0]
    duplicated = [op for op, n in rows.items() if n > 1]
    assert missing == [], f"acknowledged writes missing on the new primary: {missing[:10]}"
    assert duplicated == [], f"writes applied twice: {duplicated[:10]}"
    # Writers retry through the switch: nothing but an honest "unknown" may fail.
    assert writes.failed == [], writes.failed[:10]


@pytest.fixture
def pair(postgres_server):
    postgres_server.execute("CREATE TABLE ledger (op_id text NOT NULL)")
    standby = postgres_server.make_standby(synchronous=True)
    yield postgres_server, standby
    standby.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_primary_stopped_then_standby_promoted(pair, driver):
    primary, standby = pair
    writes = Writes()
    threads = _start_writers(multi_host_url([primary, standby], driver), driver, writes)
    try:
        writes.wait_for_acks(20, after=0, timeout=30)
        primary.stop("immediate")
        standby.promote()
        promoted_at = time.monotonic()
        first = writes.wait_for_acks(20, after=promoted_at, timeout=30)[0]
    finally:
        _stop_writers(writes, threads)
    print(
        f"{driver}: first write {first - promoted_at:.2f}s after promotion; "
        f"{len(writes.acknowledged)} acknowledged, {len(writes.unknown)} unknown"
    )
    assert first - promoted_at <= 2.0
    _audit(writes, standby)


@pytest.mark.parametrize("driver", DRIVERS)
def test_primary_vanishes_then_standby_promoted(pair, driver, kernel_blackhole):
    primary, standby = pair
    writes = Writes()
    threads = _start_writers(multi_host_url([primary, standby], driver), driver, writes)
    try:
        writes.wait_for_acks(20, after=0, timeout=30)
        with kernel_blackhole(primary.port):
            standby.promote()
            promoted_at = time.monotonic()
            first = writes.wait_for_acks(20, after=promoted_at, timeout=40)[0]
            _stop_writers(writes, threads)
    finally:
        _stop_writers(writes, threads)
    print(
        f"{driver}: first write {first - promoted_at:.2f}s after promotion; "
        f"{len(writes.acknowledged)} acknowledged, {len(writes.unknown)} unknown"
    )
    # Writes in flight on the vanished primary end at tcp_user_timeout (10 s); the connects
    # that follow skip the host that timed out instead of spending connect_timeout (5 s) there
    # first (15.4-15.6 s before, issue 27 item 4).
    assert first - promoted_at <= 13.0
    _audit(writes, standby)


@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_a_primary_made_read_only_by_its_settings_is_not_a_failover(driver):
    # default_transaction_read_only on a primary (not in recovery) is a setting, not a
    # failover: the unit fails once with the server's 25006 and the pool is not recycled.
    with PostgresServer() as first, PostgresServer() as second:
        for server in (first, second):
            server.execute("CREATE TABLE ledger (op_id text NOT NULL)")
        url = multi_host_url([first, second], driver)

        def turn_first_read_only():
            first.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            first.execute("SELECT pg_reload_conf()")

        if driver == "asyncpg":
            ports, error, calls = asyncio.run(_read_only_async(url, turn_first_read_only))
        else:
            ports, error, calls = _read_only_sync(url, turn_first_read_only)
        assert ports == {first.port}
        assert isinstance(error, sa.exc.DBAPIError)
        assert sqlstate_of(error) == "25006"
        assert calls == 1, "a read-only setting is not retried"
        assert first.execute("SELECT count(*) FROM ledger") == [("3",)]
        assert second.execute("SELECT count(*) FROM ledger") == [("0",)]


def _read_only_sync(url, turn_first_read_only):
    engine = dropsafe.create_engine(url, pool_size=3, max_overflow=0)
    session_factory = sessionmaker(engine)
    calls = []

    def write(session):
        calls.append(1)
        session.execute(INSERT, {"op_id": "x"})
        return session.execute(SERVER_PORT).scalar()

    try:
        with dropsafe.test_mode():
            before = {dropsafe.run_transaction(session_factory, write) for _ in range(3)}
            turn_first_read_only()
            calls.clear()
            # The reload reaches the backends asynchronously: wait until it shows.
            _wait_read_only(lambda: dropsafe.run_transaction(session_factory, _read_only))
            with pytest.raises(sa.exc.DBAPIError) as caught:
                dropsafe.run_transaction(session_factory, write)
    finally:
        engine.dispose()
    return before, caught.value, len(calls)


async def _read_only_async(url, turn_first_read_only):
    engine = dropsafe.create_async_engine(url, pool_size=3, max_overflow=0)
    session_factory = async_sessionmaker(engine)
    calls = []

    async def write(session):
        calls.append(1)
        await session.execute(INSERT, {"op_id": "x"})
        return (await session.execute(SERVER_PORT)).scalar()

    async def read_only(session):
        return (await session.execute(READ_ONLY)).scalar()

    try:
        with dropsafe.test_mode():
            before = {
                await dropsafe.run_transaction_async(session_factory, write) for _ in range(3)
            }
            await asyncio.to_thread(turn_first_read_only)
            deadline = time.monotonic() + 30
            while await dropsafe.run_transaction_async(session_factory, read_only) != "on":
                assert time.monotonic() < deadline, "the server never turned read-only"
                await asyncio.sleep(0.01)
            calls.clear()
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await dropsafe.run_transaction_async(session_factory, write)
    finally:
        await engine.dispose()
    return before, caught.value, len(calls)


READ_ONLY = sa.text("SHOW transaction_read_only")


def _read_only(session):
    return session.execute(READ_ONLY).scalar()


def _wait_read_only(read):
    deadline = time.monotonic() + 30
    while read() != "on":
        assert time.monotonic() < deadline, "the server never turned read-only"
        time.sleep(0.01)
