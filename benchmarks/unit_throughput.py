"""One-INSERT units per second at a given RTT: plain, pre_ping, psycopg_pool, dropsafe (issue 28).

Times one-INSERT units of work back to back, per driver, for 1 client on a pool of 1 and for
4 clients on a pool of 4, through a `ChaosProxy` that delays each direction by half the RTT
(at 0 ms the clients go straight to the server: a proxy would only add its own CPU). Variants:

- ``plain``: SQLAlchemy's pool, ``with Session.begin(): session.execute(INSERT)``;
- ``pre_ping``: the same with ``pool_pre_ping=True``;
- ``psycopg_pool check`` (psycopg 3 only): ``with pool.connection() as c: c.execute(INSERT)``
  on a psycopg_pool with ``check=ConnectionPool.check_connection`` (a round trip per getconn);
- ``unverified``: ``dropsafe.run_transaction`` with ``verify_commits=False``;
- ``verified``: ``dropsafe.run_transaction`` with the commit guard (the default).

Fairness: every pool is warmed (its connections open, 10 units per client run) before the
clock starts; the variants are interleaved within each round and each cell keeps the best of
``--rounds`` (a shared machine's noise only ever lowers a rate); the proxy runs in a process
of its own, so its event loop does not take the clients' GIL. The clients' CPU per unit
(``time.process_time`` of this process over the units) and the server's (every process of the
server, from ``/proc/<pid>/schedstat``) are printed too: at 0 ms they are what separates the
variants, and the machine's load moves them less than the rate. Each RTT's table also gives a
``SELECT 1``'s measured round trip: the proxy's event loop sleeps in whole milliseconds of
epoll and is scheduled late on a loaded machine, so "1 ms" is about 2.5 ms on the wire.

``--write`` writes the tables, the machine (``uname -a``, CPU model) and the load average at
the start and the end into ``benchmarks/results/UNIT_THROUGHPUT.md``. Example (about 15 min
on 2 cores)::

    python benchmarks/unit_throughput.py --rtt-ms 0,1,10 --rounds 3 --seconds 3 --write
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe.testing import ChaosProxy, PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.connection import Connection

    from sqlalchemy.ext.asyncio import AsyncSession

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "UNIT_THROUGHPUT.md"
DRIVERS = ("psycopg2", "psycopg", "asyncpg")
VARIANTS = ("plain", "pre_ping", "psycopg_pool check", "unverified", "verified")
#: Not run unless asked (``--variants``): verified, with the driver's own BEGIN in a flight of
#: its own (``begin_in_first_flight=False``), what BEGIN in the first flight gains.
BEGIN_ALONE = "verified (BEGIN alone)"
INSERT_SQL = "INSERT INTO unit_bench (v) VALUES (1)"
INSERT = sa.text(INSERT_SQL)
#: Units each client runs before the clock starts (psycopg 3 prepares at the fifth).
WARM_UNITS = 10
#: Seconds to wait for the proxy process to listen, or to stop.
_DEADLINE = 30.0


@dataclass
class Cell:
    """Units per second and the client's CPU microseconds per unit of one timed run."""

    rate: float
    cpu_us: float
    server_us: float


def _variants(driver: str, wanted: list[str]) -> list[str]:
    return [v for v in wanted if v != "psycopg_pool check" or driver == "psycopg"]


def _policy(variant: str) -> dropsafe.Policy:
    # "verified": with its xid read in its INSERT's flight (read_xid_in_flight, off by default
    # since these results: docs/guarantees.md says why), as UNIT_THROUGHPUT.md was measured.
    return dropsafe.Policy(
        pool=dropsafe.PoolPolicy(
            read_xid_in_flight=True, begin_in_first_flight=variant != BEGIN_ALONE
        ),
        unit=dropsafe.UnitPolicy(verify_commits=variant in {"verified", BEGIN_ALONE}),
    )


class ServerCpu:
    """The CPU seconds the server's processes (the postmaster and its children) have used.

    Read from ``/proc/<pid>/schedstat`` (nanoseconds on the CPU), where it can be read; 0
    elsewhere. At 0 ms RTT the server's share of a unit's time is what the client cannot see.
    """

    def __init__(self) -> None:
        self.postmaster: int | None = None

    def watch(self, server: PostgresServer) -> None:
        try:
            first = (server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            self.postmaster = int(first)
        except (OSError, ValueError):
            self.postmaster = None

    def __call__(self) -> float:
        if self.postmaster is None:
            return 0.0
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                parent = int(stat.rpartition(")")[2].split()[1])  # after the name: state, ppid
                if parent != self.postmaster and int(entry.name) != self.postmaster:
                    continue
                total += int(Path(entry.path, "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a process that ended meanwhile
        return total / 1e9


server_cpu = ServerCpu()


# -- the proxy, in a process of its own --------------------------------------------------------


def _serve_proxy(host: str, port: int, rtt_ms: float, pipe: Connection) -> None:
    with ChaosProxy(host, port) as proxy:
        proxy.latency(rtt_ms / 2)
        pipe.send(proxy.port)
        pipe.recv()  # until told to stop (or the parent is gone: EOFError)


class ProxyProcess:
    """A `ChaosProxy` with ``rtt_ms / 2`` of latency each way, run by a child process."""

    def __init__(self, host: str, port: int, rtt_ms: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_serve_proxy, args=(host, port, rtt_ms, child), daemon=True
        )
        self._process.start()
        if not self._pipe.poll(_DEADLINE):
            self._process.kill()
            msg = "the proxy process did not start listening"
            raise TimeoutError(msg)
        self.port: int = self._pipe.recv()

    def route(self, url: str) -> str:
        parsed = sa.make_url(url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def close(self) -> None:
        self._pipe.send(None)
        self._process.join(_DEADLINE)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(_DEADLINE)


# -- sync drivers ------------------------------------------------------------------------------


def _sync_unit(
    variant: str, url: str, clients: int
) -> tuple[Callable[[], object], Callable[[], None]]:
    """Return one unit on a new pool of ``clients`` connections of ``variant``, and its close."""
    if variant == "psycopg_pool check":
        import psycopg_pool

        conninfo = sa.make_url(url).set(drivername="postgresql")
        pool = psycopg_pool.ConnectionPool(
            conninfo.render_as_string(hide_password=False),
            min_size=clients,
            max_size=clients,
            check=psycopg_pool.ConnectionPool.check_connection,
            open=True,
        )
        pool.wait(timeout=_DEADLINE)

        def pooled() -> object:
            with pool.connection() as connection:  # commits on the way out
                return connection.execute(INSERT_SQL)

        return pooled, pool.close
    if variant in ("plain", "pre_ping"):
        engine = sa.create_engine(
            url, pool_size=clients, max_overflow=0, pool_pre_ping=variant == "pre_ping"
        )
    else:
        engine = dropsafe.create_engine(
            url, policy=_policy(variant), pool_size=clients, max_overflow=0
        )
    factory = sessionmaker(engine)

    def write(session: Session) -> None:
        session.execute(INSERT)

    def unit() -> object:
        if variant in ("plain", "pre_ping"):
            with factory() as session, session.begin():
                return session.execute(INSERT)
        return dropsafe.run_transaction(factory, write)

    return unit, engine.dispose


def _time_sync(variant: str, url: str, clients: int, seconds: float) -> Cell:
    unit, close = _sync_unit(variant, url, clients)
    try:
        clock: dict[str, float] = {}

        def started() -> None:  # run once, by the last client to arrive, before any goes on
            clock["server"] = server_cpu()
            clock["cpu"], clock["began"] = time.process_time(), time.perf_counter()
            clock["stop_at"] = clock["began"] + seconds

        start = threading.Barrier(clients, action=started)
        done = [0] * clients
        failures: list[BaseException] = []

        def client(index: int) -> None:
            try:
                for _ in range(WARM_UNITS):
                    unit()
                start.wait(_DEADLINE)  # every client warmed (and every connection open)
                n = 0
                while time.perf_counter() < clock["stop_at"]:
                    unit()
                    n += 1
                done[index] = n
            except BaseException as error:  # noqa: BLE001 - raised below, the barrier broken
                failures.append(error)
                start.abort()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 2 * _DEADLINE)
        if failures:
            raise failures[0]
        if any(thread.is_alive() for thread in threads):
            msg = f"{variant}: a client did not finish in time"
            raise TimeoutError(msg)
        wall = time.perf_counter() - clock["began"]
        cpu = time.process_time() - clock["cpu"]
        server = server_cpu() - clock["server"]
        units = sum(done)
        return Cell(units / wall, cpu / units * 1e6, server / units * 1e6)
    finally:
        close()


# -- asyncpg -----------------------------------------------------------------------------------


async def _time_async(variant: str, url: str, clients: int, seconds: float) -> Cell:
    if variant in ("plain", "pre_ping"):
        engine = create_async_engine(
            url, pool_size=clients, max_overflow=0, pool_pre_ping=variant == "pre_ping"
        )
    else:
        engine = dropsafe.create_async_engine(
            url, policy=_policy(variant), pool_size=clients, max_overflow=0
        )
    factory = async_sessionmaker(engine)

    async def write(session: AsyncSession) -> None:
        await session.execute(INSERT)

    async def unit() -> object:
        if variant in ("plain", "pre_ping"):
            async with factory() as session, session.begin():
                return await session.execute(INSERT)
        return await dropsafe.run_transaction_async(factory, write)

    async def warm() -> None:
        for _ in range(WARM_UNITS):
            await unit()

    async def client(stop_at: float) -> int:
        n = 0
        while time.perf_counter() < stop_at:
            await unit()
            n += 1
        return n

    try:
        await asyncio.wait_for(asyncio.gather(*(warm() for _ in range(clients))), _DEADLINE)
        server = server_cpu()
        cpu, began = time.process_time(), time.perf_counter()
        counts = await asyncio.wait_for(
            asyncio.gather(*(client(began + seconds) for _ in range(clients))),
            seconds + _DEADLINE,
        )
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        server = server_cpu() - server
        units = sum(counts)
        return Cell(units / wall, cpu / units * 1e6, server / units * 1e6)
    finally:
        await engine.dispose()


def time_cell(driver: str, variant: str, url: str, clients: int, seconds: float) -> Cell:
    """Units per second of ``variant`` on ``driver``, ``clients`` at once, for ``seconds``."""
    if driver == "asyncpg":
        return asyncio.run(_time_async(variant, url, clients, seconds))
    return _time_sync(variant, url, clients, seconds)


# -- what the psycopg2 read costs the server -------------------------------------------------


def read_costs(server: PostgresServer, transactions: int, rounds: int) -> str:
    """Markdown: the server's CPU and the client's wake-ups per psycopg2 transaction, per shape.

    BEGIN, a statement and COMMIT on one psycopg2 connection, no SQLAlchemy: the INSERT alone,
    with dropsafe's read in its flight (a ``DO`` block whose NOTICE carries the columns), and
    the parts of that read apart (the same columns computed in a ``DO`` block without a NOTICE,
    a NOTICE of a constant, an empty block, the columns as a ``SELECT`` before the INSERT).
    The least of ``rounds`` of ``transactions``, shapes interleaved.
    """
    from dropsafe._commit_truth.server_sql import xid_question
    from dropsafe._drivers.psycopg2 import _READ_FIRST

    engine = sa.create_engine(server.url("psycopg2"), poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            columns = xid_question(engine.dialect, with_wal=True).before
            dbapi: Any = connection.connection.dbapi_connection
            backend = int(dbapi.info.backend_pid)
            cursor = dbapi.cursor()
            shapes = {
                "INSERT": INSERT_SQL,
                "dropsafe's read; INSERT": _READ_FIRST.format(columns=columns) + INSERT_SQL,
                "DO: the columns, no NOTICE; INSERT": (
                    f"DO $x$BEGIN PERFORM pg_catalog.json_build_array({columns}); END$x$;\n"
                    + INSERT_SQL
                ),
                "DO: a constant's NOTICE; INSERT": (
                    "DO $x$BEGIN RAISE NOTICE 'x'; END$x$;\n" + INSERT_SQL
                ),
                "DO: empty; INSERT": "DO $x$BEGIN END$x$;\n" + INSERT_SQL,
                "SELECT the columns; INSERT": f"SELECT {columns};\n" + INSERT_SQL,
            }
            best: dict[str, tuple[float, float]] = {}
            for _ in range(rounds):
                for name, sql in shapes.items():
                    cpu_ns, woken = _server_ns(backend), _wake_ups()
                    for _ in range(transactions):
                        cursor.execute(sql)  # psycopg2 sends BEGIN first
                        dbapi.commit()
                        del dbapi.notices[:]
                    cell = (
                        (_server_ns(backend) - cpu_ns) / transactions / 1e3,
                        (_wake_ups() - woken) / transactions,
                    )
                    old = best.get(name, cell)
                    best[name] = (min(old[0], cell[0]), min(old[1], cell[1]))
    finally:
        engine.dispose()
    lines = [
        "## What psycopg2's read in flight costs the server",
        "",
        (
            f"BEGIN, the statement and COMMIT on one psycopg2 connection (no SQLAlchemy), the "
            f"least of {rounds} interleaved rounds of {transactions}: the server backend's CPU "
            "and the client's wake-ups (voluntary context switches) per transaction."
        ),
        "",
        "| statement | server CPU µs | over the INSERT alone | client wake-ups |",
        "| --- | ---: | ---: | ---: |",
    ]
    alone = best["INSERT"][0]
    for name, (server_us, wakes) in best.items():
        lines.append(f"| {name} | {server_us:.0f} | {server_us - alone:+.0f} | {wakes:.2f} |")
    return "\n".join(lines)


def _server_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _wake_ups() -> int:
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    return 0


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to time at each RTT."""

    drivers: list[str]
    variants: list[str]
    clients: list[int]
    rounds: int
    seconds: float


@dataclass
class Table:
    rtt_ms: float
    measured_rtt_ms: float
    best: dict[tuple[str, int, str], Cell]
    load_before: str
    load_after: str


def measured_rtt(url: str) -> float:
    """Return the median milliseconds of a ``SELECT 1`` on a psycopg2 connection in autocommit.

    What the proxy's delay really is: its event loop sleeps in whole milliseconds of epoll.
    """
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            connection.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            times = []
            for _ in range(30):
                began = time.perf_counter()
                cursor.execute("SELECT 1")
                cursor.fetchall()
                times.append(time.perf_counter() - began)
            return sorted(times)[len(times) // 2] * 1000
    finally:
        engine.dispose()


def run_rtt(server: PostgresServer, plan: Plan, rtt_ms: float) -> Table:
    """Time every cell at ``rtt_ms``, variants interleaved within each round, best kept."""
    load_before = _load()
    proxy = ProxyProcess(server.host, server.port, rtt_ms) if rtt_ms else None
    best: dict[tuple[str, int, str], Cell] = {}
    try:
        rtt_url = server.url("psycopg2")
        measured = measured_rtt(proxy.route(rtt_url) if proxy else rtt_url)
        print(f"{rtt_ms:g} ms asked: {measured:.2f} ms measured (SELECT 1, median)", flush=True)
        for driver in plan.drivers:
            url = server.url(driver)  # type: ignore[arg-type]
            if proxy is not None:
                url = proxy.route(url)
            variants = _variants(driver, plan.variants)
            for clients in plan.clients:
                for _ in range(plan.rounds):
                    for variant in variants:
                        cell = time_cell(driver, variant, url, clients, plan.seconds)
                        old = best.get((driver, clients, variant), cell)
                        # The best rate and the least CPU, each over the rounds.
                        best[driver, clients, variant] = Cell(
                            max(old.rate, cell.rate),
                            min(old.cpu_us, cell.cpu_us),
                            min(old.server_us, cell.server_us),
                        )
                for variant in variants:
                    cell = best[driver, clients, variant]
                    plain = best.get((driver, clients, "plain"), cell)
                    print(
                        f"{rtt_ms:4g} ms  {driver:9} {clients} client(s)  {variant:19} "
                        f"{cell.rate:8.1f} units/s ({cell.rate / plain.rate:4.2f}x)  "
                        f"cpu {cell.cpu_us:6.0f} us/unit ({cell.cpu_us / plain.cpu_us:4.2f}x)  "
                        f"server cpu {cell.server_us:6.0f} us/unit",
                        flush=True,
                    )
    finally:
        if proxy is not None:
            proxy.close()
    return Table(rtt_ms, measured, best, load_before, _load())


def _rows(table: Table, plan: Plan, metric: str) -> list[str]:
    """Markdown rows of ``metric`` (a `Cell` field) per driver and client count."""
    rows = []
    for driver in plan.drivers:
        for clients in plan.clients:
            plain = table.best.get((driver, clients, "plain"))
            cells = []
            for variant in plan.variants:
                cell = table.best.get((driver, clients, variant))
                if cell is None:
                    cells.append("-")
                    continue
                value = getattr(cell, metric)
                text = f"{value:.1f}" if metric == "rate" else f"{value:.0f}"
                if plain is not None:
                    text += f" ({value / getattr(plain, metric):.2f}x)"
                cells.append(text)
            rows.append(f"| {driver} | {clients} | " + " | ".join(cells) + " |")
    return rows


def markdown(table: Table, plan: Plan) -> str:
    where = "straight to the server" if not table.rtt_ms else "through the proxy"
    head = " | ".join(plan.variants)
    rule = " | ".join("---:" for _ in plan.variants)
    return "\n".join(
        [
            f"## {table.rtt_ms:g} ms RTT ({where}; SELECT 1: {table.measured_rtt_ms:.2f} ms)",
            "",
            (
                f"One-INSERT units per second, best of {plan.rounds} interleaved rounds of "
                f"{plan.seconds:g} s, and over plain. Load average before: {table.load_before}; "
                f"after: {table.load_after}."
            ),
            "",
            f"| driver | clients | {head} |",
            f"| --- | ---: | {rule} |",
            *_rows(table, plan, "rate"),
            "",
            "The client's CPU per unit (µs; the least of the rounds), and over plain:",
            "",
            f"| driver | clients | {head} |",
            f"| --- | ---: | {rule} |",
            *_rows(table, plan, "cpu_us"),
            "",
            (
                "The server's CPU per unit (µs; every process of the server, the least of the "
                "rounds), and over plain:"
            ),
            "",
            f"| driver | clients | {head} |",
            f"| --- | ---: | {rule} |",
            *_rows(table, plan, "server_us"),
        ]
    )


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def _machine() -> Iterator[str]:
    yield f"`{' '.join(platform.uname())}`"
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    yield f"CPU: {model}, {os.cpu_count()} logical cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", default="0,1,10", help="comma-separated RTTs to time at")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per cell per round")
    parser.add_argument("--no-tls", action="store_true", help="a server without TLS")
    parser.add_argument(
        "--read-costs",
        type=int,
        default=0,
        metavar="N",
        help="also time N psycopg2 transactions per shape of the xid read (server CPU)",
    )
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    parser.add_argument(
        "--append", action="store_true", help=f"add this run to {RESULTS.name}, after the last"
    )
    args = parser.parse_args()
    plan = Plan(
        args.drivers.split(","),
        args.variants.split(","),
        [int(c) for c in args.clients.split(",")],
        args.rounds,
        args.seconds,
    )
    started = _load()
    tables = []
    with PostgresServer(tls=not args.no_tls) as server:
        server.execute("CREATE TABLE IF NOT EXISTS unit_bench (v int)")
        server_cpu.watch(server)
        for rtt in filter(None, args.rtt_ms.split(",")):
            tables.append(run_rtt(server, plan, float(rtt)))
            server.execute("TRUNCATE unit_bench")
        costs = read_costs(server, args.read_costs, args.rounds) if args.read_costs else ""
        tls = "TLS" if server.tls else "no TLS"
    text = "\n\n".join([*(markdown(table, plan) for table in tables), *([costs] if costs else [])])
    command = (
        f"python benchmarks/unit_throughput.py --rtt-ms {args.rtt_ms} --rounds {args.rounds} "
        f"--seconds {args.seconds:g} --drivers {args.drivers} --clients {args.clients}"
        f"{f' --read-costs {args.read_costs}' if args.read_costs else ''}"
        f"{' --no-tls' if args.no_tls else ''} {'--append' if args.append else '--write'}"
    )
    header = [
        "# One-INSERT units per second: plain, pre_ping, psycopg_pool check, dropsafe",
        "",
        (
            f"Written by `{command}` (issue 28). One throwaway server ({tls}); the RTT is a "
            "`ChaosProxy` in a process of its own, half of it each way."
        ),
        "",
        *(f"- {line}" for line in _machine()),
        f"- Load average at the start: {started}; at the end: {_load()}",
        "",
    ]
    print(text)
    if args.append and RESULTS.exists():
        # A later run of some cells (more rounds, a quieter machine), kept apart from the first.
        header[0] = "## A later run"
        with RESULTS.open("a") as results:
            results.write("\n" + "\n".join(header) + "\n" + text + "\n")
    elif args.write or args.append:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(header) + "\n" + text + "\n")


if __name__ == "__main__":
    main()
