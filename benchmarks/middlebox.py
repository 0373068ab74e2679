"""Pooled connections behind a NAT that forgets idle flows: ``python benchmarks/middlebox.py``.

Azure's load balancer forgets an idle flow after 4 minutes, AWS's NAT gateway and NLB after
350 s; the next packet of that flow is dropped without an answer. Here ``idle_reaper`` (nftables
and conntrack, needs root) plays that middlebox in front of one throwaway PostgreSQL (TLS on),
with the times scaled down: the middlebox forgets after ``--idle`` seconds (20), dropsafe's
default keepalive comes after 10 s, as against 240 s or 350 s in the cloud.

Each variant (x psycopg2, psycopg 3, asyncpg) fills a pool of ``--connections`` connections,
lets them sit idle until the middlebox has forgotten an idle flow, then makes that many
requests at once, each the first on its connection. The app does what such apps do: plain
SQLAlchemy runs the statement (an error reaches the app), dropsafe runs it as a unit of work
(``run_transaction``). A request not answered within ``--hang-bound`` seconds (30) counts as
hung; its socket is then shut down to end the run (left alone, TCP would give up after about
15 minutes). Every variant waits through the same idle period at the same time.

Variants: ``plain`` (libpq's and asyncpg's defaults: keepalives after 2 hours or none, no
tcp_user_timeout); ``pre_ping`` (``pool_pre_ping=True``); ``dropsafe`` (its defaults: keepalives
after 10 s, every 5 s; tcp_user_timeout 10 s); ``dropsafe, late keepalive`` (its keepalive
only after twice the middlebox's timeout: what happens when the settings do not cover it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

import dropsafe
from dropsafe._drivers import socket_fd
from dropsafe.testing import IdleReaper, PostgresServer, idle_reaper

RESULTS = Path(__file__).parent / "results" / "MIDDLEBOX.md"
DRIVERS = ("psycopg2", "psycopg", "asyncpg")
VARIANTS = ("plain", "pre_ping", "dropsafe", "dropsafe, late keepalive")
QUERY = sa.text("SELECT 1")


@dataclass
class Cell:
    """One variant with one driver: its engine, its connections' sockets, its requests."""

    variant: str
    driver: str
    engine: Any = None
    fds: list[int] = field(default_factory=list)
    # Per request: seconds until answered, or the error's type, or "hung".
    outcomes: list[float | str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set at the hang bound: what ends after it was counted as hung already.
    closed: bool = False

    def record(self, outcome: float | str) -> None:
        with self.lock:
            if not self.closed:
                self.outcomes.append(outcome)

    def close(self, connections: int) -> None:
        """Count the requests still unanswered as hung; record nothing after."""
        with self.lock:
            self.outcomes += ["hung"] * (connections - len(self.outcomes))
            self.closed = True


def _engine(variant: str, driver: str, url: str, connections: int, idle: int) -> Any:  # noqa: ANN401 - sync or async engine
    kwargs: dict[str, Any] = {"pool_size": connections, "max_overflow": 0}
    is_async = driver == "asyncpg"
    if variant in ("plain", "pre_ping"):
        make = create_async_engine if is_async else sa.create_engine
        return make(url, pool_pre_ping=variant == "pre_ping", **kwargs)
    policy = None
    if variant == "dropsafe, late keepalive":
        policy = dropsafe.Policy(connection=dropsafe.ConnectionPolicy(keepalive_idle=2 * idle))
    make_guarded = dropsafe.create_async_engine if is_async else dropsafe.create_engine
    return make_guarded(url, policy=policy, **kwargs)


def _track_sockets(cell: Cell) -> None:
    pool = cell.engine.sync_engine.pool if cell.driver == "asyncpg" else cell.engine.pool

    @event.listens_for(pool, "connect")
    def remember(dbapi_connection: Any, record: object) -> None:  # noqa: ANN401
        del record
        fd = socket_fd(dbapi_connection)
        if fd is not None:
            cell.fds.append(fd)


def _request_sync(cell: Cell) -> None:
    started = time.monotonic()
    try:
        if cell.variant.startswith("dropsafe"):
            dropsafe.run_transaction(cell.engine, lambda conn: conn.execute(QUERY).scalar())
        else:
            with cell.engine.connect() as conn:
                conn.execute(QUERY).scalar()
    except Exception as exc:  # noqa: BLE001 - what the app would see
        cell.record(type(exc).__name__)
    else:
        cell.record(time.monotonic() - started)


async def _request_async(cell: Cell) -> None:
    started = time.monotonic()

    async def unit(conn: Any) -> object:  # noqa: ANN401
        return (await conn.execute(QUERY)).scalar()

    try:
        if cell.variant.startswith("dropsafe"):
            await dropsafe.run_transaction_async(cell.engine, unit)
        else:
            async with cell.engine.connect() as conn:
                await unit(conn)
    except Exception as exc:  # noqa: BLE001 - what the app would see
        cell.record(type(exc).__name__)
    else:
        cell.record(time.monotonic() - started)


def _fill_sync(cell: Cell, connections: int) -> None:
    held = [cell.engine.connect() for _ in range(connections)]
    for conn in held:
        conn.execute(QUERY)
        conn.close()


async def _fill_async(cell: Cell, connections: int) -> None:
    held = [await cell.engine.connect() for _ in range(connections)]
    for conn in held:
        await conn.execute(QUERY)
        await conn.close()


def _run_async_cell(
    cell: Cell, connections: int, filled: threading.Barrier, go: threading.Event
) -> None:
    async def main() -> None:
        await _fill_async(cell, connections)
        await asyncio.to_thread(filled.wait)
        await asyncio.to_thread(go.wait)
        await asyncio.gather(*(_request_async(cell) for _ in range(connections)))

    asyncio.run(main())


def _run_sync_cell(
    cell: Cell, connections: int, filled: threading.Barrier, go: threading.Event
) -> None:
    _fill_sync(cell, connections)
    filled.wait()
    go.wait()
    requests = [
        threading.Thread(target=_request_sync, args=(cell,), daemon=True)
        for _ in range(connections)
    ]
    for thread in requests:
        thread.start()
    for thread in requests:
        thread.join()


def _client_port(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


def _wait_until_forgotten(server: PostgresServer, reaper: IdleReaper, idle: int) -> None:
    """Return once an idle flow opened now has been forgotten: the pools' are too by then."""
    # A connection without keepalives (libpq's start after 2 hours), idle from here on.
    clock = psycopg2.connect(
        server.url("psycopg2").replace("postgresql+psycopg2", "postgresql"),
        keepalives_idle=7200,
    )
    try:
        clock.cursor().execute("SELECT 1")
        port = _client_port(clock.fileno())
        deadline = time.monotonic() + idle + 60
        while reaper.tracked_flows(port) != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the middlebox did not forget the idle flow")
            time.sleep(0.2)
    finally:
        clock.close()


def _shut_down(fds: list[int]) -> None:
    for fd in fds:
        # Already closed (the pool replaced it): nothing to end.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


def run(idle: int, connections: int, hang_bound: float) -> tuple[list[Cell], float]:
    """Run every cell through one idle period; return them and the seconds the idle lasted."""
    with PostgresServer() as server, idle_reaper(server.port, idle) as reaper:
        cells = [Cell(variant, driver) for variant in VARIANTS for driver in DRIVERS]
        for cell in cells:
            url = server.url(cell.driver)
            cell.engine = _engine(cell.variant, cell.driver, url, connections, idle)
            _track_sockets(cell)
        filled = threading.Barrier(len(cells) + 1)
        go = threading.Event()
        workers = [
            threading.Thread(
                target=_run_async_cell if cell.driver == "asyncpg" else _run_sync_cell,
                args=(cell, connections, filled, go),
                daemon=True,
            )
            for cell in cells
        ]
        for worker in workers:
            worker.start()
        filled.wait(timeout=120)
        idle_started = time.monotonic()
        _wait_until_forgotten(server, reaper, idle)
        idle_lasted = time.monotonic() - idle_started
        go.set()
        stop = time.monotonic() + hang_bound
        for worker in workers:
            worker.join(max(0.0, stop - time.monotonic()))
        for cell, worker in zip(cells, workers, strict=True):
            cell.close(connections)
            if worker.is_alive():
                _shut_down(cell.fds)  # hung: end the waits (TCP would take about 15 minutes)
        for worker in workers:
            worker.join(30)
        for cell in cells:
            if cell.driver == "asyncpg":
                continue  # its engine belongs to its thread's ended loop
            cell.engine.dispose()
    return cells, idle_lasted


def _row(cell: Cell, connections: int) -> str:
    answered = [o for o in cell.outcomes if isinstance(o, float)]
    errors = [o for o in cell.outcomes if isinstance(o, str) and o != "hung"]
    hung = sum(1 for o in cell.outcomes if o == "hung")
    first = f"{min(answered):.2f}" if answered else "-"
    median = f"{statistics.median(answered):.2f}" if answered else "-"
    slowest = f"{max(answered):.2f}" if answered else "-"
    kinds = ", ".join(sorted(set(errors)))
    return (
        f"| {cell.variant} | {cell.driver} | {len(answered)}/{connections} | {first} | {median} "
        f"| {slowest} | {len(errors)}{f' ({kinds})' if kinds else ''} | {hung} |"
    )


def _section(
    idle: int, idle_lasted: float, cells: list[Cell], args: argparse.Namespace
) -> list[str]:
    return [
        f"## The middlebox forgets after {idle} s",
        "",
        (
            f"The pools sat idle {idle_lasted:.0f} s, until an idle flow opened after them was "
            "forgotten."
        ),
        "",
        "| variant | driver | answered | first | median | slowest | app-visible errors | hung |",
        "|---|---|---|---:|---:|---:|---|---:|",
        *(_row(cell, args.connections) for cell in cells),
        "",
    ]


def main() -> None:
    """Run the comparison and write benchmarks/results/MIDDLEBOX.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--idle",
        type=int,
        nargs="+",
        default=[20, 40],
        help="the middlebox's idle timeouts (s), one run each",
    )
    parser.add_argument("--connections", type=int, default=3, help="pooled connections per cell")
    parser.add_argument("--hang-bound", type=float, default=30.0, help="seconds before 'hung'")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.monotonic()
    sections: list[str] = []
    for idle in args.idle:
        cells, idle_lasted = run(idle, args.connections, args.hang_bound)
        sections += _section(idle, idle_lasted, cells, args)
    machine = (
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, Linux "
        f"{platform.release()}), Python {platform.python_version()}"
    )
    idles = " ".join(str(idle) for idle in args.idle)
    lines = [
        "# Behind a NAT that forgets idle flows",
        "",
        (
            f"Machine: {machine}. Command: `python benchmarks/middlebox.py --idle {idles} "
            f"--connections {args.connections} --hang-bound {args.hang_bound:g}`; "
            f"{time.monotonic() - started:.0f} s in all."
        ),
        "",
        (
            "The middlebox (`dropsafe.testing.idle_reaper`) forgets a flow after the given "
            "seconds of silence and drops its later packets. After the idle period each cell "
            f"made {args.connections} requests at once, each the first on its pooled connection "
            "(plain and pre_ping: a statement; dropsafe: `run_transaction`). Times in seconds, "
            "from the request to its answer; a request without an answer after "
            f"{args.hang_bound:g} s is hung (its socket is then shut down to end the run). The "
            "scale: dropsafe's default keepalive comes after 10 s, against 240 s (Azure) or "
            "350 s (AWS) in the cloud; `late keepalive` sets it to twice the middlebox's "
            "timeout, leaving `tcp_user_timeout` (10 s) and, past `ping_after_idle` (30 s), the "
            "checkout ping (`ping_timeout`, 5 s) to find the dead flow."
        ),
        "",
        *sections,
    ]
    args.output.write_text("\n".join(lines))
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
