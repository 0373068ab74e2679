"""The variants compared, as engines and requests: plain pool, pre_ping, psycopg_pool, dropsafe.

Every variant is measured alike: its pool holds one open connection per client before the timed
window starts (psycopg_pool opens its connections up front; a SQLAlchemy pool opens them on
first use, which would put the connects inside the window), and one request runs before it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe._drivers import driver_named, socket_fd
from dropsafe.testing._server import Driver

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession

    from dropsafe._dbapi import DBAPIConnection

__all__ = [
    "AsyncTarget",
    "Sample",
    "SyncTarget",
    "Variant",
    "careful_connect_args",
    "careful_libpq_args",
    "drive_async",
    "drive_sync",
    "make_async",
    "make_psycopg_pool",
    "make_sync",
]

SELECT_ONE = sa.text("SELECT 1")
INSERT = sa.text("INSERT INTO bench (v) VALUES (1)")
SCHEMA = "CREATE TABLE IF NOT EXISTS bench (v int)"


@dataclass
class Sample:
    """Latencies of one run (seconds) and its wall time; throughput follows."""

    latencies: list[float]
    seconds: float
    errors: int = 0
    #: When the timed window opened (``time.perf_counter()``).
    started: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Variant:
    """One way to talk to the database; ``verify`` only matters to dropsafe's write path.

    ``tcp`` gives a baseline the TCP settings dropsafe sets (keepalives, ``tcp_user_timeout``,
    connect timeout), as a careful user would set them by hand.
    """

    name: str
    verify: bool = True
    tcp: bool = False
    replay: bool = True

    @property
    def guarded(self) -> bool:
        return self.name.startswith("dropsafe")


@dataclass
class SyncTarget:
    """A sync variant ready to measure: ``request(workload)``, its pool warm-up and disposal."""

    request: Callable[[str], object]
    warm: Callable[[int], None]
    dispose: Callable[[], None]
    engine: sa.Engine | None = None


@dataclass
class AsyncTarget:
    """`SyncTarget` for an async engine."""

    request: Callable[[str], Awaitable[object]]
    engine: AsyncEngine

    async def warm(self, clients: int) -> None:
        """Open ``clients`` connections at once, so that the pool holds them all."""
        connections = [await self.engine.connect() for _ in range(clients)]
        for connection in connections:
            await connection.close()


def _policy(variant: Variant) -> dropsafe.Policy:
    """Return the guarded variants' policy: no hooks (events cost time).

    Verified or not, replaying first statements or not, as the variant says.
    """
    return dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_first_statement=variant.replay),
        unit=dropsafe.UnitPolicy(verify_commits=variant.verify),
        hooks=(),
    )


def bench_driver(name: str) -> Driver:
    """Return ``name`` as a driver the bench's servers make URLs for; refuse any other."""
    if name not in get_args(Driver):
        raise dropsafe.ConfigurationError(f"the bench makes no URL for the driver {name!r}")
    return cast("Driver", name)


def careful_connect_args(driver: str = "psycopg2") -> dict[str, Any]:
    """Return the connect arguments dropsafe's default `ConnectionPolicy` gives ``driver``.

    What a careful user passes as ``connect_args`` for a fair baseline (libpq's keepalives,
    ``tcp_user_timeout`` and ``connect_timeout``; asyncpg's ``timeout``), asked of the driver.
    """
    cparams: dict[str, Any] = {}
    driver_named(driver).connect_defaults(dropsafe.ConnectionPolicy(), [], cparams)
    return cparams


def careful_libpq_args() -> dict[str, int]:
    """Return the libpq parameters dropsafe's default `ConnectionPolicy` sets, written out."""
    return {key: int(value) for key, value in careful_connect_args("psycopg2").items()}


def _tune_asyncpg_sockets(engine: AsyncEngine) -> None:
    """Give asyncpg's sockets dropsafe's TCP settings by hand (asyncpg takes no such argument).

    A careful user's ``connect`` listener; asyncpg's ``timeout`` argument is the connect timeout.
    """
    policy = dropsafe.ConnectionPolicy()
    libpq = careful_libpq_args()

    def tune(dbapi_connection: DBAPIConnection, record: object) -> None:
        del record
        fd = socket_fd(dbapi_connection)  # dropsafe's own way to it: asyncpg's is private
        if fd is None:
            return
        with socket.socket(fileno=os.dup(fd)) as sock:  # a copy: closing it leaves the link
            if sock.family in {socket.AF_INET, socket.AF_INET6}:
                _set_careful_options(sock, libpq, policy.keepalive_count)

    sa.event.listen(engine.sync_engine, "connect", tune)


def _set_careful_options(sock: socket.socket, libpq: dict[str, int], count: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, libpq["keepalives_idle"])
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, libpq["keepalives_interval"])
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, libpq["tcp_user_timeout"])


def _baseline_kwargs(variant: Variant, driver: str) -> dict[str, Any]:
    """Return create_engine's arguments for an unguarded variant (pre_ping, TCP settings)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": variant.name.startswith("pre_ping")}
    if variant.tcp:
        kwargs["connect_args"] = careful_connect_args(driver)
    return kwargs


def _warm_engine(engine: sa.Engine, clients: int) -> None:
    """Open ``clients`` connections at once, so that the pool holds them all."""
    connections = [engine.connect() for _ in range(clients)]
    for connection in connections:
        connection.close()


def make_sync(variant: Variant, url: str, clients: int, **kwargs: object) -> SyncTarget:
    """Return a sync variant's `SyncTarget`; its engine lives until ``dispose()``."""
    pool_kwargs: dict[str, Any] = {"pool_size": clients, "max_overflow": 0, **kwargs}
    if variant.guarded:
        engine = dropsafe.create_engine(url, policy=_policy(variant), **pool_kwargs)
    else:
        driver = sa.make_url(url).get_driver_name()
        engine = sa.create_engine(url, **_baseline_kwargs(variant, driver), **pool_kwargs)
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

    return SyncTarget(request, lambda n: _warm_engine(engine, n), engine.dispose, engine=engine)


def make_psycopg_pool(
    url: str, clients: int, *, configure: Callable[[Any], None] | None = None
) -> SyncTarget:
    """psycopg_pool with its ``check`` (a round trip per checkout), without SQLAlchemy.

    ``configure``: psycopg_pool's own, called with each new connection.
    """
    import psycopg_pool

    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = psycopg_pool.ConnectionPool(
        conninfo,
        min_size=clients,
        max_size=clients,
        check=psycopg_pool.ConnectionPool.check_connection,
        open=True,
        configure=configure,
    )

    def request(workload: str) -> object:
        with pool.connection() as connection:
            return connection.execute("SELECT 1" if workload == "query" else str(INSERT))

    def warm(clients: int) -> None:
        # open=True starts filling the pool in the background: wait until it holds them all.
        del clients  # min_size
        pool.wait(timeout=30.0)

    return SyncTarget(request, warm, pool.close)


def drive_sync(target: SyncTarget, workload: str, clients: int, seconds: float) -> Sample:
    """Run ``clients`` threads issuing requests back to back for ``seconds``, pool warmed."""
    target.warm(clients)  # connect outside the timed window, every variant alike
    request = target.request
    request(workload)
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
    return Sample(latencies, time.perf_counter() - began, started=began)


async def make_async(variant: Variant, url: str, clients: int) -> AsyncTarget:
    """Return an async variant's `AsyncTarget` (asyncpg or psycopg async)."""
    pool_kwargs: dict[str, Any] = {"pool_size": clients, "max_overflow": 0}
    if variant.guarded:
        engine = dropsafe.create_async_engine(url, policy=_policy(variant), **pool_kwargs)
    else:
        driver = sa.make_url(url).get_driver_name()
        engine = create_async_engine(url, **_baseline_kwargs(variant, driver), **pool_kwargs)
        if variant.tcp and driver == "asyncpg":
            _tune_asyncpg_sockets(engine)
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

    return AsyncTarget(request, engine)


async def drive_async(target: AsyncTarget, workload: str, clients: int, seconds: float) -> Sample:
    """`drive_sync` with tasks."""
    await target.warm(clients)
    request = target.request
    await request(workload)
    latencies: list[float] = []
    began = time.perf_counter()
    stop_at = began + seconds

    async def client() -> None:
        while (now := time.perf_counter()) < stop_at:
            await request(workload)
            latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(client() for _ in range(clients)))
    return Sample(latencies, time.perf_counter() - began, started=began)
