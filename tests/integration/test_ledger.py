"""Jepsen-style ledger: concurrent writers, a nemesis breaking connections mid-COMMIT, an audit.

Workers insert rows tagged with fresh op ids (no unique constraint, so a unit of work that
runs twice leaves two rows). COMMIT is made slow by a deferred constraint trigger, so that
cuts land while COMMITs are in flight. The nemesis cuts connections (FIN and RST),
terminates backends and restarts the server. The audit then checks: no acknowledged op is
missing, none is duplicated, almost every attempted op was acknowledged, and ambiguous
COMMITs were really met and resolved. The same schedule against the loop careful teams
write today (pre_ping, retry on disconnect) duplicates ops: the test has teeth.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.events import CommitResolved

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(180)]

WORKERS = 4
RUN_SECONDS = 6.0
MAX_OPS_PER_WORKER = 400
COMMIT_SLEEP = 0.05
INSERT = sa.text("INSERT INTO ledger (op_id) VALUES (:op_id)")
SCHEMA = f"""
CREATE TABLE ledger (op_id text NOT NULL, written_at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep({COMMIT_SLEEP}); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
# The chaos a policy for this test tolerates: many faults a second, for seconds.
CHAOS_POLICY = {"max_attempts": 30, "deadline": 60, "backoff_max": 0.5}


@dataclass
class Ledger:
    attempted: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    resolved: list[CommitResolved] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)

    def hook(self, event):
        if isinstance(event, CommitResolved):
            self.resolved.append(event)

    def audit(self, server):
        rows = Counter(
            {
                op: int(n)
                for op, n in server.execute("SELECT op_id, count(*) FROM ledger GROUP BY 1")
            }
        )
        lost = [op for op in self.acknowledged if rows[op] == 0]
        duplicated = [op for op, n in rows.items() if n > 1]
        return lost, duplicated


class Nemesis(threading.Thread):
    """Breaks connections on a seeded schedule until told to stop; bounded in time."""

    def __init__(self, server, proxy, ledger, seed):
        super().__init__(name="nemesis", daemon=True)
        self.server, self.proxy, self.ledger = server, proxy, ledger
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.error = None

    def run(self):
        faults = ["cut-rst"] * 4 + ["cut-fin"] * 4 + ["terminate"] * 2 + ["restart"]
        restart_modes = ["fast", "immediate"]
        deadline = time.monotonic() + 2 * RUN_SECONDS
        restarts = 0
        try:
            # The pause paces the fault schedule; it synchronises nothing.
            while not self.stop.wait(self.rng.uniform(0.15, 0.35)):
                if time.monotonic() > deadline:
                    break
                fault = self.rng.choice(faults)
                if fault == "restart":
                    if restarts >= len(restart_modes):
                        continue
                    fault = f"restart-{restart_modes[restarts]}"
                    restarts += 1
                    self.server.restart(fault.removeprefix("restart-"))
                elif fault == "terminate":
                    self.server.terminate_backends(database="postgres")
                else:
                    self.proxy.cut(fault.removeprefix("cut-"))
                self.ledger.faults[fault] += 1
        except Exception as exc:
            self.error = exc


def _prepare(server):
    server.execute(SCHEMA)


def _run_sync(server, proxy, unit_of_work_factory, seed):
    ledger = Ledger()
    unit_of_work = unit_of_work_factory(ledger)
    nemesis = Nemesis(server, proxy, ledger, seed)
    stop_at = time.monotonic() + RUN_SECONDS
    lock = threading.Lock()

    def worker(number):
        for n in range(MAX_OPS_PER_WORKER):
            if time.monotonic() > stop_at:
                return
            op_id = f"{seed}-{number}-{n}"
            with lock:
                ledger.attempted.append(op_id)
            try:
                unit_of_work(op_id)
            except Exception:
                with lock:
                    ledger.failed.append(op_id)
            else:
                with lock:
                    ledger.acknowledged.append(op_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    nemesis.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    nemesis.stop.set()
    nemesis.join(timeout=60)
    assert nemesis.error is None, nemesis.error
    assert not any(thread.is_alive() for thread in threads)
    return ledger


async def _run_async(server, proxy, unit_of_work_factory, seed):
    ledger = Ledger()
    unit_of_work = unit_of_work_factory(ledger)
    nemesis = Nemesis(server, proxy, ledger, seed)
    stop_at = time.monotonic() + RUN_SECONDS

    async def worker(number):
        for n in range(MAX_OPS_PER_WORKER):
            if time.monotonic() > stop_at:
                return
            op_id = f"{seed}-{number}-{n}"
            ledger.attempted.append(op_id)
            try:
                await unit_of_work(op_id)
            except Exception:
                ledger.failed.append(op_id)
            else:
                ledger.acknowledged.append(op_id)

    nemesis.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(WORKERS))), 120)
    finally:
        nemesis.stop.set()
        await asyncio.to_thread(nemesis.join, 60)
    assert nemesis.error is None, nemesis.error
    return ledger


def _summary(ledger, lost, duplicated):
    outcomes = Counter(event.outcome for event in ledger.resolved)
    return (
        f"attempted {len(ledger.attempted)}, acknowledged {len(ledger.acknowledged)}, "
        f"lost {len(lost)}, duplicated {len(duplicated)}, resolved {dict(outcomes)}, "
        f"faults {dict(ledger.faults)}"
    )


def _assert_safe(ledger, server):
    lost, duplicated = ledger.audit(server)
    print(_summary(ledger, lost, duplicated))  # shown with -s, and in the log of a failure
    assert sum(ledger.faults.values()) >= 10, ledger.faults
    assert lost == [], f"acknowledged ops missing: {lost[:10]}"
    assert duplicated == [], f"ops written twice: {duplicated[:10]}"
    assert len(ledger.acknowledged) >= 0.99 * len(ledger.attempted), (
        f"{len(ledger.acknowledged)} of {len(ledger.attempted)} acknowledged; "
        f"failed: {ledger.failed[:5]}"
    )
    outcomes = Counter(event.outcome for event in ledger.resolved)
    assert outcomes["committed"] > 0, f"no ambiguous COMMIT met and resolved: {outcomes}"


# -- dropsafe ------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_sync_ledger_loses_and_duplicates_nothing(postgres_server, chaos_proxy, driver):
    _prepare(postgres_server)

    def factory(ledger):
        policy = dropsafe.Policy(hooks=(ledger.hook,), **CHAOS_POLICY)
        engine = dropsafe.create_engine(
            chaos_proxy.route(postgres_server.url(driver)),
            policy=policy,
            pool_size=WORKERS,
            max_overflow=WORKERS,
        )
        session_factory = sessionmaker(engine)
        factory.engine = engine
        return lambda op_id: dropsafe.run_transaction(
            session_factory, lambda session: session.execute(INSERT, {"op_id": op_id})
        )

    try:
        ledger = _run_sync(postgres_server, chaos_proxy, factory, seed=11)
    finally:
        factory.engine.dispose()
    _assert_safe(ledger, postgres_server)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_async_ledger_loses_and_duplicates_nothing(postgres_server, chaos_proxy, driver):
    _prepare(postgres_server)

    async def scenario():
        engines = []

        def factory(ledger):
            policy = dropsafe.Policy(hooks=(ledger.hook,), **CHAOS_POLICY)
            engine = dropsafe.create_async_engine(
                chaos_proxy.route(postgres_server.url(driver)),
                policy=policy,
                pool_size=WORKERS,
                max_overflow=WORKERS,
            )
            engines.append(engine)
            session_factory = async_sessionmaker(engine)

            async def insert(session, op_id):
                await session.execute(INSERT, {"op_id": op_id})

            return lambda op_id: dropsafe.run_transaction_async(
                session_factory, lambda session: insert(session, op_id)
            )

        try:
            return await _run_async(postgres_server, chaos_proxy, factory, seed=12)
        finally:
            for engine in engines:
                await engine.dispose()

    _assert_safe(asyncio.run(scenario()), postgres_server)


# -- the naive loop, for contrast ----------------------------------------------------------


def _naive_sync(session_factory, op_id):
    """What careful teams write today: pre_ping, and run again after a disconnect."""
    for _ in range(30):
        try:
            with session_factory() as session, session.begin():
                session.execute(INSERT, {"op_id": op_id})
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                continue
            raise
        return
    raise RuntimeError("gave up")


@pytest.mark.parametrize("driver", ["psycopg2"])
def test_naive_retry_loop_writes_twice(postgres_server, chaos_proxy, driver):
    _prepare(postgres_server)
    engine = sa.create_engine(
        chaos_proxy.route(postgres_server.url(driver)),
        pool_pre_ping=True,
        pool_size=WORKERS,
        max_overflow=WORKERS,
    )
    session_factory = sessionmaker(engine)
    try:
        ledger = _run_sync(
            postgres_server, chaos_proxy, lambda _: lambda op: _naive_sync(session_factory, op), 11
        )
    finally:
        engine.dispose()
    lost, duplicated = ledger.audit(postgres_server)
    print(_summary(ledger, lost, duplicated))
    assert duplicated, "the naive loop should have written some ops twice"


def test_naive_async_retry_loop_writes_twice(postgres_server, chaos_proxy):
    _prepare(postgres_server)

    async def scenario():
        engine = create_async_engine(
            chaos_proxy.route(postgres_server.url("asyncpg")),
            pool_pre_ping=True,
            pool_size=WORKERS,
            max_overflow=WORKERS,
        )
        session_factory = async_sessionmaker(engine)

        async def naive(op_id):
            for _ in range(30):
                try:
                    async with session_factory() as session, session.begin():
                        await session.execute(INSERT, {"op_id": op_id})
                except sa.exc.DBAPIError as exc:
                    if exc.connection_invalidated:
                        continue
                    raise
                return
            raise RuntimeError("gave up")

        try:
            return await _run_async(postgres_server, chaos_proxy, lambda _: naive, 12)
        finally:
            await engine.dispose()

    ledger = asyncio.run(scenario())
    lost, duplicated = ledger.audit(postgres_server)
    print(_summary(ledger, lost, duplicated))
    assert duplicated, "the naive loop should have written some ops twice"
