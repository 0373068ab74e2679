"""A database that accepts connections only after some seconds (a serverless one resuming) is
waited for within the unit's deadline, and the wait uses none of its attempts.

Two shapes of resume: connections refused until the server is up (nothing listens yet), and
connections accepted by a proxy that passes nothing on until the compute is up (what a
serverless front end does while it resumes), each connect timing out until it is. The unit runs
with ``max_attempts=1``: only a wait that spends no attempt gets through. The resume is a timer
(the fault's schedule); the test waits on the unit's own result, bounded by its deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe.events import RetryScheduled
from dropsafe.testing import ChaosProxy

RESUME_AFTER = 4.0  # refused for this long
HELD_FOR = 15.0  # accepted but silent this long (Aurora Serverless v2 resumes in ~15 s)
DEADLINE = 25.0


def _policy(events: list[object]) -> dropsafe.Policy:
    return dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(connect_timeout=2),
        unit=dropsafe.UnitPolicy(max_attempts=1, deadline=DEADLINE),
        hooks=(events.append,),
    )


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_a_server_that_starts_listening_late_is_waited_for(postgres_server):
    events: list[object] = []
    engine = dropsafe.create_engine(postgres_server.url("psycopg2"), policy=_policy(events))
    postgres_server.stop("fast")
    resume = threading.Timer(RESUME_AFTER, postgres_server.start)
    try:
        started = time.monotonic()
        resume.start()
        value = dropsafe.run_transaction(engine, lambda c: c.execute(sa.text("SELECT 42")).scalar())
        elapsed = time.monotonic() - started
    finally:
        resume.join(timeout=60)
        engine.dispose()
    print(f"answered after {elapsed:.1f} s (refused for {RESUME_AFTER} s)")
    assert value == 42
    assert RESUME_AFTER <= elapsed < DEADLINE
    # The wait was retries of the connect, none of them an attempt of the unit.
    assert any(isinstance(event, RetryScheduled) for event in events)


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
async def test_a_front_end_that_holds_connections_while_resuming_is_waited_for(postgres_server):
    events: list[object] = []
    with ChaosProxy(postgres_server.host, postgres_server.port) as proxy:
        engine = dropsafe.create_async_engine(
            proxy.route(postgres_server.url("asyncpg")), policy=_policy(events)
        )
        proxy.blackhole()  # connections are accepted, and nothing passes
        resume = threading.Timer(HELD_FOR, proxy.heal)

        async def unit(conn):
            return (await conn.execute(sa.text("SELECT 42"))).scalar()

        try:
            started = time.monotonic()
            resume.start()
            value = await dropsafe.run_transaction_async(engine, unit)
            elapsed = time.monotonic() - started
        finally:
            await asyncio.to_thread(resume.join, 60)
            await engine.dispose()
    print(f"answered after {elapsed:.1f} s (held for {HELD_FOR} s)")
    assert value == 42
    assert HELD_FOR <= elapsed < DEADLINE
    assert sum(isinstance(event, RetryScheduled) for event in events) >= 2  # connect timeouts
