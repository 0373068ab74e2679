"""Where a checkout's CPU goes: ``python benchmarks/profile_checkout.py [--requests N]``.

A single client checks a connection out, runs ``SELECT 1`` and returns it, N times, on a plain
SQLAlchemy pool and on a hardened engine, for psycopg2, psycopg 3 and asyncpg, against a
throwaway server over loopback (0 ms RTT: what the guard's CPU costs shows in full). It prints
the time per request of each and the guard's own share (the functions of dropsafe's modules,
from cProfile), and writes each profile's top functions as text to
benchmarks/results/profiles/ (``--tag=-after`` names the files). With ``--py-spy`` (py-spy
installed) it also records a flame graph of each hardened run as SVG there. ``--cpu`` measures
instead the process's CPU time per request (the least of ``--rounds`` interleaved runs; and
the median of each round's own ratio to plain) of the plain pool, dropsafe's defaults,
dropsafe without the first-statement replay and dropsafe with the transaction replay
(``PoolPolicy(replay_transaction=True)``: every statement recorded), with each one's ratio to
plain, and splits dropsafe's own profiled time by module: the
first-statement replay's marks (replay, session_state, the socket reads) apart from the
checkout check and the quiet ROLLBACK. ``--calls`` counts instead the Python calls per request
of the same four (``sys.setprofile``: a figure the machine's load cannot move).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable

OUT = Path(__file__).parent / "results" / "profiles"
DRIVERS = ("psycopg2", "psycopg", "asyncpg")
SELECT_ONE = sa.text("SELECT 1")


#: The engines compared: guarded or not, first-statement replay, transaction replay.
VARIANTS = {
    "plain": (False, True, False),
    "dropsafe": (True, True, False),
    "no replay": (True, False, False),
    "replay_transaction": (True, True, True),
}
#: Variants whose engine ran one unit of work before the requests (as an app that runs both):
#: the unit's hooks are then on the engine (`dropsafe._unit.dialect_hooks`).
AFTER_A_UNIT = {"dropsafe after a unit": "dropsafe"}
VARIANTS.update({name: VARIANTS[like] for name, like in AFTER_A_UNIT.items()})


def _policy(*, replay: bool = True, records: bool = False) -> dropsafe.Policy:
    pool = dropsafe.PoolPolicy(replay_first_statement=replay, replay_transaction=records)
    return dropsafe.Policy(hooks=(), pool=pool)


class _Calls:
    """Counts Python calls (and C calls) while on: ``sys.setprofile``, no timing."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, frame: object, what: str, arg: object) -> None:
        del frame, arg
        if what in ("call", "c_call"):
            self.count += 1


def measure(
    url: str,
    driver: str,
    *,
    guarded: bool,
    requests: int,
    replay: bool = True,
    records: bool = False,
) -> float:
    """Return the wall time of ``requests`` requests on one engine (made and warmed first)."""
    run, close = _runner(url, driver, guarded=guarded, replay=replay, records=records)
    try:
        started = time.perf_counter()
        run(requests)
        return time.perf_counter() - started
    finally:
        close()


def calls_per_request(url: str, driver: str, requests: int = 300) -> str:
    """Python calls per request of each variant, and dropsafe's over plain."""
    counted = {}
    for name in VARIANTS:
        run, close = _variant_runner(url, driver, name)
        calls = _Calls()
        sys.setprofile(calls)
        try:
            run(requests)
        finally:
            sys.setprofile(None)
            close()
        counted[name] = calls.count / requests
    cells = [
        f"{name} {count:.0f}" + ("" if name == "plain" else f" (+{count - counted['plain']:.0f})")
        for name, count in counted.items()
    ]
    return f"{driver}: Python calls per request: {'; '.join(cells)}"


#: The modules of the first-statement replay's marks (issue 28 counts them apart).
REPLAY_MODULES = ("replay.py", "session_state.py", "sockets.py")


def _runner(
    url: str,
    driver: str,
    *,
    guarded: bool,
    replay: bool,
    records: bool,
    after_unit: bool = False,
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """Open one engine (warmed); return a function that runs N requests on it, and its close."""
    policy = _policy(replay=replay, records=records)
    if driver != "asyncpg":
        engine = (
            dropsafe.create_engine(url, policy=policy, pool_size=1)
            if guarded
            else sa.create_engine(url, pool_size=1)
        )
        if after_unit:
            dropsafe.run_transaction(sessionmaker(engine), lambda s: s.execute(SELECT_ONE))

        def run(requests: int) -> None:
            for _ in range(requests):
                with engine.connect() as connection:
                    connection.execute(SELECT_ONE).scalar()

        run(20)
        return run, engine.dispose
    aengine = (
        dropsafe.create_async_engine(url, policy=policy, pool_size=1)
        if guarded
        else create_async_engine(url, pool_size=1)
    )
    if after_unit:

        async def unit(session: AsyncSession) -> object:
            return await session.execute(SELECT_ONE)

        _LOOP.run_until_complete(dropsafe.run_transaction_async(async_sessionmaker(aengine), unit))

    async def many(requests: int) -> None:
        for _ in range(requests):
            async with aengine.connect() as connection:
                (await connection.execute(SELECT_ONE)).scalar()

    def run_async(requests: int) -> None:
        _LOOP.run_until_complete(many(requests))

    run_async(20)
    return run_async, lambda: _LOOP.run_until_complete(aengine.dispose())


def _variant_runner(
    url: str, driver: str, name: str
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """`_runner` of the variant ``name`` (`VARIANTS`, `AFTER_A_UNIT`)."""
    guarded, replay, records = VARIANTS[name]
    return _runner(
        url,
        driver,
        guarded=guarded,
        replay=replay,
        records=records,
        after_unit=name in AFTER_A_UNIT,
    )


_LOOP = asyncio.new_event_loop()  # one for every async engine: each is disposed on it


def cpu_ratios(url: str, driver: str, requests: int, rounds: int) -> str:
    """CPU per request of each variant, and its ratio to plain.

    The engines are made once and warmed; each round runs every variant once, in an order
    shuffled per round (seeded: the same orders at each run), and each variant's least CPU time
    of the rounds is kept: the machine's load, which only adds, falls on each alike. The ratio
    is also given as the median, over the rounds, of each round's own ratio (plain's time in
    that round over the variant's), with its quartiles: the load of a shared machine drifts
    over a run's minutes, and a round's variants ran within a second of each other.
    """
    runners = {name: _variant_runner(url, driver, name) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(runners)
    shuffle = random.Random(28).shuffle
    try:
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                run = runners[name][0]
                # Each run starts with nothing for the cycle collector: the transaction
                # replay's records leave cyclic garbage, whose collection would otherwise fall
                # on the variant that runs next (up to +20% on it, measured).
                gc.collect()
                started = time.process_time()
                run(requests)
                times[name].append(time.process_time() - started)
    finally:
        for _run, close in runners.values():
            close()
    best = {name: min(spent) for name, spent in times.items()}
    cells = []
    for name in VARIANTS:
        cell = f"{name} {best[name] / requests * 1e6:.1f} us ({best['plain'] / best[name]:.2f}x"
        if name != "plain":
            paired = [plain / mine for plain, mine in zip(times["plain"], times[name], strict=True)]
            low, middle, high = statistics.quantiles(paired, n=4)
            cell += f", paired median {middle:.2f}x [{low:.2f}-{high:.2f}]"
        cells.append(cell + ")")
    # CPU time, not wall: on loopback a send can run the server's backend on this core (the
    # wall clock would charge its work to the function that sent).
    profiler = cProfile.Profile(time.process_time)
    run, close = _runner(url, driver, guarded=True, replay=True, records=False)
    try:  # the requests only: not the engine's connect and warm-up
        profiler.enable()
        run(requests)
        profiler.disable()
    finally:
        close()
    shares: dict[str, float] = {}
    stats = pstats.Stats(profiler)
    for (filename, _line, _name), row in stats.stats.items():  # type: ignore[attr-defined]
        if "/dropsafe/" in filename and "/testing/" not in filename:
            name = Path(filename).name
            group = "replay marks" if name in REPLAY_MODULES else "check and ROLLBACK"
            shares[group] = shares.get(group, 0.0) + row[2]
    split = ", ".join(f"{group} {t / requests * 1e6:.1f} us" for group, t in shares.items())
    return f"{driver}: CPU per request {'; '.join(cells)}; dropsafe's own, profiled: {split}"


def _relative(text: str) -> str:
    """Name files from the repository, site-packages or the standard library, not this machine."""
    text = re.sub(r"[^\s(\"'>;]*/(site-packages|src)/", r"\1/", text)
    text = re.sub(r"[^\s(\"'>;]*/lib/python3\.\d+/", "stdlib/", text)
    # What is left: the interpreter and this script, named by their last part.
    return re.sub(r"/(?:[\w.-]+/)+([\w.-]+\.py|python3?[\w.]*)\b", r"\1", text)


def _dropsafe_share(stats: pstats.Stats) -> tuple[float, list[tuple[float, int, str]]]:
    """Return the time spent inside dropsafe's own functions and the top ones."""
    rows = []
    for (filename, line, name), (_cc, calls, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "/dropsafe/" in filename and "/testing/" not in filename:
            rows.append((tottime, calls, f"{Path(filename).name}:{line}({name})"))
    rows.sort(reverse=True)
    return sum(row[0] for row in rows), rows[:8]


def _flame_graph(py_spy: str, url: str, driver: str, args: argparse.Namespace) -> None:
    """Record the hardened run with py-spy; the SVG names no path of this machine, no password.

    py-spy writes its command line into the graph's title: the URL (with the throwaway
    server's password) travels in the environment instead, and paths are shortened after.
    """
    svg = OUT / f"{driver}-dropsafe{args.tag}.svg"
    here = Path(__file__).parent
    code = (
        f"import os, sys; sys.path.insert(0, {str(here)!r}); import profile_checkout as p;"
        f"p.measure(os.environ['PROFILE_URL'], {driver!r}, guarded=True,"
        f" requests={args.requests})"
    )
    command = [py_spy, "record", "--rate", "500", "--format", "flamegraph", "--output", str(svg)]
    subprocess.run(
        [*command, "--", sys.executable, "-c", code],
        env={**os.environ, "PROFILE_URL": url},
        check=False,
    )
    if svg.exists():
        text = svg.read_text()
        for long, short in ((str(svg), svg.name), (py_spy, "py-spy"), (str(here), "benchmarks")):
            text = text.replace(long, short)
        svg.write_text(_relative(text.replace(sys.executable, "python")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--tag", default="", help="suffix of the profile file names")
    parser.add_argument("--py-spy", action="store_true", help="flame graphs with py-spy")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--flame-only", action="store_true", help="only the flame graphs")
    parser.add_argument("--cpu", action="store_true", help="CPU ratios to plain, and shares")
    parser.add_argument("--rounds", type=int, default=15, help="--cpu: interleaved rounds")
    parser.add_argument("--calls", action="store_true", help="Python calls per request")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.calls:
        with PostgresServer() as server:
            for driver in args.drivers.split(","):
                print(calls_per_request(server.url(driver), driver))
        return 0
    if args.cpu:
        with PostgresServer() as server:
            for driver in args.drivers.split(","):
                print(cpu_ratios(server.url(driver), driver, args.requests, args.rounds))
        return 0
    with PostgresServer() as server:
        for driver in args.drivers.split(",") if not args.flame_only else ():
            url = server.url(driver)  # type: ignore[arg-type]
            for guarded in (False, True):
                name = f"{driver}-{'dropsafe' if guarded else 'plain'}{args.tag}"
                # Unprofiled first: the time per request without the profiler's own cost.
                wall = measure(url, driver, guarded=guarded, requests=args.requests)
                profiler = cProfile.Profile()
                profiler.enable()
                measure(url, driver, guarded=guarded, requests=args.requests)
                profiler.disable()
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text)
                stats.sort_stats("tottime").print_stats(30)
                (OUT / f"{name}.txt").write_text(_relative(text.getvalue()))
                total = stats.total_tt  # type: ignore[attr-defined]
                own, top = _dropsafe_share(stats)
                print(
                    f"{name}: {wall / args.requests * 1e6:.1f} us/request unprofiled; "
                    f"profiled: dropsafe {own / args.requests * 1e6:.1f} us/request "
                    f"({own / total:.1%} of the profile)"
                )
                for tottime, calls, where in top:
                    print(f"    {tottime / args.requests * 1e6:6.2f} us/req {calls:8d} {where}")
        # py-spy installs beside the interpreter (a venv's bin), which may not be on PATH.
        py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if args.py_spy and py_spy:
            for driver in args.drivers.split(","):
                _flame_graph(py_spy, server.url(driver), driver, args)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
