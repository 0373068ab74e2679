"""Profile the write path: what a verified unit of work costs over a plain one, per driver.

Runs N small write units (one INSERT, COMMIT) per variant against a throwaway PostgresServer
and prints, per unit: the client's CPU, the wall time, the Python function calls (a count the
machine's load does not move), and the round trips, counted for real by a relay between the
pool and the server (`dropsafe._bench._turns`). Variants:

- ``plain``: SQLAlchemy's pool, ``with Session.begin()``;
- ``unverified``: ``dropsafe.run_transaction`` with ``verify_commits=False``;
- ``verified``: ``dropsafe.run_transaction`` with the commit guard (the default: its xid read
  in its INSERT's flight);
- ``marked``: the same with ``read_xid_in_flight=False`` (its xid read by a statement
  of its own before COMMIT, as before issue 28).

``--profile DIR`` also writes one cProfile dump per driver and variant (``*.pstats``) and
prints the functions that take the most time in the verified one; for a flame graph:
``py-spy record -o verified.svg -- python benchmarks/profile_write.py --variants verified``.
Round trips are counted on a warmed pool (connecting is not part of a unit);
``--new-connections`` also counts them for a unit whose connection is new (the pool is emptied
before each), which is where the server's life is read. Example::

    python benchmarks/profile_write.py --units 2000 --profile benchmarks/results/profiles
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe._bench._turns import TurnCounter
from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

INSERT = sa.text("INSERT INTO bench (v) VALUES (1)")
VARIANTS = ("plain", "unverified", "verified", "marked")
DRIVERS = ("psycopg2", "psycopg", "asyncpg")


@dataclass
class Result:
    driver: str
    variant: str
    units: int
    cpu_s: float
    wall_s: float
    turns: int
    counted: int
    calls: float

    def line(self) -> str:
        return (
            f"{self.driver:9} {self.variant:14} "
            f"cpu {self.cpu_s / self.units * 1e6:7.0f} us/unit  "
            f"wall {self.wall_s / self.units * 1e6:7.0f} us/unit  "
            f"round trips {self.turns / self.counted:5.2f}/unit  "
            f"Python calls {self.calls:5.0f}/unit"
        )


class _Tally:
    """What one measuring loop, sync or async, counts: CPU, wall time and the units' round trips.

    Started after the warm-up unit. Connecting (TLS, authentication) is not a unit's: the round
    trips made under `not_counted` are left out.
    """

    def __init__(self, counter: TurnCounter | None) -> None:
        self.counter = counter
        self.turns = 0
        if counter is not None:
            counter.reset()
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    @contextlib.contextmanager
    def not_counted(self) -> Iterator[None]:
        """Leave out the round trips made inside the block."""
        if self.counter is not None:
            self.turns += self.counter.turns
        yield
        if self.counter is not None:
            self.counter.reset()

    def result(self) -> tuple[float, float, int]:
        """Return the CPU and wall seconds since the start, and the units' round trips."""
        cpu, wall = time.process_time() - self.cpu, time.perf_counter() - self.wall
        return cpu, wall, self.turns + (self.counter.turns if self.counter else 0)


def _policy(variant: str) -> dropsafe.Policy:
    # "marked": the xid read by a statement of its own before COMMIT (issue 28's before).
    return dropsafe.Policy(
        pool=dropsafe.PoolPolicy(read_xid_in_flight=variant != "marked"),
        unit=dropsafe.UnitPolicy(verify_commits=variant in ("verified", "marked")),
    )


def _sync_unit(variant: str, url: str) -> tuple[Callable[[], object], sa.Engine]:
    if variant == "plain":
        engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    else:
        engine = dropsafe.create_engine(url, policy=_policy(variant), pool_size=1, max_overflow=0)
    factory = sessionmaker(engine)

    def write(session: Session) -> None:
        session.execute(INSERT)

    def unit() -> object:
        if variant == "plain":
            with factory() as session, session.begin():
                return session.execute(INSERT)
        return dropsafe.run_transaction(factory, write)

    return unit, engine


def _measure_sync(
    variant: str, url: str, units: int, counter: TurnCounter | None, *, fresh: bool
) -> tuple[float, float, int]:
    unit, engine = _sync_unit(variant, url)
    try:
        unit()  # connect and warm up outside the measurement
        tally = _Tally(counter)
        for _ in range(units):
            if fresh:
                engine.pool.dispose()  # the next unit opens its connection
                with tally.not_counted(), engine.connect():
                    pass
            unit()
        return tally.result()
    finally:
        engine.dispose()


async def _measure_async(
    variant: str, url: str, units: int, counter: TurnCounter | None, *, fresh: bool
) -> tuple[float, float, int]:
    if variant == "plain":
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
    else:
        engine = dropsafe.create_async_engine(
            url, policy=_policy(variant), pool_size=1, max_overflow=0
        )
    factory = async_sessionmaker(engine)

    async def write(session: Any) -> None:  # noqa: ANN401 - AsyncSession
        await session.execute(INSERT)

    async def unit() -> object:
        if variant == "plain":
            async with factory() as session, session.begin():
                return await session.execute(INSERT)
        return await dropsafe.run_transaction_async(factory, write)

    try:
        await unit()
        tally = _Tally(counter)
        for _ in range(units):
            if fresh:
                await engine.dispose()
                with tally.not_counted():
                    async with engine.connect():
                        pass
            await unit()
        return tally.result()
    finally:
        await engine.dispose()


def measure(
    driver: str,
    variant: str,
    url: str,
    units: int,
    counter: TurnCounter | None,
    *,
    fresh: bool = False,
) -> tuple[float, float, int]:
    if driver == "asyncpg":
        return asyncio.run(_measure_async(variant, url, units, counter, fresh=fresh))
    return _measure_sync(variant, url, units, counter, fresh=fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=1000, help="units per variant (CPU)")
    parser.add_argument("--counted", type=int, default=50, help="units per round-trip count")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="e.g. verified, to record one with py-spy"
    )
    parser.add_argument("--profile", type=Path, help="write cProfile dumps here")
    parser.add_argument(
        "--new-connections", action="store_true", help="also count a unit on a new connection"
    )
    args = parser.parse_args()
    drivers = args.drivers.split(",")
    variants = args.variants.split(",")
    with PostgresServer() as server:
        server.execute("CREATE TABLE IF NOT EXISTS bench (v int)")
        counter = TurnCounter(server.host, server.port)
        try:
            for driver in drivers:
                url = server.url(driver)  # type: ignore[arg-type]
                # CPU and wall: straight to the server, best of the rounds (a shared machine's
                # noise only ever adds), variants interleaved.
                best: dict[str, tuple[float, float]] = {}
                for _ in range(args.rounds):
                    for variant in variants:
                        cpu, wall, _ = measure(driver, variant, url, args.units, None)
                        old = best.get(variant, (cpu, wall))
                        best[variant] = (min(old[0], cpu), min(old[1], wall))
                for variant in variants:
                    _, _, turns = measure(
                        driver, variant, counter.route(url), args.counted, counter
                    )
                    cpu, wall = best[variant]
                    calls = _calls_per_unit(driver, variant, url, args.counted)
                    result = Result(
                        driver, variant, args.units, cpu, wall, turns, args.counted, calls
                    )
                    print(result.line())
                if args.new_connections:
                    for variant in variants:
                        _, _, turns = measure(
                            driver, variant, counter.route(url), 10, counter, fresh=True
                        )
                        print(
                            f"{driver:9} {variant:11} on a new connection: "
                            f"{turns / 10:.2f} round trips/unit"
                        )
                if args.profile:
                    _profile(driver, url, args.units, args.profile)
        finally:
            counter.close()


def _calls_per_unit(driver: str, variant: str, url: str, units: int) -> float:
    """Python function calls per unit: a count that the machine's load does not move.

    The difference between runs of 2N and N units, so that creating the engine cancels out.
    """
    counts = []
    for n in (units, 2 * units):
        profiler = cProfile.Profile()
        profiler.enable()
        measure(driver, variant, url, n, None)
        profiler.disable()
        counts.append(pstats.Stats(profiler).total_calls)  # type: ignore[attr-defined]
    return (counts[1] - counts[0]) / units


def _profile(driver: str, url: str, units: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        profiler = cProfile.Profile()
        profiler.enable()
        measure(driver, variant, url, units, None)
        profiler.disable()
        path = directory / f"write_{driver}_{variant}.pstats"
        profiler.dump_stats(path)
        if variant == "verified":
            print(f"--- {driver} verified: top by cumulative time ({path.name})")
            stats = pstats.Stats(str(path))
            stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
