"""What recording a transaction for its replay costs the healthy path, per driver.

Three engines per driver against one throwaway PostgresServer: ``plain`` (SQLAlchemy alone),
``off`` (hardened, the transaction replay off: the default) and ``recording``
(``PoolPolicy(replay_transaction=True)``). Two requests, each one transaction on a pool of one:
``select1`` (``SELECT 1``) and ``fetch100`` (100 rows of three columns, all fetched, each row
hashed). Printed per request: the client's CPU (process time) and the wall time, directly (0 ms)
and through a ChaosProxy adding ``--rtt`` ms of round trip (half each way). The variants run
interleaved in rounds so that the machine's load falls on each alike. Example::

    python benchmarks/replay_recording_cost.py --requests 3000 --rtt-requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import dropsafe
from dropsafe.testing import ChaosProxy, PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable

REQUESTS = {
    "select1": sa.text("SELECT 1"),
    "fetch100": sa.text("SELECT g, 'row ' || g, g * 1.5 FROM generate_series(1, 100) g"),
}
VARIANTS = ("plain", "off", "recording")


def _engine(url: str, variant: str, *, is_async: bool) -> object:
    kwargs = {"pool_size": 1, "max_overflow": 0}
    if variant == "plain":
        return (create_async_engine if is_async else sa.create_engine)(url, **kwargs)
    policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(replay_transaction=variant == "recording"))
    make = dropsafe.create_async_engine if is_async else dropsafe.create_engine
    return make(url, policy=policy, **kwargs)


def _sync_runner(engine: sa.Engine, statement: sa.TextClause) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            with engine.begin() as conn:
                conn.execute(statement).all()

    return run


_LOOP = asyncio.new_event_loop()  # one for every async engine: each is disposed on it


def _async_runner(engine: object, statement: sa.TextClause) -> Callable[[int], None]:
    loop = _LOOP

    async def many(n: int) -> None:
        for _ in range(n):
            async with engine.begin() as conn:  # type: ignore[attr-defined]
                (await conn.execute(statement)).all()

    def run(n: int) -> None:
        loop.run_until_complete(many(n))

    return run


def measure(url: str, driver: str, requests: int, rounds: int) -> dict[tuple[str, str], tuple]:
    """Return, per (request, variant), the median CPU and wall microseconds per request."""
    is_async = driver == "asyncpg"
    out = {}
    for name, statement in REQUESTS.items():
        engines = {v: _engine(url, v, is_async=is_async) for v in VARIANTS}
        runners = {
            v: (_async_runner if is_async else _sync_runner)(engines[v], statement)
            for v in VARIANTS
        }
        for run in runners.values():
            run(max(5, requests // 20))  # warm: the pool's connection, the statement caches
        samples: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for variant, run in runners.items():
                cpu, wall = time.process_time(), time.perf_counter()
                run(requests)
                samples[variant].append(
                    (
                        (time.process_time() - cpu) / requests * 1e6,
                        (time.perf_counter() - wall) / requests * 1e6,
                    )
                )
        for variant in VARIANTS:
            cpu = statistics.median(s[0] for s in samples[variant])
            wall = statistics.median(s[1] for s in samples[variant])
            out[name, variant] = (cpu, wall)
        for engine in engines.values():
            if is_async:
                _LOOP.run_until_complete(engine.dispose())  # type: ignore[attr-defined]
            else:
                engine.dispose()  # type: ignore[attr-defined]
    return out


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drivers", default="psycopg2,psycopg,asyncpg")
    parser.add_argument("--requests", type=int, default=2000, help="per round, at 0 ms")
    parser.add_argument("--rtt-requests", type=int, default=100, help="per round, at --rtt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rtt", type=float, default=10.0, help="round trip added, ms")
    args = parser.parse_args()
    print("| driver | RTT | request | variant | CPU us/request | wall us/request | CPU vs plain |")
    print("|---|---|---|---|---|---|---|")
    with PostgresServer() as server:
        for driver in args.drivers.split(","):
            url = server.url(driver)
            with ChaosProxy(server.host, server.port) as proxy:
                proxy.latency(args.rtt / 2)
                for rtt, requests, target in (
                    (0, args.requests, url),
                    (args.rtt, args.rtt_requests, proxy.route(url)),
                ):
                    table = measure(target, driver, requests, args.rounds)
                    for (name, variant), (cpu, wall) in table.items():
                        ratio = cpu / table[name, "plain"][0]
                        print(
                            f"| {driver} | {rtt:g} ms | {name} | {variant} | {cpu:.0f} | "
                            f"{wall:.0f} | {ratio:.3f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
