"""What each variant saves when things break: recovery, half-open connections, the chaos ledger."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa

from dropsafe._bench._engines import SCHEMA, Variant, bench_driver, make_async, make_sync
from dropsafe._bench._ledger import (
    NAIVE_ATTEMPTS,
    NAIVE_BACKOFF,
    guarded_writers,
    insert_naively,
    prepare,
    run_sync,
    server_faults,
)
from dropsafe._bench._report import bar_plot, table
from dropsafe.testing import (
    ChaosProxy,
    PostgresServer,
    kernel_blackhole,
    kernel_blackhole_unavailable,
    multi_host_url,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from dropsafe._bench._ledger import Ledger

__all__ = [
    "HALF_OPEN_VARIANTS",
    "PRE_PING_TCP",
    "run_half_open",
    "run_ledger",
    "run_recovery",
]

DRIVERS = ("psycopg2", "psycopg", "asyncpg")
VARIANTS = (Variant("plain"), Variant("pre_ping"), Variant("dropsafe"))
#: pool_pre_ping with dropsafe's TCP settings (keepalives, tcp_user_timeout, connect timeout)
#: set by hand: the baseline a careful user would run against half-open connections.
PRE_PING_TCP = Variant("pre_ping + TCP settings", tcp=True)
HALF_OPEN_VARIANTS = (Variant("plain"), Variant("pre_ping"), PRE_PING_TCP, Variant("dropsafe"))
_GIVE_UP = 30.0
_BEFORE_FAULT = 5  # outcomes the client has seen before the fault strikes
_CANCEL_WAIT_S = 10.0  # a cancelled request ends at once: its connection is only closed
_LEFTOVER_WAIT_S = 2.0  # what a request left on its loop: SQLAlchemy bounds a graceful close so


@dataclass
class Timeline:
    """Outcomes of back-to-back requests: (when, ok) pairs."""

    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def first_success_after(self, moment: float) -> float | None:
        return next((t for t, ok in list(self.outcomes) if ok and t > moment), None)

    def errors_between(self, start: float, end: float) -> int:
        return sum(1 for t, ok in list(self.outcomes) if not ok and start <= t <= end)


def _client(variant: Variant, driver: str, url: str, timeline: Timeline) -> threading.Thread:
    """Issue write requests back to back in a thread until told to stop."""
    if driver == "asyncpg":

        async def loop() -> None:
            target = await make_async(variant, url, 1)
            request, engine = target.request, target.engine
            try:
                await request("write")
                timeline.outcomes.append((time.monotonic(), True))
                while not timeline.stop.is_set():
                    try:
                        await request("write")
                    except Exception:  # an app-visible error, counted
                        timeline.outcomes.append((time.monotonic(), False))
                        await asyncio.sleep(0.01)  # an app would not spin on errors either
                    else:
                        timeline.outcomes.append((time.monotonic(), True))
            finally:
                await engine.dispose()

        return threading.Thread(target=asyncio.run, args=(loop(),), daemon=True)

    def run() -> None:
        target = make_sync(variant, url, 1)
        request = target.request
        try:
            while not timeline.stop.is_set():
                try:
                    request("write")
                except Exception:  # an app-visible error, counted
                    timeline.outcomes.append((time.monotonic(), False))
                    time.sleep(0.01)
                else:
                    timeline.outcomes.append((time.monotonic(), True))
        finally:
            target.dispose()

    return threading.Thread(target=run, daemon=True)


def _wait(ready: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.01)
    return False


def _recover_once(scenario: str, driver: str, variant: Variant) -> tuple[float, float | None, int]:
    """Return the downtime, the time from the server's return to a success, and the errors."""
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(PostgresServer())
        primary.execute(SCHEMA)
        if scenario == "promotion":
            standby = primary.make_standby()
            stack.callback(standby.close)
            url = multi_host_url([primary, standby], bench_driver(driver))
        else:
            url = primary.url(bench_driver(driver))
        timeline = Timeline()
        thread = _client(variant, driver, url, timeline)
        thread.start()
        try:
            if not _wait(lambda: len(timeline.outcomes) >= _BEFORE_FAULT, _GIVE_UP):
                return 0.0, None, 0
            fault_at = time.monotonic()
            if scenario == "promotion":
                primary.stop("immediate")
                standby.promote()
            else:
                primary.restart("fast")
            back_at = time.monotonic()
            _wait(lambda: timeline.first_success_after(back_at) is not None, _GIVE_UP)
            first = timeline.first_success_after(back_at)
            errors = timeline.errors_between(fault_at, first or time.monotonic())
            return back_at - fault_at, (None if first is None else first - back_at), errors
        finally:
            timeline.stop.set()
            thread.join(timeout=60)


def run_recovery(out: Path, *, log: Callable[[str], None]) -> list[str]:
    """Time from a restart and from a promotion to the first successful write."""
    rows, series = [], {}
    for scenario in ("restart", "promotion"):
        for variant in VARIANTS:
            values = []
            for driver in DRIVERS:
                downtime, seconds, errors = _recover_once(scenario, driver, variant)
                shown = "no success in 30 s" if seconds is None else f"{seconds:.3f}"
                rows.append([scenario, driver, variant.name, f"{downtime:.2f}", shown, errors])
                values.append(seconds if seconds is not None else _GIVE_UP)
                log(f"recovery {scenario} {driver} {variant.name}: {shown}s, {errors} errors")
            series[f"{scenario}: {variant.name}"] = values
    picture = out / "recovery.png"
    bar_plot(
        list(DRIVERS),
        series,
        title="Seconds from the server's return to the first successful write (lower is better)",
        ylabel="seconds",
        path=picture,
    )
    return [
        "## Recovery",
        "",
        (
            "One client writes back to back (plain and pre_ping: a session per write, as the "
            "app does; dropsafe: run_transaction). `restart`: the server restarts (fast). "
            "`promotion`: the primary stops (immediate) and its standby is promoted (multi-host "
            "URL). Downtime: until the restart or the promotion completed. Then: how long until "
            "a write succeeded, and the errors the app saw from the fault to that success."
        ),
        "",
        (
            "Fairness: every variant writes through a one-connection pool that is open before "
            "the fault. plain and pre_ping retry nothing: their errors are what an app without "
            "a retry loop shows its users (the ledger below compares with a retry loop)."
        ),
        "",
        *table(
            [
                "fault",
                "driver",
                "variant",
                "downtime (s)",
                "first success after (s)",
                "app-visible errors",
            ],
            rows,
            text_columns=3,
        ),
        "",
        f"![recovery]({picture.name})",
    ]


def run_half_open(out: Path, *, cap: float, log: Callable[[str], None]) -> list[str]:
    """Time for a request on a kernel-blackholed connection to end, every variant at once."""
    reason = kernel_blackhole_unavailable()
    if reason is not None:
        return ["## Half-open connections", "", f"Not measured here: {reason}."]
    ended: dict[tuple[str, str], float] = {}
    cleanups: list[Callable[[], None]] = []
    threads: list[threading.Thread] = []
    with PostgresServer() as server:
        server.execute(SCHEMA)
        requests = [
            (driver, variant.name, _warm(variant, driver, server, cleanups))
            for driver in DRIVERS
            for variant in HALF_OPEN_VARIANTS
        ]
        with kernel_blackhole(server.port):
            started = time.monotonic()

            def timed(key: tuple[str, str], request: Callable[[], None]) -> None:
                with contextlib.suppress(Exception):
                    request()
                ended[key] = time.monotonic() - started

            threads += [
                threading.Thread(target=timed, args=((d, v), r), daemon=True)
                for d, v, r in requests
            ]
            for thread in threads:
                thread.start()
            _wait(lambda: len(ended) == len(requests), cap)
        log(f"half-open: {ended}")
    # The server is gone now: the next retransmission of each hung request meets a reset, so
    # the requests end and their engines and loops can be closed.
    for thread in threads:
        thread.join(timeout=3 * cap)
    for cleanup in cleanups:
        with contextlib.suppress(Exception):
            cleanup()
    rows = [
        [
            driver,
            variant.name,
            f"{ended[driver, variant.name]:.1f}"
            if (driver, variant.name) in ended and ended[driver, variant.name] <= cap
            else f"> {cap:g} (capped)",
        ]
        for driver in DRIVERS
        for variant in HALF_OPEN_VARIANTS
    ]
    series = {
        variant.name: [min(ended.get((d, variant.name), cap), cap) for d in DRIVERS]
        for variant in HALF_OPEN_VARIANTS
    }
    picture = out / "half_open.png"
    bar_plot(
        list(DRIVERS),
        series,
        title=f"Seconds until a request on a half-open connection ends (capped at {cap:g} s)",
        ylabel="seconds",
        path=picture,
    )
    return [
        "## Half-open connections",
        "",
        (
            "A warmed pool; then every packet to and from the server is dropped in the kernel and "
            "one request per variant is sent, all at once. With libpq's and asyncpg's defaults "
            "(`plain`, `pre_ping`) the request waits for TCP's retransmission timeout (about 15 "
            "minutes on Linux)."
        ),
        "",
        _half_open_fairness(ended, cap),
        "",
        *table(["driver", "variant", "request ended after (s)"], rows, text_columns=2),
        "",
        f"![half-open]({picture.name})",
    ]


def _half_open_fairness(ended: dict[tuple[str, str], float], cap: float) -> str:
    """Say what the fair baseline gets, with this run's numbers: most of the gap is TCP's."""

    def shown(name: str) -> str:
        values = [ended.get((driver, name), math.inf) for driver in DRIVERS]
        if all(value > cap for value in values):
            return f"more than {cap:g} s"
        low, high = min(values), max(values)
        text = f"{low:.1f} s" if round(low, 1) == round(high, 1) else f"{low:.1f}-{high:.1f} s"
        return text if high <= cap else f"{text} (some capped)"

    return (
        f"Fairness: `{PRE_PING_TCP.name}` is pool_pre_ping with the TCP settings dropsafe sets, "
        "written by hand as a careful user would: libpq's `keepalives`, `keepalives_idle`, "
        "`keepalives_interval`, `keepalives_count`, `tcp_user_timeout` and `connect_timeout` as "
        "`connect_args` (psycopg2, psycopg); for asyncpg, which takes no such arguments, the same "
        "socket options set in a `connect` listener and `timeout` as the connect timeout. "
        f"It ends in {shown(PRE_PING_TCP.name)}, against {shown('dropsafe')} for dropsafe: "
        "most of dropsafe's advantage here comes from these settings, which anyone can set. "
        "What remains is pre_ping's reconnect after its ping has failed, which waits out the "
        "connect timeout against the unreachable server; both end in an error."
    )


def _warm(
    variant: Variant, driver: str, server: PostgresServer, cleanups: list[Callable[[], None]]
) -> Callable[[], None]:
    """Return a request on a warmed one-connection engine, ready to run in any thread."""
    url = server.url(bench_driver(driver))
    if driver != "asyncpg":
        target = make_sync(variant, url, 1)
        cleanups.append(target.dispose)
        target.request("query")
        return lambda: _discard(target.request("query"))
    loop = asyncio.new_event_loop()
    transports = _keep_transports(loop)
    try:
        atarget = loop.run_until_complete(make_async(variant, url, 1))
    except BaseException:
        _close_loop(loop, transports)
        raise
    arequest, engine = atarget.request, atarget.engine
    idle = threading.Event()
    idle.set()

    def request() -> None:
        idle.clear()
        try:
            loop.run_until_complete(arequest("query"))
        except asyncio.CancelledError:
            return  # given up by close(): its cap was passed long ago
        finally:
            idle.set()

    def close() -> None:
        # A request may still hang on the loop (a blackholed socket outlives every join):
        # cancel it there and let it end, or its connection, engine and loop are never closed
        # and its transport is reported unclosed in whatever test collects it.
        if not idle.is_set():
            loop.call_soon_threadsafe(_cancel_every_task, loop)
            if not idle.wait(_CANCEL_WAIT_S):
                return  # still running: closing a running loop is not possible
        try:
            loop.run_until_complete(engine.dispose())
        finally:
            _close_loop(loop, transports)

    cleanups.append(close)
    request()  # warm: the pool holds its one connection before the blackhole
    return request


def _cancel_every_task(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def _keep_transports(loop: asyncio.AbstractEventLoop) -> list[asyncio.BaseTransport]:
    """Return a list that ``loop`` adds each connection's transport to (asyncpg makes them so)."""
    made: list[asyncio.BaseTransport] = []
    create = cast(
        "Callable[..., Awaitable[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]]",
        loop.create_connection,
    )

    async def create_connection(
        *args: object, **kwargs: object
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        transport, protocol = await create(*args, **kwargs)
        made.append(transport)
        return transport, protocol

    loop.create_connection = create_connection  # type: ignore[method-assign,assignment]
    return made


def _close_loop(loop: asyncio.AbstractEventLoop, transports: list[asyncio.BaseTransport]) -> None:
    """Close ``loop`` once what still runs on it has ended and each of its sockets is closed.

    What a request leaves behind (SQLAlchemy's shielded graceful close of a connection it
    invalidated, a TLS shutdown waiting for a dead peer, a close whose last step is a callback
    the loop never ran) would hold a socket open past the loop: the garbage collector then
    reports it unclosed (a ResourceWarning, an error in the test suite) in whatever runs next.
    """
    try:
        tasks = asyncio.all_tasks(loop)
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=_LEFTOVER_WAIT_S))
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for transport in transports:
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
        loop.run_until_complete(asyncio.sleep(0))  # one turn: their connection_lost callbacks
    finally:
        loop.close()


def _discard(value: object) -> None:
    del value


def run_ledger(
    out: Path, *, drivers: tuple[str, ...], seconds: float, log: Callable[[str], None]
) -> list[str]:
    """Acknowledged ops per second, lost and duplicated ops: naive loop vs dropsafe."""
    del out
    rows = []
    for driver in drivers:
        for name in ("naive", "dropsafe"):
            with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
                prepare(server)
                engines: list[Any] = []
                factory = _ledger_factory(
                    name, proxy.route(server.url(bench_driver(driver))), engines
                )
                try:
                    ledger = run_sync(server_faults(server, proxy), factory, 31, seconds=seconds)
                finally:
                    for engine in engines:
                        engine.dispose()
                lost, duplicated = ledger.audit(server)
            log(f"ledger {driver} {name}: {ledger.summary(lost, duplicated)}")
            rows.append(
                [
                    driver,
                    name,
                    f"{len(ledger.acknowledged) / ledger.seconds:.1f}",
                    len(ledger.acknowledged),
                    len(lost),
                    len(duplicated),
                    len(ledger.failed),
                    sum(1 for event in ledger.resolved if event.outcome != "unknown"),
                ]
            )
    return [
        "## Chaos ledger",
        "",
        (
            f"4 writers for {seconds:g} s insert rows tagged with fresh op ids "
            "(no unique constraint) "
            "while a nemesis cuts connections (FIN, RST) mid-COMMIT, terminates backends and "
            "restarts the server (fast, then crash). `naive`: pre_ping plus a loop that runs the "
            "unit again after a disconnect, as careful teams write today."
        ),
        "",
        (
            f"Fairness: the naive loop also retries a failed connect (refused, or the server "
            f"starting up or shutting down), up to {NAIVE_ATTEMPTS} attempts with a backoff "
            f"from {NAIVE_BACKOFF[0] * 1000:g} ms doubling to {NAIVE_BACKOFF[1] * 1000:g} ms, "
            "as dropsafe does: nothing was sent, so a careful user retries it too. Its "
            "`failed` column then counts only what such a loop cannot handle. Its "
            "`duplicated` column is what rerunning a unit after a lost COMMIT reply does "
            "without asking the server whether the COMMIT happened."
        ),
        "",
        _ledger_comparison(rows),
        "",
        *table(
            [
                "driver",
                "variant",
                "acked ops/s",
                "acked",
                "lost",
                "duplicated",
                "failed",
                "commits resolved",
            ],
            rows,
            text_columns=2,
        ),
    ]


def _ledger_comparison(rows: list[list[Any]]) -> str:
    """Say, with this run's totals, where the two differ and where they do not."""
    totals = {
        name: [sum(int(row[column]) for row in rows if row[1] == name) for column in (3, 5, 6)]
        for name in ("naive", "dropsafe")
    }
    naive_acked, naive_duplicated, naive_failed = totals["naive"]
    acked, duplicated, failed = totals["dropsafe"]
    said = (
        f"In this run, all drivers together: acknowledged {naive_acked} ops (naive) against "
        f"{acked} (dropsafe), failed {naive_failed} against {failed}, duplicated "
        f"{naive_duplicated} against {duplicated}. "
    )
    if naive_failed <= failed and naive_acked >= 0.9 * acked:
        said += (
            "With failed connects retried, the naive loop keeps up with dropsafe: dropsafe's "
            "advantage in throughput and failures is gone, "
        )
    else:
        said += "dropsafe still acknowledges more or fails less here, "
    return said + (
        "and what separates them is the duplicates, which only resolving each ambiguous "
        "COMMIT's outcome removes."
    )


def _ledger_factory(
    name: str, url: str, engines: list[Any]
) -> Callable[[Ledger], Callable[[str], object]]:
    def factory(ledger: Ledger) -> Callable[[str], object]:
        if name == "dropsafe":
            return guarded_writers(url, engines)(ledger)
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
        engines.append(engine)
        return lambda op_id: insert_naively(engine, op_id)

    return factory
