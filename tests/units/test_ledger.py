"""Jepsen-style ledger: concurrent writers, a nemesis breaking connections mid-COMMIT, an audit.

Workers insert rows tagged with fresh op ids (no unique constraint, so a unit of work that
runs twice leaves two rows). COMMIT is made slow by a deferred constraint trigger, so that
cuts land while COMMITs are in flight. The nemesis matrix: cuts (FIN and RST), terminated
backends, fast and immediate restarts, crash restarts (a backend SIGKILLed), and a failover to
a synchronous standby behind the same endpoint; for psycopg2, psycopg 3 and asyncpg, with the
op written by the unit or by a ``before_commit`` hook. The audit then checks: no acknowledged
op is missing, none is duplicated, unknown outcomes only where a crash or failover made them
unknowable, almost every other op acknowledged, and ambiguous COMMITs really met and resolved.
The same schedule against the loop careful teams write today (pre_ping, retry on disconnect)
duplicates ops: the test has teeth. benchmarks/nemesis.py runs the long version.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from ledger import (
    INSERT,
    WORKERS,
    assert_safe,
    failover_faults,
    prepare,
    run_async,
    run_sync,
    server_faults,
    summary,
)
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from dropsafe._bench._ledger import guarded_writers, guarded_writers_async, insert_naively
from dropsafe.testing import ChaosProxy

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(180)]


# -- dropsafe ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "write_at_commit"), [("psycopg2", False), ("psycopg", True), ("psycopg2", True)]
)
def test_sync_ledger_loses_and_duplicates_nothing(
    postgres_server, chaos_proxy, driver, write_at_commit
):
    prepare(postgres_server)

    engines = []
    url = chaos_proxy.route(postgres_server.url(driver))
    factory = guarded_writers(url, engines, write_at_commit=write_at_commit)
    try:
        ledger = run_sync(server_faults(postgres_server, chaos_proxy), factory, seed=11)
    finally:
        for engine in engines:
            engine.dispose()
    assert_safe(ledger, postgres_server)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_async_ledger_loses_and_duplicates_nothing(postgres_server, chaos_proxy, driver):
    prepare(postgres_server)

    async def scenario():
        engines = []
        url = chaos_proxy.route(postgres_server.url(driver))
        factory = guarded_writers_async(url, engines)
        try:
            return await run_async(server_faults(postgres_server, chaos_proxy), factory, seed=12)
        finally:
            for engine in engines:
                await engine.dispose()

    assert_safe(asyncio.run(scenario()), postgres_server)


@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
def test_ledger_through_a_failover_loses_and_duplicates_nothing(postgres_server, driver):
    prepare(postgres_server)
    standby = postgres_server.make_standby(synchronous=True)
    try:
        with ChaosProxy(postgres_server.host, postgres_server.port) as proxy:
            faults = failover_faults(postgres_server, standby, proxy)
            url = proxy.route(postgres_server.url(driver))
            engines = []
            if driver == "asyncpg":

                async def scenario():
                    try:
                        factory = guarded_writers_async(url, engines)
                        return await run_async(faults, factory, seed=13)
                    finally:
                        for engine in engines:
                            await engine.dispose()

                ledger = asyncio.run(scenario())
            else:
                try:
                    ledger = run_sync(faults, guarded_writers(url, engines), seed=13)
                finally:
                    for engine in engines:
                        engine.dispose()
        assert ledger.faults["failover"] == 1, ledger.faults
        assert_safe(ledger, standby)
    finally:
        standby.close()


# -- the naive loop, for contrast ----------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg2"])
def test_naive_retry_loop_writes_twice(postgres_server, chaos_proxy, driver):
    prepare(postgres_server)
    engine = sa.create_engine(
        chaos_proxy.route(postgres_server.url(driver)),
        pool_pre_ping=True,
        pool_size=WORKERS,
        max_overflow=WORKERS,
    )
    try:
        ledger = run_sync(
            server_faults(postgres_server, chaos_proxy),
            lambda _: lambda op: insert_naively(engine, op),
            11,
        )
    finally:
        engine.dispose()
    lost, duplicated = ledger.audit(postgres_server)
    print(summary(ledger, lost, duplicated))
    assert duplicated, "the naive loop should have written some ops twice"


def test_naive_async_retry_loop_writes_twice(postgres_server, chaos_proxy):
    prepare(postgres_server)

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
            return await run_async(server_faults(postgres_server, chaos_proxy), lambda _: naive, 12)
        finally:
            await engine.dispose()

    ledger = asyncio.run(scenario())
    lost, duplicated = ledger.audit(postgres_server)
    print(summary(ledger, lost, duplicated))
    assert duplicated, "the naive loop should have written some ops twice"
