"""How the guard's cost grows with clients, pool size and dead connections, and its memory.

``python benchmarks/scale.py --part cost|healthy|dead|memory [--quick]``; each part adds its
section to benchmarks/results/scale.json, and SCALE.md (and scale.png) are written from all the
parts measured so far (``--part report`` writes them again). Run each part in its own process
(the memory part measures the process).

- cost: the guard's CPU time per checkout on pools of 5, 20 and 50, the least of several runs
  (on a loaded machine, the one figure that does not measure the load).

- healthy: single-query requests (check out, ``SELECT 1``, return) with 1, 8, 32 and 64 clients
  (threads for psycopg2 and psycopg 3, tasks for asyncpg) on pools of 5, 20 and 50, on a plain
  SQLAlchemy pool and on a hardened engine, interleaved cell by cell in each round; ratio =
  the hardened engine's throughput / the plain pool's, same cell, same round.
- dead: a full pool whose backends are all terminated (as a restart does), or only one of
  them, then one checkout per pooled connection: how many looks (socket polls), pings,
  refusals and reconnects the guard spends, what the user sees, and how long the first
  checkout takes, by pool size; against a plain pool and ``pool_pre_ping``.
- memory: a process running many units of work on a hardened engine (4 threads, a pool of 5,
  one in ten a verified write), its RSS and tracemalloc's count sampled every tenth of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import dropsafe
from dropsafe._bench._report import load_average, machine, table
from dropsafe._engine.guard import guard_of
from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

RESULTS = Path(__file__).parent / "results"
STORE = RESULTS / "scale.json"
DRIVERS = ("psycopg2", "psycopg", "asyncpg")
CLIENTS = (1, 8, 32, 64)
POOLS = (5, 20, 50)
SELECT_ONE = sa.text("SELECT 1")
POLICY = dropsafe.Policy(hooks=())
NO_REPLAY_POLICY = dropsafe.Policy(pool=dropsafe.PoolPolicy(replay_first_statement=False), hooks=())


def _engine(url: str, driver: str, variant: str, pool: int) -> Any:  # noqa: ANN401 - sync or async
    kwargs: dict[str, Any] = {"pool_size": pool, "max_overflow": 0, "pool_timeout": 60}
    policy = NO_REPLAY_POLICY if variant == "no replay" else POLICY
    if driver == "asyncpg":
        if variant in ("dropsafe", "no replay"):
            return dropsafe.create_async_engine(url, policy=policy, **kwargs)
        return create_async_engine(url, pool_pre_ping=variant == "pre_ping", **kwargs)
    if variant in ("dropsafe", "no replay"):
        return dropsafe.create_engine(url, policy=policy, **kwargs)
    return sa.create_engine(url, pool_pre_ping=variant == "pre_ping", **kwargs)


def _para(text: str) -> str:
    """One Markdown paragraph from an indented triple-quoted string."""
    return " ".join(text.split())


# -- healthy: throughput by clients and pool size ----------------------------------------------


def _warm_sync(engine: sa.Engine, pool: int) -> None:
    held = [engine.connect() for _ in range(pool)]  # the whole pool open before any window
    for connection in held:
        connection.close()


def _drive_sync(engine: sa.Engine, clients: int, seconds: float) -> tuple[int, float]:
    """Run ``clients`` threads for ``seconds``; return the requests and the CPU time spent."""
    done = [0] * clients
    stop_at = [0.0]
    start = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        start.wait()
        count = 0
        while time.perf_counter() < stop_at[0]:
            with engine.connect() as connection:
                connection.execute(SELECT_ONE).scalar()
            count += 1
        done[index] = count

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    cpu = time.process_time()
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return sum(done), time.process_time() - cpu


async def _drive_async(engine: Any, clients: int, seconds: float) -> tuple[int, float]:  # noqa: ANN401
    stop_at = time.perf_counter() + seconds
    cpu = time.process_time()

    async def client() -> int:
        count = 0
        while time.perf_counter() < stop_at:
            async with engine.connect() as connection:
                (await connection.execute(SELECT_ONE)).scalar()
            count += 1
        return count

    done = sum(await asyncio.gather(*(client() for _ in range(clients))))
    return done, time.process_time() - cpu


Cell = dict[str, list[float]]  # "rate" and "cpu_us" (per request) of each round


def _block_sync(url: str, driver: str, pool: int, rounds: int, seconds: float) -> dict[str, Cell]:
    """Measure every client count on one pool size: both engines made and warmed once."""
    engines = {variant: _engine(url, driver, variant, pool) for variant in VARIANTS}
    cells: dict[str, Cell] = {}
    try:
        for engine in engines.values():
            _warm_sync(engine, pool)
        for round_ in range(rounds):
            for clients in CLIENTS:
                for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                    done, cpu = _drive_sync(engines[variant], clients, seconds)
                    cell = cells.setdefault(f"{clients}|{variant}", {"rate": [], "cpu_us": []})
                    cell["rate"].append(done / seconds)
                    cell["cpu_us"].append(cpu / max(done, 1) * 1e6)
    finally:
        for engine in engines.values():
            engine.dispose()
    return cells


def _block_async(url: str, pool: int, rounds: int, seconds: float) -> dict[str, Cell]:
    async def run() -> dict[str, Cell]:
        engines = {variant: _engine(url, "asyncpg", variant, pool) for variant in VARIANTS}
        cells: dict[str, Cell] = {}
        try:
            for engine in engines.values():
                held = [await engine.connect() for _ in range(pool)]
                for connection in held:
                    await connection.close()
            for round_ in range(rounds):
                for clients in CLIENTS:
                    for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                        done, cpu = await _drive_async(engines[variant], clients, seconds)
                        key = f"{clients}|{variant}"
                        cell = cells.setdefault(key, {"rate": [], "cpu_us": []})
                        cell["rate"].append(done / seconds)
                        cell["cpu_us"].append(cpu / max(done, 1) * 1e6)
        finally:
            for engine in engines.values():
                await engine.dispose()
        return cells

    return asyncio.run(run())


VARIANTS = ("plain", "dropsafe")
#: The cost part also measures a hardened engine without the first-statement replay.
COST_VARIANTS = ("plain", "dropsafe", "no replay")


_Result = TypeVar("_Result")


def _on_each_face(
    server: PostgresServer,
    sync_part: Callable[..., _Result],
    async_part: Callable[..., _Result],
    *args: float,
) -> Iterator[tuple[str, int, _Result]]:
    """Run a part at each driver and pool size, through the driver's own face (async: asyncpg)."""
    for driver in DRIVERS:
        url = server.url(driver)  # type: ignore[arg-type]
        for pool in POOLS:
            if driver == "asyncpg":
                yield driver, pool, async_part(url, pool, *args)
            else:
                yield driver, pool, sync_part(url, driver, pool, *args)


def part_healthy(server: PostgresServer, *, rounds: int, seconds: float) -> dict[str, Any]:
    cells: dict[str, Cell] = {}
    for driver, pool, block in _on_each_face(server, _block_sync, _block_async, rounds, seconds):
        cells |= {f"{driver}|{pool}|{key}": cell for key, cell in block.items()}
        print(f"healthy: {driver} pool {pool} done, load {load_average()}", flush=True)
    rows, ratios, cpu_ratios = [], {}, {}
    for driver in DRIVERS:
        for pool in POOLS:
            for clients in CLIENTS:
                plain = cells[f"{driver}|{pool}|{clients}|plain"]
                guarded = cells[f"{driver}|{pool}|{clients}|dropsafe"]
                # The ratio of each round (both measured side by side), then their median.
                per_round = [
                    g / p for g, p in zip(guarded["rate"], plain["rate"], strict=True) if p
                ]
                ratio = statistics.median(per_round)
                spread = (max(per_round) - min(per_round)) / 2
                # CPU per request: what the guard costs the client, nearly blind to the load
                # other processes put on the machine (which moves throughput a lot).
                cpu_plain = statistics.median(plain["cpu_us"])
                cpu_guarded = statistics.median(guarded["cpu_us"])
                ratios[f"{driver}|{pool}|{clients}"] = ratio
                cpu_ratios[f"{driver}|{pool}|{clients}"] = cpu_plain / cpu_guarded
                rows.append(
                    [
                        driver,
                        pool,
                        clients,
                        f"{statistics.median(plain['rate']):.0f}",
                        f"{statistics.median(guarded['rate']):.0f}",
                        f"{ratio:.2f}x",
                        f"±{spread:.2f}",
                        f"{cpu_plain:.0f}",
                        f"{cpu_guarded:.0f}",
                        f"{cpu_guarded - cpu_plain:+.1f}",
                        f"{cpu_plain / cpu_guarded:.2f}x",
                    ]
                )
    lines = [
        "## Healthy path by clients and pool size",
        "",
        _para(
            f"""
            Single-query requests (check out, `SELECT 1`, return), 0 ms RTT (loopback, no
            proxy): for each driver and pool size a plain SQLAlchemy pool and a hardened engine
            are made and fully opened once, then measured in {rounds} rounds of {seconds:g} s
            per client count, the two interleaved (which goes first alternates by round).
            `ratio` is the median over rounds of the hardened engine's throughput / the plain
            pool's in the same round, `spread` half the range of those per-round ratios.
            `CPU us` is the client process's CPU time per request (all its threads; the server
            runs in other processes), median over rounds: the guard's own cost, and far less
            moved by what else runs on the machine than throughput is. `CPU ratio` = plain's
            CPU per request / the hardened engine's: the throughput ratio a CPU-bound client
            would see. Clients beyond the pool size wait for a connection
            (`max_overflow=0`), as in production.
            """
        ),
        "",
        *table(
            [
                "driver",
                "pool",
                "clients",
                "plain per s",
                "dropsafe per s",
                "ratio",
                "spread",
                "plain CPU us",
                "dropsafe CPU us",
                "guard us",
                "CPU ratio",
            ],
            rows,
            text_columns=1,
        ),
        "",
    ]
    return {"lines": lines, "ratios": ratios, "cpu_ratios": cpu_ratios, "cells": cells}


# -- cost: the guard's CPU per checkout, as the pool grows ---------------------------------------


def _cpu_per_call(fn: Any, calls: int, repeats: int) -> float:  # noqa: ANN401
    """Return the least CPU time per call over ``repeats`` runs: the least disturbed one."""
    best = float("inf")
    for _ in range(repeats):
        began = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - began) / calls)
    return best


def _call_counter() -> tuple[list[int], Any]:
    """Return a count and a `sys.setprofile` function that adds each Python or C call to it."""
    counted = [0]

    def count(frame: Any, event: str, arg: Any) -> None:  # noqa: ANN401
        del frame, arg
        if event in ("call", "c_call"):
            counted[0] += 1

    return counted, count


def _python_calls(fn: Any, requests: int = 200) -> float:  # noqa: ANN401
    """Return the Python function calls (C functions included) per call of ``fn``.

    Counted, not timed: the one figure of a request's cost that the machine's load cannot move.
    """
    counted, count = _call_counter()
    sys.setprofile(count)
    try:
        for _ in range(requests):
            fn()
    finally:
        sys.setprofile(None)
    return counted[0] / requests


async def _python_calls_async(engine: Any, requests: int = 200) -> float:  # noqa: ANN401
    """`_python_calls` for an async engine's single-query request."""
    counted, count = _call_counter()
    sys.setprofile(count)
    try:
        for _ in range(requests):
            async with engine.connect() as connection:
                (await connection.execute(SELECT_ONE)).scalar()
    finally:
        sys.setprofile(None)
    return counted[0] / requests


def _cost_sync(url: str, driver: str, pool: int, calls: int, repeats: int) -> dict[str, float]:
    engines = {variant: _engine(url, driver, variant, pool) for variant in COST_VARIANTS}
    try:
        for engine in engines.values():
            _warm_sync(engine, pool)

        def checkout(engine: sa.Engine = engines["plain"]) -> None:
            engine.connect().close()

        def request(engine: sa.Engine = engines["plain"]) -> None:
            with engine.connect() as connection:
                connection.execute(SELECT_ONE).scalar()

        result = {}
        for _ in range(2):  # interleaved: plain, dropsafe, plain, dropsafe; the best of each
            for variant, engine in engines.items():
                for name, fn in (("checkout", checkout), ("request", request)):
                    value = _cpu_per_call(lambda fn=fn, e=engine: fn(e), calls, repeats) * 1e6
                    key = f"{name}|{variant}"
                    result[key] = min(result.get(key, float("inf")), value)
        for variant, engine in engines.items():
            result[f"calls|{variant}"] = _python_calls(lambda e=engine: request(e))
        return result
    finally:
        for engine in engines.values():
            engine.dispose()


async def _best_async(engine: Any, name: str, calls: int, repeats: int) -> float:  # noqa: ANN401
    """`_cpu_per_call` for an async engine's checkout or request."""
    best = float("inf")
    for _ in range(repeats):
        began = time.process_time()
        for _ in range(calls):
            async with engine.connect() as connection:
                if name == "request":
                    (await connection.execute(SELECT_ONE)).scalar()
        best = min(best, (time.process_time() - began) / calls)
    return best


def _cost_async(url: str, pool: int, calls: int, repeats: int) -> dict[str, float]:
    async def run() -> dict[str, float]:
        engines = {variant: _engine(url, "asyncpg", variant, pool) for variant in COST_VARIANTS}
        try:
            for engine in engines.values():
                held = [await engine.connect() for _ in range(pool)]
                for connection in held:
                    await connection.close()
            result: dict[str, float] = {}
            for _ in range(2):
                for variant, engine in engines.items():
                    for name in ("checkout", "request"):
                        best = await _best_async(engine, name, calls, repeats) * 1e6
                        key = f"{name}|{variant}"
                        result[key] = min(result.get(key, float("inf")), best)
            for variant, engine in engines.items():
                result[f"calls|{variant}"] = await _python_calls_async(engine)
            return result
        finally:
            for engine in engines.values():
                await engine.dispose()

    return asyncio.run(run())


def part_cost(server: PostgresServer, *, calls: int, repeats: int) -> dict[str, Any]:
    rows, costs = [], {}
    for driver, pool, cost in _on_each_face(server, _cost_sync, _cost_async, calls, repeats):
        costs[f"{driver}|{pool}"] = cost
        guard = cost["checkout|dropsafe"] - cost["checkout|plain"]
        plain_request = cost["request|plain"]
        rows.append(
            [
                driver,
                pool,
                f"{cost['checkout|plain']:.2f}",
                f"{cost['checkout|dropsafe']:.2f}",
                f"{guard:+.2f}",
                f"{plain_request:.1f}",
                f"{cost['request|dropsafe']:.1f}",
                f"{cost['request|no replay']:.1f}",
                f"{plain_request / (plain_request + guard):.3f}x",
                f"{plain_request / cost['request|dropsafe']:.3f}x",
                f"{plain_request / cost['request|no replay']:.3f}x",
                " / ".join(f"{cost[f'calls|{v}']:.0f}" for v in COST_VARIANTS),
            ]
        )
        print(f"cost: {driver} pool {pool} done", flush=True)
    lines = [
        "## The guard's CPU per checkout, by pool size",
        "",
        _para(
            f"""
            One client, one connection at a time out of a fully opened pool (all the others
            idle): CPU time of the process per checkout + return (no statement), and per
            single-query request (checkout, `SELECT 1`, return), on a plain pool and on a
            hardened engine, interleaved; each figure is the least over {repeats} x 2 runs of
            {calls:,} calls (the run least disturbed by the rest of the machine: on a loaded
            machine a mean or a median measures the load). `guard us` = the hardened
            checkout's CPU minus the plain one's: what the checkout check and its listeners
            cost. `ratio (guard)` = the plain request's CPU / (the same + `guard us`): the
            throughput ratio of a CPU-bound client at 0 ms RTT, given the checkout's cost
            alone; `ratio (requests)` the same measured on whole requests, which also pays the
            first-statement replay's look before the statement is sent (noisier: the
            statement's own CPU varies more than the guard's cost); `ratio (no replay)` whole
            requests on a hardened engine with `PoolPolicy(replay_first_statement=False)`.
            `calls per request`: Python function calls (C ones included) per single-query
            request on the plain pool / the hardened engine / without the replay, counted
            with `sys.setprofile` over 200 requests: the one figure the machine's load
            cannot move.
            """
        ),
        "",
        *table(
            [
                "driver",
                "pool",
                "plain checkout us",
                "dropsafe checkout us",
                "guard us",
                "plain request us",
                "dropsafe request us",
                "no replay request us",
                "ratio (guard)",
                "ratio (requests)",
                "ratio (no replay)",
                "calls per request",
            ],
            rows,
            text_columns=1,
        ),
        "",
    ]
    return {"lines": lines, "costs": costs}


# -- dead: the cost of a pool of dead connections ----------------------------------------------


def _wait_for_backends_gone(server: PostgresServer, pids: list[int]) -> None:
    """Wait until none of ``pids`` (or no client backend at all, if empty) is left."""
    where = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
    if pids:
        where += f" AND pid IN ({', '.join(str(pid) for pid in pids)})"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {where}")  # noqa: S608
        if int(rows[0][0]) == 0:
            return
        time.sleep(0.01)  # polling a condition, with a deadline
    raise TimeoutError("backends still there 30 s after they were terminated")


def _kill(server: PostgresServer, scenario: str, first_pid: int) -> None:
    """End every backend, or only the one of the connection the pool hands out next."""
    if scenario == "all dead":
        server.terminate_backends()
        _wait_for_backends_gone(server, [])
    else:
        server.execute(f"SELECT pg_terminate_backend({first_pid}, 5000)")
        _wait_for_backends_gone(server, [first_pid])


class _Counts:
    """What happened after the kill: connects seen, and the guard's counters (if guarded)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.connects = 0
        self.guard = guard_of(engine)
        sa.event.listen(engine, "connect", self._connected)

    def _connected(self, *_: object) -> None:
        self.connects += 1

    def reset(self) -> None:
        self.connects = 0
        if self.guard is not None:
            self.guard.check.probes = self.guard.check.pings = self.guard.check.replaced = 0

    def result(self, errors: int, times: list[float]) -> dict[str, Any]:
        result: dict[str, Any] = {"errors": errors, "connects": self.connects}
        result |= {"first_ms": times[0] * 1e3, "total_ms": sum(times) * 1e3}
        if self.guard is not None:
            check = self.guard.check
            result |= {"probes": check.probes, "pings": check.pings, "replaced": check.replaced}
        return result


PID = sa.text("SELECT pg_backend_pid()")


def _dead_sync(
    server: PostgresServer, driver: str, variant: str, pool: int, scenario: str
) -> dict[str, Any]:
    engine = _engine(server.url(driver), driver, variant, pool)  # type: ignore[arg-type]
    counts = _Counts(engine)
    try:
        held = [engine.connect() for _ in range(pool)]
        first_pid = held[0].execute(PID).scalar_one()
        for connection in held:  # FIFO: the first returned is the next handed out
            connection.rollback()
            connection.close()
        _kill(server, scenario, first_pid)
        counts.reset()
        errors, times, held = 0, [], []
        # One checkout per pooled connection, back to back, as the first requests after a
        # restart would come.
        for _ in range(pool):
            began = time.perf_counter()
            try:
                connection = engine.connect()
                connection.execute(SELECT_ONE).scalar()
                held.append(connection)
            except sa.exc.DBAPIError:
                errors += 1
            times.append(time.perf_counter() - began)
        for connection in held:
            connection.close()
        return counts.result(errors, times)
    finally:
        engine.dispose()


def _dead_async(server: PostgresServer, variant: str, pool: int, scenario: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        engine = _engine(server.url("asyncpg"), "asyncpg", variant, pool)
        counts = _Counts(engine.sync_engine)
        try:
            held = [await engine.connect() for _ in range(pool)]
            first_pid = (await held[0].execute(PID)).scalar_one()
            for connection in held:
                await connection.rollback()
                await connection.close()
            await asyncio.to_thread(_kill, server, scenario, first_pid)
            counts.reset()
            errors, times, held = 0, [], []
            for _ in range(pool):
                began = time.perf_counter()
                try:
                    connection = await engine.connect()
                    (await connection.execute(SELECT_ONE)).scalar()
                    held.append(connection)
                except sa.exc.DBAPIError:
                    errors += 1
                times.append(time.perf_counter() - began)
            for connection in held:
                await connection.close()
            return counts.result(errors, times)
        finally:
            await engine.dispose()

    return asyncio.run(run())


SCENARIOS = ("all dead", "one dead")


def part_dead(server: PostgresServer, *, rounds: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for scenario in SCENARIOS:
            for driver in DRIVERS:
                for pool in POOLS:
                    for variant in ("plain", "pre_ping", "dropsafe"):
                        outcome = (
                            _dead_async(server, variant, pool, scenario)
                            if driver == "asyncpg"
                            else _dead_sync(server, driver, variant, pool, scenario)
                        )
                        key = f"{scenario}|{driver}|{pool}|{variant}"
                        results.setdefault(key, []).append(outcome)
    rows = []
    for key, outcomes in results.items():
        scenario, driver, pool, variant = key.split("|")

        def median(name: str, outcomes: list[dict[str, Any]] = outcomes) -> float:
            return statistics.median(o[name] for o in outcomes)

        guarded = variant == "dropsafe"
        rows.append(
            [
                scenario,
                driver,
                pool,
                variant,
                f"{median('errors'):g}",
                f"{median('connects'):g}",
                f"{median('probes'):g}" if guarded else "-",
                f"{median('probes') / int(pool):.2f}" if guarded else "-",
                f"{median('pings'):g}" if guarded else "-",
                f"{median('replaced'):g}" if guarded else "-",
                f"{median('first_ms'):.1f}",
                f"{median('total_ms') / int(pool):.2f}",
            ]
        )
    lines = [
        "## A pool of dead connections",
        "",
        _para(
            f"""
            Each pool is opened in full; then either every backend is terminated
            (`pg_terminate_backend`, as a restart would end them: `all dead`), or only the one
            of the connection the pool hands out next (`one dead`: a backend killed alone, the
            others alive); the script waits until the server shows them gone. Then one request
            (checkout, `SELECT 1`) per pooled connection, back to back. `errors`: requests that
            failed (the user saw a disconnect error); `connects`: connections opened since;
            `looks`: socket polls by the guard's checkout check (no round trip), `per conn` the
            same per pooled connection; `pings`: round trips the check spent; `refused`:
            checkouts the check refused (a refusal recycles the whole pool when other idle
            connections are dead too, else only that one); `first ms`: the first request's time
            (a reconnect included where there is one); `ms per request`: the mean. Median of
            {rounds} rounds.
            """
        ),
        "",
        *table(
            [
                "killed",
                "driver",
                "pool",
                "variant",
                "errors",
                "connects",
                "looks",
                "per conn",
                "pings",
                "refused",
                "first ms",
                "ms per request",
            ],
            rows,
            text_columns=4,
        ),
        "",
    ]
    return {"lines": lines, "results": results}


# -- memory: a long run ------------------------------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def part_memory(server: PostgresServer, *, units: int, budget: float) -> dict[str, Any]:  # noqa: C901 - one run, its sampling and its table, read in order
    url = server.url("psycopg2")
    server.execute("CREATE TABLE IF NOT EXISTS scale_units (v int)")
    engine = dropsafe.create_engine(url, policy=POLICY, pool_size=5, max_overflow=0)
    insert = sa.text("INSERT INTO scale_units (v) VALUES (1)")

    def read(connection: sa.Connection) -> object:
        return connection.execute(SELECT_ONE).scalar()

    def write(connection: sa.Connection) -> object:
        return connection.execute(insert).rowcount

    threads = 4
    lock = threading.Lock()
    counter = [0]
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if counter[0] >= units:
                    return
                counter[0] += 1
                number = counter[0]
            dropsafe.run_transaction(engine, write if number % 10 == 0 else read)

    # Warm-up outside the samples: the pool opened, the caches of SQLAlchemy and the drivers
    # filled (compiled statements, type adapters), so that what grows after is what leaks.
    for number in range(2000):
        dropsafe.run_transaction(engine, write if number % 10 == 0 else read)
    gc.collect()
    tracemalloc.start()
    samples = [(0, _rss_kib(), tracemalloc.get_traced_memory()[0], len(gc.get_objects()), 0.0)]
    began = time.monotonic()
    step = max(1, units // 10)
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    next_sample = step
    while any(thread.is_alive() for thread in workers):
        time.sleep(0.2)  # sampling period, not synchronisation
        elapsed = time.monotonic() - began
        if elapsed > budget:
            stop.set()
        if counter[0] >= next_sample or not any(t.is_alive() for t in workers):
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0]
            samples.append((counter[0], _rss_kib(), traced, len(gc.get_objects()), elapsed))
            print(f"memory: {samples[-1]}", flush=True)
            next_sample = (counter[0] // step + 1) * step
    for thread in workers:
        thread.join()
    done = counter[0]
    guard = guard_of(engine)
    entries = len(guard.check._states) if guard else 0  # noqa: SLF001 - what the check keeps
    engine.dispose()
    tracemalloc.stop()
    first, last = samples[1] if len(samples) > 2 else samples[0], samples[-1]
    span = max(1, last[0] - first[0])
    rows = [
        [f"{n:,}", f"{rss / 1024:.1f}", f"{traced / 1024:.0f}", f"{objects:,}", f"{t:.0f}"]
        for n, rss, traced, objects, t in samples
    ]
    rss_slope = (last[1] - first[1]) * 1024 / span
    traced_slope = (last[2] - first[2]) / span
    lines = [
        "## Memory over a long run",
        "",
        _para(
            f"""
            One process, a hardened psycopg2 engine (pool of 5), {threads} threads running
            `run_transaction` back to back: nine in ten read (`SELECT 1`), one in ten a verified
            write (INSERT, the commit guard on). {done:,} units of work in {last[4]:.0f} s (asked:
            {units:,}, within {budget:.0f} s; tracemalloc on, which slows every allocation).
            Sampled after a full garbage collection, after 2,000 units of warm-up. The check's
            per-connection table held {entries} entries at the end (pool of 5).
            """
        ),
        "",
        *table(["units", "RSS MiB", "traced KiB", "gc objects", "s"], rows, text_columns=0),
        "",
        _para(
            f"""
            Slope from the first sample to the last: RSS {rss_slope:+.2f} bytes per unit of work,
            traced Python memory {traced_slope:+.3f} bytes per unit of work.
            """
        ),
        "",
    ]
    return {"lines": lines, "samples": samples, "units": done}


# -- report ------------------------------------------------------------------------------------


def _plot(healthy: dict[str, Any]) -> None:
    import matplotlib as mpl  # only the report needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    measures = (("ratios", "throughput ratio"), ("cpu_ratios", "CPU ratio (plain / dropsafe)"))
    figure, axes = plt.subplots(2, len(DRIVERS), figsize=(13, 7), sharey=True, squeeze=False)
    for row, (measure, label) in enumerate(measures):
        if measure not in healthy:  # a run from before that measure existed
            continue
        for axis, driver in zip(axes[row], DRIVERS, strict=True):
            for pool in POOLS:
                ratios = [healthy[measure][f"{driver}|{pool}|{c}"] for c in CLIENTS]
                axis.plot(CLIENTS, ratios, marker="o", label=f"pool {pool}")
            axis.axhline(1.0, color="grey", linewidth=0.8)
            axis.axhline(0.98, color="grey", linewidth=0.8, linestyle="--")
            axis.set_xscale("log", base=2)
            axis.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
            axis.set_title(f"{driver}: {label}")
            axis.set_xlabel("clients")
        axes[row][0].set_ylabel("dropsafe vs plain pool")
    axes[0][0].legend()
    figure.suptitle("Single-query requests, 0 ms RTT, against the plain pool of the same run")
    figure.tight_layout()
    figure.savefig(RESULTS / "scale.png", dpi=90)


def write_report(store: dict[str, Any]) -> None:
    lines = [
        "# dropsafe at scale",
        "",
        _para(
            """
            Produced by `python benchmarks/scale.py --part cost|healthy|dead|memory` (each part
            in its own process). Each section names the machine and the load average it ran
            with: a shared machine's absolute numbers move with its load, so read the ratios,
            which compare variants measured side by side in the same run, and on a loaded
            machine the CPU figures (the least of several runs) before the throughput ones.
            docs/benchmarks.md sums these tables up.
            """
        ),
        "",
    ]
    for part in ("cost", "healthy", "dead", "memory"):
        if part in store:
            lines += [*store[part]["lines"][:1], "", store[part]["machine"], ""]
            lines += store[part]["lines"][2:]
    if "healthy" in store:
        lines += ["![ratio against clients](scale.png)", ""]
        _plot(store["healthy"])
    (RESULTS / "SCALE.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--part", choices=("cost", "healthy", "dead", "memory", "report"), required=True
    )
    parser.add_argument("--quick", action="store_true", help="a short run, to try the script")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per healthy cell")
    parser.add_argument("--units", type=int, default=1_000_000)
    parser.add_argument("--budget", type=float, default=600.0, help="memory part, seconds")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.units, args.budget = 1, 0.2, 20_000, 60.0
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    if args.part == "report":  # SCALE.md and scale.png again, from the parts measured
        write_report(store)
        return 0
    began, load_before = time.monotonic(), load_average()
    with PostgresServer(settings={"max_connections": "200"}) as server:
        if args.part == "cost":
            result = part_cost(server, calls=1000 if args.quick else 5000, repeats=5)
        elif args.part == "healthy":
            result = part_healthy(server, rounds=args.rounds, seconds=args.seconds)
        elif args.part == "dead":
            result = part_dead(server, rounds=args.rounds)
        else:
            result = part_memory(server, units=args.units, budget=args.budget)
    result["machine"] = (
        f"Machine: {machine()}; load average {load_before} at the start, {load_average()} at "
        f"the end; {time.monotonic() - began:.0f} s."
    )
    # Read again: another part may have been written while this one ran (in its own process).
    store = json.loads(STORE.read_text()) if STORE.exists() else {}
    store[args.part] = result
    STORE.write_text(json.dumps(store, indent=1))
    write_report(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
