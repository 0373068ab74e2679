"""The healthy path: what each variant costs when nothing is wrong, and the commit guard's price."""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING

from dropsafe._bench._engines import (
    SCHEMA,
    Sample,
    Variant,
    bench_driver,
    drive_async,
    drive_sync,
    make_async,
    make_psycopg_pool,
    make_sync,
)
from dropsafe._bench._report import bar_plot, percentile, table
from dropsafe.testing import ChaosProxy, PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["cell_url", "run_healthy"]

DRIVERS = ("psycopg2", "psycopg", "asyncpg")
PLAIN, PRE_PING, POOL = Variant("plain"), Variant("pre_ping"), Variant("psycopg_pool check")
GUARDED, UNVERIFIED = Variant("dropsafe"), Variant("dropsafe unverified", verify=False)
NO_REPLAY = Variant("dropsafe no replay", replay=False)
Key = tuple[str, int, int, str, str]  # workload, rtt, clients, driver, variant


def _variants(driver: str, workload: str) -> list[Variant]:
    variants = [PLAIN, PRE_PING, GUARDED]
    if workload == "write":
        variants.append(UNVERIFIED)
    else:  # what the first-statement replay's marks cost a request
        variants.append(NO_REPLAY)
    if driver == "psycopg":
        variants.append(POOL)
    return variants


def cell_url(server: PostgresServer, proxy: ChaosProxy, rtt: int, driver: str) -> str:
    """Return the URL a cell measures through: the server itself at 0 ms, else the proxy.

    An in-process proxy caps throughput and takes CPU from the client, hiding what the check
    costs; it is only there to add latency.
    """
    url = server.url(bench_driver(driver))
    return url if rtt == 0 else proxy.route(url)


def _measure(server: PostgresServer, proxy: ChaosProxy, key: Key, seconds: float) -> Sample:
    workload, rtt, clients, driver, variant_name = key
    variant = next(v for v in _variants(driver, workload) if v.name == variant_name)
    url = cell_url(server, proxy, rtt, driver)
    if driver == "asyncpg":

        async def run() -> Sample:
            target = await make_async(variant, url, clients)
            try:
                return await drive_async(target, workload, clients, seconds)
            finally:
                await target.engine.dispose()

        return asyncio.run(run())
    target = (
        make_psycopg_pool(url, clients) if variant is POOL else make_sync(variant, url, clients)
    )
    try:
        return drive_sync(target, workload, clients, seconds)
    finally:
        target.dispose()


def run_healthy(out: Path, *, rounds: int, seconds: float, log: Callable[[str], None]) -> list[str]:
    """Measure every cell, interleaved in rounds; return the report's section."""
    keys: list[Key] = [
        (workload, rtt, clients, driver, variant.name)
        for workload in ("query", "write")
        for rtt in (0, 10)
        for clients in (1, 8)
        for driver in DRIVERS
        for variant in _variants(driver, workload)
    ]
    samples: dict[Key, list[Sample]] = defaultdict(list)
    with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
        server.execute(SCHEMA)
        for round_number in range(rounds):
            for rtt in (0, 10):
                proxy.latency(rtt / 2)
                for key in (k for k in keys if k[1] == rtt):
                    sample = _measure(server, proxy, key, seconds)
                    samples[key].append(sample)
                    log(f"healthy round {round_number + 1}/{rounds} {key}: {sample.rate:.0f}/s")
    return _section(samples, keys, out)


def _rate(samples: dict[Key, list[Sample]], key: Key) -> float:
    """Return the median throughput of ``key``'s rounds."""
    return statistics.median(s.rate for s in samples[key])


def _section(samples: dict[Key, list[Sample]], keys: list[Key], out: Path) -> list[str]:
    def rate(key: Key) -> float:
        return _rate(samples, key)

    def spread(key: Key) -> float:
        """Half the range of the rounds' throughputs, in percent of their median."""
        rates = [s.rate for s in samples[key]]
        return 50 * (max(rates) - min(rates)) / rate(key) if rate(key) else 0.0

    def latencies(key: Key) -> list[float]:
        return [latency for s in samples[key] for latency in s.latencies]

    lines = [
        "## Healthy path",
        "",
        (
            "Single-query requests (check out, `SELECT 1`, return) and small write transactions "
            "(one INSERT, COMMIT). Ratio = throughput / the plain pool's, same cell, same run. "
            "`psycopg_pool check` is psycopg_pool with `check=check_connection`, "
            "without SQLAlchemy. "
            "`dropsafe unverified` is run_transaction with `verify_commits=False`; `dropsafe no "
            "replay` is a hardened engine with `PoolPolicy(replay_first_statement=False)`."
        ),
        "",
        (
            "Fairness: every variant's pool holds one open connection per client before the "
            "timed window opens (psycopg_pool opens its connections up front; SQLAlchemy's pool "
            "would otherwise open 7 of its 8 inside the window and pay for them in p99), and one "
            "request runs before it. The 0 ms cells connect straight to the server over "
            "loopback: the in-process proxy would cap throughput and take CPU from the client, "
            "hiding what each check costs, so the CPU cost of dropsafe's checkout check and of "
            "the commit guard shows there in full. The 10 ms cells go through the proxy, which "
            "adds 5 ms each way. Variants are interleaved, cell by cell, in each round; "
            "`per s` is the median of the rounds and `spread` half their range. A 0 ms request "
            "takes a fraction of a millisecond, so on a loaded machine those cells are noisy: "
            "read a ratio there together with its spread (pre_ping, which does strictly more "
            "work than plain, above 1.00x is that noise)."
        ),
    ]
    groups = sorted({(k[0], k[1], k[2]) for k in keys})
    for workload, rtt, clients in groups:
        header = ["driver", "variant", "per s", "spread", "ratio", "p50 ms", "p99 ms"]
        rows = []
        for key in (k for k in keys if k[:3] == (workload, rtt, clients)):
            base = rate((workload, rtt, clients, key[3], PLAIN.name))
            lat = latencies(key)
            rows.append(
                [
                    key[3],
                    key[4],
                    f"{rate(key):.0f}",
                    f"±{spread(key):.0f}%",
                    f"{rate(key) / base:.2f}x",
                    f"{percentile(lat, 0.5) * 1000:.2f}",
                    f"{percentile(lat, 0.99) * 1000:.2f}",
                ]
            )
        title = f"{workload}, {rtt} ms RTT, {clients} client(s)"
        lines += ["", f"### {title}", "", *table(header, rows, text_columns=2)]
    for workload in ("query", "write"):
        picture = _plot(samples, workload, out)
        lines += ["", f"![{workload}]({picture.name})"]
    return lines


def _plot(samples: dict[Key, list[Sample]], workload: str, out: Path) -> Path:
    """Draw each variant's throughput relative to the plain pool's, cell by cell; its path."""
    variant_names = [v.name for v in (PLAIN, PRE_PING, GUARDED, UNVERIFIED, POOL)]
    group_names = [f"{d}\n{r} ms, {c}c" for r in (0, 10) for c in (1, 8) for d in DRIVERS]
    series: dict[str, list[float]] = {}
    for name in variant_names:
        values = []
        for rtt in (0, 10):
            for clients in (1, 8):
                for driver in DRIVERS:
                    cell: Key = (workload, rtt, clients, driver, name)
                    plain: Key = (workload, rtt, clients, driver, PLAIN.name)
                    measured = cell in samples
                    values.append(_rate(samples, cell) / _rate(samples, plain) if measured else 0.0)
        if any(values):
            series[name] = values
    picture = out / f"healthy_{workload}.png"
    bar_plot(
        group_names,
        series,
        title=f"{workload}: throughput relative to the plain pool (higher is better)",
        ylabel="ratio to plain pool",
        path=picture,
        baseline=1.0,
    )
    return picture
