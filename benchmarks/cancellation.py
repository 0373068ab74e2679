"""Cancellation during COMMIT: ``python benchmarks/cancellation.py [--runs N]``.

A unit of work writes one row, and its COMMIT takes 3 s on the server (a deferred constraint
trigger that sleeps); the caller cancels it 1.5 s after it started, so the cancel lands while
the COMMIT is in flight. For asyncpg and psycopg 3, cancelled by ``asyncio.wait_for``, anyio's
``fail_after`` and ``asyncio.wait_for`` under uvloop, through plain SQLAlchemy
(``AsyncSession.commit``) and through dropsafe (``run_transaction_async``), it reports:

- what the caller got (the exception's type);
- how long the cancel took to be honoured (from the start; the timeout is 1.5 s);
- whether the row exists once every COMMIT has ended on the server (the caller cannot know).

Writes a Markdown table to stdout (benchmarks/results/CANCELLATION.md keeps one run).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

import dropsafe
from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

COMMIT_SECONDS = 3.0
TIMEOUT = 1.5
SCHEMA = f"""
CREATE TABLE ledger (v int NOT NULL);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_sleep({COMMIT_SECONDS}); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
_values = itertools.count(1)


async def _write_plain(engine: sa.ext.asyncio.AsyncEngine, value: int) -> None:
    async with AsyncSession(engine) as session:
        await session.execute(sa.text(f"INSERT INTO ledger VALUES ({value})"))  # noqa: S608 - an int
        await session.commit()


async def _write_dropsafe(engine: sa.ext.asyncio.AsyncEngine, value: int) -> None:
    async def unit(session: AsyncSession) -> None:
        await session.execute(sa.text(f"INSERT INTO ledger VALUES ({value})"))  # noqa: S608 - an int

    await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)


async def _with_wait_for(work: Awaitable[None]) -> None:
    await asyncio.wait_for(work, TIMEOUT)


async def _with_fail_after(work: Awaitable[None]) -> None:
    with anyio.fail_after(TIMEOUT):
        await work


def _one(
    server: PostgresServer,
    driver: str,
    canceller: str,
    variant: str,
) -> tuple[str, float, bool]:
    value = next(_values)
    make = dropsafe.create_async_engine if variant == "dropsafe" else create_async_engine
    write = _write_dropsafe if variant == "dropsafe" else _write_plain
    cancel: Callable[[Awaitable[None]], Awaitable[None]] = (
        _with_fail_after if canceller == "anyio fail_after" else _with_wait_for
    )

    async def scenario() -> tuple[str, float]:
        engine = make(server.url(driver))
        started = time.monotonic()
        try:
            await cancel(write(engine, value))
            outcome = "returned"
        except BaseException as exc:  # noqa: BLE001 - the table names it
            outcome = type(exc).__name__
        elapsed = time.monotonic() - started
        await engine.dispose()
        return outcome, elapsed

    if canceller == "uvloop wait_for":
        import uvloop  # optional, only for this row

        outcome, elapsed = uvloop.run(scenario())
    else:
        outcome, elapsed = asyncio.run(scenario())
    # The server finishes (or aborts) the COMMIT on its own: wait for it before counting.
    until = time.monotonic() + 30
    while time.monotonic() < until and server.execute(
        "SELECT 1 FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' AND state = 'active'"
    ):
        time.sleep(0.1)
    rows = int(server.execute(f"SELECT count(*) FROM ledger WHERE v = {value}")[0][0])  # noqa: S608
    return outcome, elapsed, rows == 1


def main() -> None:
    """Run every cell ``--runs`` times; print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(
        f"| driver | cancelled by | engine | caller got | time to cancel (s, timeout "
        f"{TIMEOUT:g}) | row committed |\n|---|---|---|---|---|---|"
    )
    with PostgresServer() as server:
        server.execute(SCHEMA)
        for driver, canceller, variant in itertools.product(
            ("asyncpg", "psycopg"),
            ("asyncio wait_for", "anyio fail_after", "uvloop wait_for"),
            ("plain", "dropsafe"),
        ):
            results = [_one(server, driver, canceller, variant) for _ in range(args.runs)]
            outcomes = Counter(outcome for outcome, _, _ in results)
            times = [elapsed for _, elapsed, _ in results]
            committed = sum(row for _, _, row in results)
            print(
                f"| {driver} | {canceller} | {variant} | "
                + ", ".join(f"{name} {count}" for name, count in outcomes.items())
                + f" | {min(times):.2f}-{max(times):.2f} (median "
                f"{statistics.median(times):.2f}) | {committed} of {len(results)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
