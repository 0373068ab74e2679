"""The variants compared, as engines and requests: plain pool, pre_ping, psycopg_pool, dropsafe."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import dropsafe

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["Sample", "Variant", "drive_async", "drive_sync", "make_async", "make_sync"]

SELECT_ONE = sa.text("SELECT 1")
INSERT = sa.text("INSERT INTO bench (v) VALUES (1)")
SCHEMA = "CREATE TABLE IF NOT EXISTS bench (v int)"


@dataclass
class Sample:
    """Latencies of one run (seconds) and its wall time; throughput follows."""

    latencies: list[float]
    seconds: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Variant:
    """One way to talk to the database; ``verify`` only matters to dropsafe's write path."""

    name: str
    verify: bool = True

    @property
    def guarded(self) -> bool:
        return self.name.startswith("dropsafe")


def _policy(variant: Variant) -> dropsafe.Policy:
    """Return the guarded variants' policy: verified or not, no hooks (events cost time)."""
    return dropsafe.Policy(unit=dropsafe.UnitPolicy(verify_commits=variant.verify), hooks=())


def make_sync(variant: Variant, url: str, clients: int, **kwargs: Any) -> Callable[[str], object]:  # noqa: ANN401
    """Return ``request(workload)`` for a sync variant, and hold its engine until closed."""
    pool_kwargs: dict[str, Any] = {"pool_size": clients, "max_overflow": 0, **kwargs}
    if variant.guarded:
        engine = dropsafe.create_engine(url, policy=_policy(variant), **pool_kwargs)
    else:
        engine = sa.create_engine(url, pool_pre_ping=variant.name == "pre_ping", **pool_kwargs)
    session_factory = sessionmaker(engine)

    def write(session: Session) -> None:
        session.execute(INSERT)

    def request(workload: str) -> object:
        if workload == "query":
            with engine.connect() as connection:
                return connection.execute(SELECT_ONE).scalar()
        if variant.guarded:
            return dropsafe.run_transaction(session_factory, write)
        with session_factory() as session, session.begin():
            return session.execute(INSERT)

    request.dispose = engine.dispose  # type: ignore[attr-defined]
    return request


def make_psycopg_pool(url: str, clients: int) -> Callable[[str], object]:
    """psycopg_pool with its ``check`` (a round trip per checkout), without SQLAlchemy."""
    import psycopg_pool  # noqa: PLC0415 - only this variant needs it

    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = psycopg_pool.ConnectionPool(
        conninfo,
        min_size=clients,
        max_size=clients,
        check=psycopg_pool.ConnectionPool.check_connection,
        open=True,
    )

    def request(workload: str) -> object:
        with pool.connection() as connection:
            return connection.execute("SELECT 1" if workload == "query" else str(INSERT))

    request.dispose = pool.close  # type: ignore[attr-defined]
    return request


def drive_sync(
    request: Callable[[str], object], workload: str, clients: int, seconds: float
) -> Sample:
    """Run ``clients`` threads issuing requests back to back for ``seconds``."""
    request(workload)  # connect outside the timed window
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client() -> None:
        mine = []
        start.wait()
        while (now := time.perf_counter()) < stop_at[0]:
            request(workload)
            mine.append(time.perf_counter() - now)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return Sample(latencies, time.perf_counter() - began)


async def make_async(
    variant: Variant, url: str, clients: int
) -> tuple[Callable[[str], Awaitable[object]], AsyncEngine]:
    """Return an async ``request(workload)`` and its engine (asyncpg or psycopg async)."""
    pool_kwargs: dict[str, Any] = {"pool_size": clients, "max_overflow": 0}
    if variant.guarded:
        engine = dropsafe.create_async_engine(url, policy=_policy(variant), **pool_kwargs)
    else:
        engine = create_async_engine(url, pool_pre_ping=variant.name == "pre_ping", **pool_kwargs)
    session_factory = async_sessionmaker(engine)

    async def write(session: AsyncSession) -> None:
        await session.execute(INSERT)

    async def request(workload: str) -> object:
        if workload == "query":
            async with engine.connect() as connection:
                return (await connection.execute(SELECT_ONE)).scalar()
        if variant.guarded:
            return await dropsafe.run_transaction_async(session_factory, write)
        async with session_factory() as session, session.begin():
            return await session.execute(INSERT)

    return request, engine


async def drive_async(
    request: Callable[[str], Awaitable[object]], workload: str, clients: int, seconds: float
) -> Sample:
    """`drive_sync` with tasks."""
    await request(workload)
    latencies: list[float] = []
    began = time.perf_counter()
    stop_at = began + seconds

    async def client() -> None:
        while (now := time.perf_counter()) < stop_at:
            await request(workload)
            latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(client() for _ in range(clients)))
    return Sample(latencies, time.perf_counter() - began)
