"""The long nemesis matrix: ``python benchmarks/nemesis.py [--seconds 30] [--seeds 2]``.

The ledger of tests/units/test_ledger.py, run longer and for every combination:
psycopg2, psycopg 3 (sync and async) and asyncpg; the op written by the unit or by a
``before_commit`` hook; against one server (cuts mid-COMMIT, terminations, fast, immediate and
crash restarts) and through a failover to a synchronous standby behind one endpoint. Each run
is audited: acknowledged ops lost, ops written twice, outcomes unknown, ops failed. Writes
benchmarks/results/NEMESIS.md, with the machine named. Loops are bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropsafe.testing import ChaosProxy, PostgresServer
from dropsafe.testing._ledger import (
    Faults,
    Ledger,
    failover_faults,
    guarded_writers,
    guarded_writers_async,
    prepare,
    run_async,
    run_sync,
    server_faults,
)

RESULTS = Path(__file__).parent / "results" / "NEMESIS.md"
CELLS = [
    # (driver, async, written at commit)
    ("psycopg2", False, False),
    ("psycopg2", False, True),
    ("psycopg", False, False),
    ("psycopg", True, False),
    ("asyncpg", True, False),
]


@dataclass
class Row:
    scenario: str
    driver: str
    mode: str
    seed: int
    attempted: int
    acknowledged: int
    unknown: int
    failed: int
    lost: int
    duplicated: int
    resolved: str
    faults: str
    seconds: float


def _run(
    faults: Faults,
    url: str,
    *,
    use_async: bool,
    write_at_commit: bool,
    seed: int,
    seconds: float,
) -> Ledger:
    engines: list[Any] = []
    if use_async:

        async def scenario() -> Ledger:
            try:
                return await run_async(
                    faults, guarded_writers_async(url, engines), seed, seconds=seconds
                )
            finally:
                for engine in engines:
                    await engine.dispose()

        return asyncio.run(scenario())
    try:
        factory = guarded_writers(url, engines, write_at_commit=write_at_commit)
        return run_sync(faults, factory, seed, seconds=seconds)
    finally:
        for engine in engines:
            engine.dispose()


def one(
    scenario: str,
    driver: str,
    *,
    use_async: bool,
    write_at_commit: bool,
    seed: int,
    seconds: float,
) -> Row:
    primary = PostgresServer()
    primary.start()
    standby = None
    try:
        prepare(primary)
        with ChaosProxy(primary.host, primary.port) as proxy:
            if scenario == "failover":
                standby = primary.make_standby(synchronous=True)
                faults = failover_faults(primary, standby, proxy)
            else:
                faults = server_faults(primary, proxy)
            ledger = _run(
                faults,
                proxy.route(primary.url(driver)),
                use_async=use_async,
                write_at_commit=write_at_commit,
                seed=seed,
                seconds=seconds,
            )
        audited = standby if scenario == "failover" else primary
        lost, duplicated = ledger.audit(audited)
    finally:
        if standby is not None:
            standby.close()
        primary.close()
    outcomes: dict[str, int] = {}
    for event in ledger.resolved:
        outcomes[event.outcome] = outcomes.get(event.outcome, 0) + 1
    mode = ("async" if use_async else "sync") + (
        ", op written at commit" if write_at_commit else ""
    )
    return Row(
        scenario,
        driver,
        mode,
        seed,
        len(ledger.attempted),
        len(ledger.acknowledged),
        len(ledger.unknown),
        len(ledger.failed),
        len(lost),
        len(duplicated),
        ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        ", ".join(f"{k} {v}" for k, v in sorted(ledger.faults.items())),
        ledger.seconds,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    started = time.monotonic()
    rows = []
    for scenario in ("server", "failover"):
        for driver, use_async, write_at_commit in CELLS:
            for seed in range(1, args.seeds + 1):
                row = one(
                    scenario,
                    driver,
                    use_async=use_async,
                    write_at_commit=write_at_commit,
                    seed=seed,
                    seconds=args.seconds,
                )
                print(row, flush=True)
                rows.append(row)
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
    machine += f"Python {platform.python_version()}"
    lines = [
        "# Nemesis matrix",
        "",
        (
            f"Machine: {machine}. {args.seconds:g} s per run, {args.seeds} seed(s) per cell, "
            f"{time.monotonic() - started:.0f} s in all. Command: "
            f"`python benchmarks/nemesis.py --seconds {args.seconds:g} --seeds {args.seeds}`."
        ),
        "",
        (
            "The promise: lost = 0 and duplicated = 0 everywhere; unknown only after faults "
            "that lose or move the WAL history (crash, immediate restart, failover)."
        ),
        "",
        (
            "| scenario | driver | mode | seed | attempted | acknowledged | unknown | failed "
            "| lost | duplicated | resolved | faults |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.scenario} | {r.driver} | {r.mode} | {r.seed} | {r.attempted} | {r.acknowledged} "
        f"| {r.unknown} | {r.failed} | **{r.lost}** | **{r.duplicated}** | {r.resolved} "
        f"| {r.faults} |"
        for r in rows
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")
    return 1 if any(r.lost or r.duplicated for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
