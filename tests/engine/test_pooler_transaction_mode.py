"""asyncpg and psycopg 3 (async engines) through PgBouncer in transaction mode, 4 processes.

The trap: in transaction mode each transaction may run on another server connection, shared
with other clients. asyncpg names its prepared statements ``__asyncpg_stmt_1__``,
``__asyncpg_stmt_2__``... per client connection, so two clients that land on the same server
connection collide (``prepared statement "__asyncpg_stmt_1__" already exists``), and a
statement cached on one server connection is missing on the next. psycopg 3 does the same
(``_pg3_0``...) with a statement run 5 times on a connection. PgBouncer 1.18 (Debian's, here)
does not track prepared statements. ``ConnectionPolicy(pooler="transaction")`` must make that
impossible; without it the same load fails (the first test shows the trap is real here).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe._drivers import async_drivers
from dropsafe.testing import PgBouncer

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(
        shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") is None,
        reason="PgBouncer is not installed (apt-get install pgbouncer)",
    ),
]

PROCESSES = 4
TASKS = 4  # concurrent sessions per process, each on its own pooled connection
ROUNDS = 25  # transactions per task
WORKER_TIMEOUT = 90.0


def _is_prepared_statement_error(text: str) -> bool:
    return "prepared statement" in text and ("already exists" in text or "does not exist" in text)


async def _load(url: str, pooler: str | None, seed: int) -> tuple[int, int, list[str]]:
    """Run ROUNDS transactions in each of TASKS sessions; count successes and the errors."""
    engine = dropsafe.create_async_engine(
        url,
        policy=dropsafe.Policy(connection=dropsafe.ConnectionPolicy(pooler=pooler), hooks=()),
        pool_size=TASKS,
        max_overflow=0,
    )
    done = 0
    failures: list[str] = []

    async def task(number: int) -> None:
        nonlocal done
        for round_ in range(ROUNDS):
            try:
                async with engine.begin() as conn:
                    # Statements with parameters: asyncpg prepares each one (named).
                    value = seed * 10_000 + number * 100 + round_
                    got = await conn.scalar(sa.text("SELECT CAST(:v AS int) + 1"), {"v": value})
                    assert got == value + 1
                    await conn.scalar(sa.text("SELECT CAST(:t AS text) || 'x'"), {"t": "a"})
                done += 1
            except Exception as exc:  # each failure is counted, the load goes on
                failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0])

    try:
        await asyncio.gather(*(task(n) for n in range(TASKS)))
    finally:
        await engine.dispose()
    prepared = sum(1 for text in failures if _is_prepared_statement_error(text))
    return done, prepared, failures


def _worker(arguments: tuple[str, str | None, int]) -> tuple[int, int, list[str]]:
    url, pooler, seed = arguments
    return asyncio.run(_load(url, pooler, seed))


def _run_processes(url: str, pooler: str | None) -> tuple[int, int, list[str]]:
    """Run the load in PROCESSES processes at once (spawned: no state shared with pytest)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        pending = pool.map_async(_worker, [(url, pooler, seed) for seed in range(PROCESSES)])
        results = pending.get(timeout=WORKER_TIMEOUT)
    done = sum(result[0] for result in results)
    prepared = sum(result[1] for result in results)
    failures = [text for result in results for text in result[2]]
    return done, prepared, failures


@pytest.mark.slow
@pytest.mark.shares_server
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "pooler", [None, "transaction"], ids=["without-the-setting", "pooler-transaction"]
)
@pytest.mark.parametrize("driver", async_drivers())
def test_prepared_statements_collide_unless_pooler_is_transaction(postgres_server, driver, pooler):
    with PgBouncer(postgres_server, pool_mode="transaction") as bouncer:
        done, prepared, failures = _run_processes(bouncer.url(driver), pooler)
    print(f"pooler={pooler!r} ({driver}): {done} transactions done, {prepared} errors")
    if pooler is None:  # the trap shows
        assert prepared > 0, f"the trap did not show: {failures[:3]}"
    else:  # and the setting closes it
        assert prepared == 0, failures[:3]
        assert failures == []
        assert done == PROCESSES * TASKS * ROUNDS
