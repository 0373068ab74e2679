"""What a liveness check costs on a healthy network: plain pool vs pool_pre_ping vs dropsafe.

Single-query requests (check out, SELECT 1, return) through a ChaosProxy that adds RTT, for
each driver, all variants in the same run and interleaved in rounds so that drift hits them
alike. Reported as throughput ratios to the plain pool (the baseline). Writes
benchmarks/results/checkout.md and checkout.png.

    python benchmarks/checkout_overhead.py            # 10 ms RTT, 3 rounds of 3 s
    python benchmarks/checkout_overhead.py --quick    # 1 round of 1 s
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import sqlalchemy as sa
from _common import RESULTS, Measured, machine, ratio_plot, ratio_table
from sqlalchemy.ext.asyncio import create_async_engine

import dropsafe
from dropsafe.testing import ChaosProxy, PostgresServer

DRIVERS = ("psycopg2", "psycopg", "asyncpg", "pg8000")
VARIANTS = ("plain", "pre_ping", "dropsafe")
SELECT_ONE = sa.text("SELECT 1")


def make_sync_engine(variant: str, url: str, connect_args: dict[str, object]) -> sa.Engine:
    kwargs: dict[str, object] = {"pool_size": 1, "max_overflow": 0, "connect_args": connect_args}
    if variant == "dropsafe":
        return dropsafe.create_engine(url, **kwargs)
    return sa.create_engine(url, pool_pre_ping=variant == "pre_ping", **kwargs)


def rate_sync(engine: sa.Engine, seconds: float) -> float:
    with engine.connect() as conn:  # connect outside the timed window
        conn.execute(SELECT_ONE)
    done, started = 0, time.monotonic()
    while time.monotonic() < started + seconds:
        with engine.connect() as conn:
            conn.execute(SELECT_ONE)
        done += 1
    return done / (time.monotonic() - started)


async def rate_async(variant: str, url: str, seconds: float) -> float:
    kwargs: dict[str, object] = {"pool_size": 1, "max_overflow": 0}
    if variant == "dropsafe":
        engine = dropsafe.create_async_engine(url, **kwargs)
    else:
        engine = create_async_engine(url, pool_pre_ping=variant == "pre_ping", **kwargs)
    try:
        async with engine.connect() as conn:
            await conn.execute(SELECT_ONE)
        done, started = 0, time.monotonic()
        while time.monotonic() < started + seconds:
            async with engine.connect() as conn:
                await conn.execute(SELECT_ONE)
            done += 1
        return done / (time.monotonic() - started)
    finally:
        await engine.dispose()


def measure(
    server: PostgresServer, proxy: ChaosProxy, rounds: int, seconds: float
) -> dict[tuple[str, str], Measured]:
    results = {(d, v): Measured(d, v) for d in DRIVERS for v in VARIANTS}
    for round_number in range(rounds):
        for driver in DRIVERS:
            url = proxy.route(server.url(driver))
            for variant in VARIANTS:
                if driver == "asyncpg":
                    rate = asyncio.run(rate_async(variant, url, seconds))
                else:
                    engine = make_sync_engine(variant, url, server.connect_args(driver))
                    try:
                        rate = rate_sync(engine, seconds)
                    finally:
                        engine.dispose()
                results[driver, variant].rates.append(rate)
                print(f"round {round_number + 1}/{rounds} {driver:9} {variant:9} {rate:8.1f} req/s")
    return results


def write_report(
    results: dict[tuple[str, str], Measured], rtt_ms: float, rounds: int, seconds: float, out: Path
) -> Path:
    lines = [
        "# Checkout overhead on a healthy network",
        "",
        (
            f"Single-query requests, one client, through a proxy adding {rtt_ms:g} ms RTT; "
            f"median of {rounds} round(s) of {seconds:g} s per variant, interleaved. "
            "Ratio = throughput / plain pool's throughput in the same run."
        ),
        "",
        f"Machine: {machine()}. Produced by `python benchmarks/checkout_overhead.py`.",
        "",
        *ratio_table(results, DRIVERS, VARIANTS, "req/s"),
    ]
    out.mkdir(parents=True, exist_ok=True)
    report = out / "checkout.md"
    report.write_text("\n".join(lines) + "\n")
    title = f"Single-query requests at {rtt_ms:g} ms RTT (higher is better)"
    ratio_plot(results, DRIVERS, VARIANTS, title, out / "checkout.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="one round of one second")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
        proxy.latency(args.rtt_ms / 2)
        results = measure(server, proxy, rounds, seconds)
    print(write_report(results, args.rtt_ms, rounds, seconds, args.out).read_text())


if __name__ == "__main__":
    main()
