"""What the ambiguous-commit guard costs: small write transactions, verification on and off.

Each transaction inserts one row and commits. Variants, all in the same run and interleaved:
``plain`` (a plain SQLAlchemy session, no retries: the baseline), ``unverified``
(run_transaction with Policy(verify_commits=False)) and ``verified`` (the default: one extra
round trip reads the xid before COMMIT). Writes benchmarks/results/commit_verification.md
and .png.

    python benchmarks/commit_verification.py            # 0 and 10 ms RTT, 3 rounds of 3 s
    python benchmarks/commit_verification.py --quick    # 10 ms only, 1 round of 1 s
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import sqlalchemy as sa
from _common import RESULTS, Measured, machine, ratio_plot, ratio_table
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.testing import ChaosProxy, PostgresServer

DRIVERS = ("psycopg2", "psycopg", "asyncpg")
VARIANTS = ("plain", "unverified", "verified")
INSERT = sa.text("INSERT INTO bench (v) VALUES (1)")


def rate_sync(engine: sa.Engine, variant: str, seconds: float) -> float:
    session_factory = sessionmaker(engine)
    policy = dropsafe.Policy(verify_commits=variant == "verified")

    def one() -> None:
        if variant == "plain":
            with session_factory() as session, session.begin():
                session.execute(INSERT)
        else:
            dropsafe.run_transaction(session_factory, lambda s: s.execute(INSERT), policy=policy)

    one()  # connect outside the timed window
    done, started = 0, time.monotonic()
    while time.monotonic() < started + seconds:
        one()
        done += 1
    return done / (time.monotonic() - started)


async def rate_async(engine: AsyncEngine, variant: str, seconds: float) -> float:
    session_factory = async_sessionmaker(engine)
    policy = dropsafe.Policy(verify_commits=variant == "verified")

    async def insert(session: object) -> None:
        await session.execute(INSERT)  # type: ignore[attr-defined]

    async def one() -> None:
        if variant == "plain":
            async with session_factory() as session, session.begin():
                await session.execute(INSERT)
        else:
            await dropsafe.run_transaction_async(session_factory, insert, policy=policy)

    await one()
    done, started = 0, time.monotonic()
    while time.monotonic() < started + seconds:
        await one()
        done += 1
    return done / (time.monotonic() - started)


def measure(
    url_for: dict[str, str], rounds: int, seconds: float
) -> dict[tuple[str, str], Measured]:
    results = {(d, v): Measured(d, v) for d in DRIVERS for v in VARIANTS}
    for round_number in range(rounds):
        for driver in DRIVERS:
            for variant in VARIANTS:
                if driver == "asyncpg":

                    async def run(variant: str = variant, url: str = url_for[driver]) -> float:
                        engine = create_async_engine(url, pool_size=1)
                        try:
                            return await rate_async(engine, variant, seconds)
                        finally:
                            await engine.dispose()

                    rate = asyncio.run(run())
                else:
                    engine = sa.create_engine(url_for[driver], pool_size=1)
                    try:
                        rate = rate_sync(engine, variant, seconds)
                    finally:
                        engine.dispose()
                results[driver, variant].rates.append(rate)
                print(f"round {round_number + 1}/{rounds} {driver:9} {variant:10} {rate:8.1f} tx/s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="10 ms only, one round of 1 s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    rtts = (10.0,) if args.quick else (0.0, 10.0)
    lines = [
        "# Cost of the ambiguous-commit guard",
        "",
        (
            "Small write transactions (one INSERT, COMMIT), one client; median of "
            f"{rounds} round(s) of {seconds:g} s per variant, interleaved. `plain` is a plain "
            "SQLAlchemy session (the baseline); `unverified` is run_transaction with "
            "verify_commits=False; `verified` is the default, which reads the xid before COMMIT."
        ),
        "",
        f"Machine: {machine()}. Produced by `python benchmarks/commit_verification.py`.",
    ]
    with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
        server.execute("CREATE TABLE bench (v int)")
        for rtt in rtts:
            proxy.latency(rtt / 2)
            urls = {driver: proxy.route(server.url(driver)) for driver in DRIVERS}
            results = measure(urls, rounds, seconds)
            lines += [
                "",
                f"## {rtt:g} ms RTT",
                "",
                *ratio_table(results, DRIVERS, VARIANTS, "tx/s"),
            ]
            title = f"Write transactions at {rtt:g} ms RTT (higher is better)"
            ratio_plot(
                results, DRIVERS, VARIANTS, title, args.out / f"commit_verification_{rtt:g}ms.png"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "commit_verification.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())


if __name__ == "__main__":
    main()
