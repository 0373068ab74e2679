"""Finding a dead peer fast, and a slow one never (issue 27 item 4): the scenarios, measured.

- `half_open_seconds`: a connection whose server's packets are dropped in the kernel, idle or
  in the middle of a query; seconds until the driver raises.
- `vanished_primary_seconds`: a writer on ``primary,standby``; the primary is blackholed, its
  standby promoted (after a failover manager's delay); seconds from the promotion to the first
  acknowledged write.
- `slow_link_run`: what must NOT be taken for a dead peer: a large result and a large upload
  through a slow link (latency and a bandwidth limit in a ChaosProxy), each longer than
  ``tcp_user_timeout``, and a query that computes longer than it.

Shared by the short tests (tests/engine/test_half_open.py, test_vanished_primary.py,
test_slow_link.py) and benchmarks/detection.py (several runs per driver).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe._redaction import describe_error
from dropsafe.testing._runtime import wait_until

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from dropsafe._drivers import DriverName
    from dropsafe.testing import PostgresServer

    Blackhole = Callable[[int], AbstractContextManager[None]]

__all__ = [
    "SlowLinkRun",
    "Writer",
    "half_open_seconds",
    "slow_link_run",
    "vanished_primary_seconds",
]

SLEEP = "SELECT pg_sleep(30)"
_SLEEPING = f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{SLEEP}'"
_INSERT = sa.text("INSERT INTO ledger (n) VALUES (1)")
_MEGABYTE = 1024 * 1024


def _engine_kwargs(
    server: PostgresServer, driver: DriverName, policy: dropsafe.Policy | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"connect_args": server.connect_args(driver)}
    if policy is not None:
        kwargs["policy"] = policy
    return kwargs


def _sleeping_on(server: PostgresServer) -> bool:
    return server.execute(_SLEEPING)[0][0] != "0"


def half_open_seconds(
    server: PostgresServer,
    driver: DriverName,
    blackhole: Blackhole,
    *,
    mid_query: bool,
    policy: dropsafe.Policy | None = None,
) -> float:
    """Return the seconds from a blackhole to the error of the statement caught in it.

    The statement is its transaction's second (no first-statement replay reconnects): this
    measures detection only. ``mid_query``: a query runs on the server when the link dies
    (nothing unacknowledged; keepalives must find it); else the connection is idle and the
    next statement is sent into the void (``tcp_user_timeout`` must find it).
    """
    if driver == "asyncpg":
        return asyncio.run(_half_open_async(server, driver, blackhole, mid_query, policy))
    engine = dropsafe.create_engine(server.url(driver), **_engine_kwargs(server, driver, policy))
    failed: list[float] = []

    def run(conn: sa.Connection) -> None:
        try:
            conn.execute(sa.text(SLEEP if mid_query else "SELECT 1"))
        except sa.exc.DBAPIError:
            failed.append(time.monotonic())

    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # the transaction's first statement
            if mid_query:
                thread = threading.Thread(target=run, args=(conn,), daemon=True)
                thread.start()
                wait_until(lambda: _sleeping_on(server), timeout=10, what="pg_sleep running")
                with blackhole(server.port):
                    started = time.monotonic()
                    thread.join(timeout=60)
            else:
                with blackhole(server.port):
                    started = time.monotonic()
                    run(conn)
    finally:
        engine.dispose()
    if not failed:
        raise AssertionError(f"{driver}: the statement on a half-open connection did not fail")
    return failed[0] - started


async def _half_open_async(
    server: PostgresServer,
    driver: DriverName,
    blackhole: Blackhole,
    mid_query: bool,
    policy: dropsafe.Policy | None,
) -> float:
    kwargs = {} if policy is None else {"policy": policy}
    engine = dropsafe.create_async_engine(server.url(driver), **kwargs)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))  # the transaction's first statement
            running = None
            if mid_query:
                running = asyncio.ensure_future(conn.execute(sa.text(SLEEP)))
                deadline = time.monotonic() + 10
                while not await asyncio.to_thread(_sleeping_on, server):
                    if time.monotonic() > deadline:
                        raise AssertionError("pg_sleep never ran")
                    await asyncio.sleep(0.05)
            with blackhole(server.port):
                started = time.monotonic()
                if running is None:
                    running = asyncio.ensure_future(conn.execute(sa.text("SELECT 1")))
                try:
                    await asyncio.wait_for(running, 60)
                except sa.exc.DBAPIError:
                    return time.monotonic() - started
                raise AssertionError(f"{driver}: the statement on a half-open connection passed")
    finally:
        await engine.dispose()


class Writer:
    """Inserts into ``ledger`` in a loop from a thread of its own, remembering each ack's time."""

    def __init__(self, url: str, driver: DriverName) -> None:
        self.acked: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        target = self._run_async if driver == "asyncpg" else self._run_sync
        self.thread = threading.Thread(target=target, args=(url,), daemon=True)
        self.thread.start()

    def _run_sync(self, url: str) -> None:
        engine = dropsafe.create_engine(url)
        factory = sessionmaker(engine)

        def insert(session: Session) -> None:
            session.execute(_INSERT)

        try:
            while not self.stop.is_set():
                try:
                    dropsafe.run_transaction(factory, insert)
                except Exception as exc:
                    self.errors.append(describe_error(exc))
                    continue
                self.acked.append(time.monotonic())
        finally:
            engine.dispose()

    def _run_async(self, url: str) -> None:
        async def insert(session: AsyncSession) -> None:
            await session.execute(_INSERT)

        async def main() -> None:
            engine = dropsafe.create_async_engine(url)
            factory = async_sessionmaker(engine)
            try:
                while not self.stop.is_set():
                    try:
                        await dropsafe.run_transaction_async(factory, insert)
                    except Exception as exc:
                        self.errors.append(describe_error(exc))
                        continue
                    self.acked.append(time.monotonic())
            finally:
                await engine.dispose()

        asyncio.run(main())

    def first_ack_after(self, moment: float, timeout: float) -> float:
        """Return when the first write after ``moment`` was acknowledged (waits ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [when for when in list(self.acked) if when > moment]
            if later:
                return later[0]
            time.sleep(0.01)
        raise AssertionError(f"no write acknowledged within {timeout}s")

    def close(self) -> None:
        """Stop writing; wait for the thread (bounded)."""
        self.stop.set()
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            raise AssertionError("the writer did not stop within 60 s")


def vanished_primary_seconds(
    primary: PostgresServer,
    standby: PostgresServer,
    driver: DriverName,
    blackhole: Blackhole,
    *,
    promote_after: float,
) -> float:
    """Return the seconds from the standby's promotion to the first write acknowledged after.

    ``primary`` has a table ``ledger (n int)`` and ``standby`` streams from it. The primary
    is blackholed; ``promote_after`` seconds later (a failover manager noticing) the standby
    is promoted.
    """
    from dropsafe.testing import multi_host_url

    writer = Writer(multi_host_url([primary, standby], driver), driver)
    try:
        writer.first_ack_after(0, timeout=30)
        with blackhole(primary.port):
            vanished = time.monotonic()
            # The failover manager's delay is the fault's schedule, not a synchronisation.
            time.sleep(max(0.0, vanished + promote_after - time.monotonic()))
            standby.promote()
            promoted_at = time.monotonic()
            first = writer.first_ack_after(promoted_at, timeout=40)
            writer.close()  # while the primary is still gone
    finally:
        writer.close()
    return first - promoted_at


@dataclass
class SlowLinkRun:
    """What one driver did on a slow link: seconds per operation, and errors (false alarms)."""

    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def slow_link_run(
    url: str,
    driver: DriverName,
    *,
    policy: dropsafe.Policy | None,
    megabytes: int,
    sleep: float,
    direct_url: str | None = None,
    connect_args: dict[str, object] | None = None,
) -> SlowLinkRun:
    """Run what a slow but healthy link must carry; any error is a false alarm.

    ``url`` goes through the slow link. A result of ``megabytes`` MB (server to client), a
    parameter of ``megabytes`` MB (client to server: bytes the client sent wait in flight),
    and ``pg_sleep(sleep)`` both through it and on ``direct_url`` (the server computes while
    only keepalives cross the link).
    """
    slow: list[tuple[str, str, dict[str, Any]]] = [
        (
            "large_result",
            "SELECT repeat('x', 1048576) FROM generate_series(1, :n)",  # rows sent
            {"n": megabytes},
        ),
        ("large_upload", "SELECT length(:blob)", {"blob": "x" * (megabytes * _MEGABYTE)}),
        ("long_query_slow_link", "SELECT pg_sleep(:s)", {"s": sleep}),
    ]
    run = SlowLinkRun()
    targets = [(url, slow)]
    if direct_url is not None:
        targets.append((direct_url, [("long_query_direct", "SELECT pg_sleep(:s)", {"s": sleep})]))
    for target, statements in targets:
        if driver == "asyncpg":
            asyncio.run(_run_async(target, policy, statements, run))
        else:
            _run_sync(target, policy, statements, run, connect_args or {})
    return run


def _run_sync(
    url: str,
    policy: dropsafe.Policy | None,
    statements: list[tuple[str, str, dict[str, Any]]],
    run: SlowLinkRun,
    connect_args: dict[str, object],
) -> None:
    kwargs: dict[str, Any] = {"connect_args": connect_args}
    if policy is not None:
        kwargs["policy"] = policy
    engine = dropsafe.create_engine(url, **kwargs)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # connected before the clock starts
            conn.commit()
        for name, sql, params in statements:
            started = time.monotonic()
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text(sql), params).all()
            except Exception as exc:
                run.errors[name] = describe_error(exc)
            run.seconds[name] = time.monotonic() - started
    finally:
        engine.dispose()


async def _run_async(
    url: str,
    policy: dropsafe.Policy | None,
    statements: list[tuple[str, str, dict[str, Any]]],
    run: SlowLinkRun,
) -> None:
    kwargs = {} if policy is None else {"policy": policy}
    engine = dropsafe.create_async_engine(url, **kwargs)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))  # connected before the clock starts
            await conn.commit()
        for name, sql, params in statements:
            started = time.monotonic()
            try:
                async with engine.connect() as conn:
                    (await conn.execute(sa.text(sql), params)).all()
            except Exception as exc:
                run.errors[name] = describe_error(exc)
            run.seconds[name] = time.monotonic() - started
    finally:
        await engine.dispose()
