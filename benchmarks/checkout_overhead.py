"""What a liveness check costs on a healthy network: plain pool vs pool_pre_ping vs dropsafe.

Single-query requests (check out, SELECT 1, return) through a ChaosProxy that adds RTT, for
each driver, all variants in the same run and interleaved in rounds so that drift hits them
alike. Reported as throughput ratios to the plain pool (the baseline). Writes
benchmarks/results/checkout.md and checkout.png.

    python benchmarks/checkout_overhead.py            # 10 ms RTT, 3 rounds of 3 s
    python benchmarks/checkout_overhead.py --quick    # 1 round of 1 s (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import dropsafe
from dropsafe.testing import ChaosProxy, PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable

RESULTS = Path(__file__).parent / "results"
DRIVERS = ("psycopg2", "psycopg", "asyncpg", "pg8000")
VARIANTS = ("plain", "pre_ping", "dropsafe")
SELECT_ONE = sa.text("SELECT 1")


@dataclass
class Measured:
    driver: str
    variant: str
    rates: list[float]

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def make_sync_engine(variant: str, url: str, connect_args: dict[str, object]) -> sa.Engine:
    kwargs: dict[str, object] = {"pool_size": 1, "max_overflow": 0, "connect_args": connect_args}
    if variant == "dropsafe":
        return dropsafe.create_engine(url, **kwargs)
    return sa.create_engine(url, pool_pre_ping=variant == "pre_ping", **kwargs)


def rate_sync(engine: sa.Engine, seconds: float) -> float:
    done, deadline = 0, time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
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
        async with engine.connect() as conn:  # connect outside the timed window
            await conn.execute(SELECT_ONE)
        done, deadline = 0, time.monotonic() + seconds
        started = time.monotonic()
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                await conn.execute(SELECT_ONE)
            done += 1
        return done / (time.monotonic() - started)
    finally:
        await engine.dispose()


def measure(
    server: PostgresServer,
    proxy: ChaosProxy,
    rounds: int,
    seconds: float,
    log: Callable[[str], None],
) -> list[Measured]:
    results = {(d, v): Measured(d, v, []) for d in DRIVERS for v in VARIANTS}
    for round_number in range(rounds):
        for driver in DRIVERS:
            url = proxy.route(server.url(driver))
            for variant in VARIANTS:
                if driver == "asyncpg":
                    rate = asyncio.run(rate_async(variant, url, seconds))
                else:
                    engine = make_sync_engine(variant, url, server.connect_args(driver))
                    try:
                        with engine.connect() as conn:
                            conn.execute(SELECT_ONE)
                        rate = rate_sync(engine, seconds)
                    finally:
                        engine.dispose()
                results[driver, variant].rates.append(rate)
                log(f"round {round_number + 1}/{rounds} {driver:9} {variant:9} {rate:8.1f} req/s")
    return list(results.values())


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()}"


def write_report(results: list[Measured], rtt_ms: float, rounds: int, seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    by_key = {(m.driver, m.variant): m for m in results}
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
        (
            "| driver | plain req/s | pre_ping req/s | dropsafe req/s "
            "| pre_ping ratio | dropsafe ratio |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for driver in DRIVERS:
        plain = by_key[driver, "plain"].rate
        pre = by_key[driver, "pre_ping"].rate
        guarded = by_key[driver, "dropsafe"].rate
        lines.append(
            f"| {driver} | {plain:.1f} | {pre:.1f} | {guarded:.1f} | "
            f"{pre / plain:.2f}x | {guarded / plain:.2f}x |"
        )
    (RESULTS / "checkout.md").write_text("\n".join(lines) + "\n")
    plot(by_key, rtt_ms)


def plot(by_key: dict[tuple[str, str], Measured], rtt_ms: float) -> None:
    import matplotlib  # noqa: PLC0415 - only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    for offset, variant in enumerate(VARIANTS):
        ratios = [by_key[d, variant].rate / by_key[d, "plain"].rate for d in DRIVERS]
        positions = [i + (offset - 1) * width for i in range(len(DRIVERS))]
        bars = axes.bar(positions, ratios, width, label=variant)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(range(len(DRIVERS)), DRIVERS)
    axes.set_ylabel("throughput / plain pool")
    axes.set_ylim(0, 1.35)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_title(f"Single-query requests at {rtt_ms:g} ms RTT (higher is better)")
    axes.legend(loc="upper center", ncol=len(VARIANTS))
    axes.text(0.01, 0.01, machine(), transform=axes.transAxes, fontsize=6, color="grey")
    figure.tight_layout()
    figure.savefig(RESULTS / "checkout.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="one round of one second")
    args = parser.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
        proxy.latency(args.rtt_ms / 2)
        results = measure(server, proxy, rounds, seconds, print)
    write_report(results, args.rtt_ms, rounds, seconds)
    print((RESULTS / "checkout.md").read_text())


if __name__ == "__main__":
    main()
