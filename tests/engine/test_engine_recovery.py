"""The guarded engine: a warmed pool serves on after real faults, with no error for the app.

The same faults break a plain SQLAlchemy pool (tests/engine/test_the_problem.py).
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe._drivers import SUPPORTED_DRIVERS, sync_drivers
from dropsafe._engine.guard import guard_of
from dropsafe.events import ConnectWaited, PingSucceeded

pytestmark = pytest.mark.fault

SYNC_DRIVERS = sync_drivers()
# Cuts and terminations share the session's server; restarts need one of their own.
FAULTS = [
    *(pytest.param(f, marks=pytest.mark.shares_server) for f in ("terminate", "fin", "rst")),
    "restart-fast",
    "restart-immediate",
]
POOL = 4
BACKEND_PID = sa.text("SELECT pg_backend_pid()")


def inject(fault, server, proxy):
    if fault == "terminate":
        assert server.terminate_backends() == POOL
    elif fault.startswith("restart-"):
        server.restart(fault.removeprefix("restart-"))
    else:
        assert proxy.cut(fault) == POOL


def _request(engine):
    with engine.connect() as conn:
        return conn.execute(BACKEND_PID).scalar()


def _warm_sync(engine):
    """Hold POOL connections at once, so the pool keeps POOL idle ones afterwards."""
    conns = [engine.connect() for _ in range(POOL)]
    pids = {conn.execute(BACKEND_PID).scalar() for conn in conns}
    for conn in conns:
        conn.close()
    return pids


def _wait_until_a_close_reaches_the_pool(engine, timeout=10.0):
    """Wait until an idle connection's socket shows the server's close (a free look sees it).

    pg_terminate_backend returns once the backend has exited; its close crosses the proxy a
    moment later, which on a loaded machine can be after the next checkout. The claim tested
    is about a close that arrived, so the test waits for it to arrive.
    """
    guard = guard_of(engine)
    assert guard is not None
    deadline = time.monotonic() + timeout
    while not guard.check.other_idle_connections_dead():
        assert time.monotonic() < deadline, "the server's close never reached the pool"
        time.sleep(0.01)


def _sync_engine(server, proxy, driver):
    return dropsafe.create_engine(
        proxy.route(server.url(driver)),
        pool_size=POOL,
        max_overflow=0,
        connect_args=server.connect_args(driver),
    )


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_sync_pool_serves_after_fault_without_errors(  # noqa: PLR0917 - fixtures and parameters
    postgres_server, chaos_proxy, driver, fault, caplog, disposing
):
    engine = disposing(_sync_engine(postgres_server, chaos_proxy, driver))
    before = _warm_sync(engine)
    inject(fault, postgres_server, chaos_proxy)
    with caplog.at_level(logging.INFO, logger="dropsafe"):
        after = {_request(engine) for _ in range(POOL)}
        with ThreadPoolExecutor(POOL) as pool:
            after |= set(pool.map(lambda _: _request(engine), range(2 * POOL)))
    assert not before & after, "a connection from before the fault was handed out"
    # Every idle connection died at once: the first dead one recycled the whole pool.
    assert "dropsafe.dead_connection_replaced" in caplog.text
    assert "pool_wide=True" in caplog.text


@pytest.mark.parametrize("fault", FAULTS)
def test_asyncpg_pool_serves_after_fault_without_errors(postgres_server, chaos_proxy, fault):
    async def scenario():
        engine = dropsafe.create_async_engine(
            chaos_proxy.route(postgres_server.url("asyncpg")), pool_size=POOL, max_overflow=0
        )

        async def request():
            async with engine.connect() as conn:
                return (await conn.execute(BACKEND_PID)).scalar()

        try:
            conns = [await engine.connect() for _ in range(POOL)]
            before = {(await conn.execute(BACKEND_PID)).scalar() for conn in conns}
            for conn in conns:
                await conn.close()
            inject(fault, postgres_server, chaos_proxy)
            after = {await request() for _ in range(POOL)}
            after |= set(await asyncio.gather(*(request() for _ in range(2 * POOL))))
            return before, after
        finally:
            await engine.dispose()

    before, after = asyncio.run(scenario())
    assert not before & after


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_one_terminated_backend_recycles_only_that_connection(
    postgres_server, chaos_proxy, driver, disposing
):
    engine = disposing(_sync_engine(postgres_server, chaos_proxy, driver))
    before = _warm_sync(engine)
    victim = min(before)
    assert postgres_server.execute(f"SELECT pg_terminate_backend({victim}, 5000)") == [("t",)]
    _wait_until_a_close_reaches_the_pool(engine)
    conns = [engine.connect() for _ in range(POOL)]
    after = {conn.execute(BACKEND_PID).scalar() for conn in conns}
    for conn in conns:
        conn.close()
    assert victim not in after
    assert before - {victim} <= after, "live connections were thrown away"


def _request_into_a_blackhole(engine, server, kernel_blackhole):
    """A warm connection's request sent into a blackhole (it must raise), then one after it:
    the seconds the first took to end, and what the next one served."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    started = time.monotonic()
    with kernel_blackhole(server.port):
        with pytest.raises(sa.exc.DBAPIError), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        elapsed = time.monotonic() - started
    with engine.connect() as conn:
        served = conn.execute(sa.text("SELECT 2")).scalar()
    return elapsed, served


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", SUPPORTED_DRIVERS)
def test_blackholed_request_ends_within_the_default_bound(
    postgres_server, kernel_blackhole, driver
):
    bound = 15.0
    url = postgres_server.url(driver)
    if driver == "asyncpg":

        async def scenario():
            engine = dropsafe.create_async_engine(url)
            try:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
                started = time.monotonic()
                with kernel_blackhole(postgres_server.port):
                    with pytest.raises(sa.exc.DBAPIError):
                        async with engine.connect() as conn:
                            await conn.execute(sa.text("SELECT 1"))
                    elapsed = time.monotonic() - started
                async with engine.connect() as conn:
                    served = (await conn.execute(sa.text("SELECT 2"))).scalar()
                return elapsed, served
            finally:
                await engine.dispose()

        elapsed, served = asyncio.run(scenario())
    else:
        engine = dropsafe.create_engine(url, connect_args=postgres_server.connect_args(driver))
        try:
            elapsed, served = _request_into_a_blackhole(engine, postgres_server, kernel_blackhole)
        finally:
            engine.dispose()
    assert elapsed < bound, f"the request hung {elapsed:.1f}s on a half-open connection"
    assert served == 2


# A checkout's bound, docs/settings.md ("When the server is not there"): connect_wait plus one
# connect_timeout, counted from the checkout's start. Short ones here, so that a bound missed
# by one try (what the code before session 19 did) shows against the scheduling slack.
CHECKOUT_BOUND = {"connect_wait": 4.0, "connect_timeout": 3}
CHECKOUT_SLACK = 1.0


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_a_checkout_into_a_blackholed_path_ends_within_its_bound(
    postgres_server, kernel_blackhole, disposing, driver
):
    """No connection pooled, the path down: each try lasts connect_timeout. The wait was counted
    from the first try's failure, so a checkout took a try more than its bound (3 + 4 + 3 s)."""
    events = []
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(**CHECKOUT_BOUND), hooks=(events.append,)
    )
    engine = disposing(dropsafe.create_engine(postgres_server.url(driver), policy=policy))
    bound = CHECKOUT_BOUND["connect_wait"] + CHECKOUT_BOUND["connect_timeout"]
    with kernel_blackhole(postgres_server.port):
        started = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError), engine.connect():  # pg8000: InterfaceError
            pass
        elapsed = time.monotonic() - started
    assert elapsed <= bound + CHECKOUT_SLACK, f"the checkout took {elapsed:.1f}s"
    (waited,) = [event for event in events if isinstance(event, ConnectWaited)]
    assert waited.outcome == "gave_up"
    assert waited.attempts >= 2  # it did wait: the bound was not met by giving up at once
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 2")).scalar() == 2


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("every_rollback_deferred")
def test_a_checkout_whose_rollback_was_blackholed_ends_within_its_bound(
    postgres_server, kernel_blackhole, disposing, monkeypatch
):
    """psycopg2's ROLLBACK at checkin, not awaited, still under way when the path goes down
    (its worker not yet run, as on a loaded machine: once in CI). The next checkout waits for
    its reply (tcp_user_timeout), replaces the connection, and its connect then waited a whole
    connect_wait more: 21 s with the defaults, where a request's checkout is bounded by 15
    (here 8.6 s for 7). Now the time spent on the old connection counts against
    connect_wait."""
    from dropsafe._drivers import psycopg2_rollback

    path_down = threading.Event()
    run = psycopg2_rollback.PendingRollback.run

    def held_until_the_path_is_down(pending):
        path_down.wait(timeout=30)
        run(pending)

    monkeypatch.setattr(psycopg2_rollback.PendingRollback, "run", held_until_the_path_is_down)
    events = []
    # The ROLLBACK's reply given up after 2 s (tcp_user_timeout), less than connect_wait: the
    # bound is then connect_wait plus one connect_timeout (docs/settings.md).
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(**CHECKOUT_BOUND, tcp_user_timeout=2),
        hooks=(events.append,),
    )
    engine = disposing(
        dropsafe.create_engine(postgres_server.url("psycopg2"), policy=policy, pool_size=1)
    )
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        native = conn.connection.dbapi_connection
    assert native in psycopg2_rollback._PENDING  # its ROLLBACK under way, held
    bound = CHECKOUT_BOUND["connect_wait"] + CHECKOUT_BOUND["connect_timeout"]
    with kernel_blackhole(postgres_server.port):
        path_down.set()
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass
        elapsed = time.monotonic() - started
    assert elapsed <= bound + CHECKOUT_SLACK, f"the checkout took {elapsed:.1f}s"
    kinds = [type(event).__name__ for event in events]
    assert "RollbackConnectionLost" in kinds, kinds
    assert "DeadConnectionReplaced" in kinds, kinds
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 2")).scalar() == 2


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_blackholed_request_ends_by_tcp_user_timeout_even_with_keepalives_off(
    postgres_server, kernel_blackhole, disposing
):
    # libpq applies tcp_user_timeout only with keepalives on; a user's keepalives=0 made this
    # request hang until TCP gave up (about 15 minutes): the test timed out on that code.
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2, connect_timeout=2)
    )
    engine = disposing(
        dropsafe.create_engine(postgres_server.url("psycopg2", keepalives="0"), policy=policy)
    )
    # Sent into the void; then the replay's fresh connect, refused by its timeout.
    elapsed, served = _request_into_a_blackhole(engine, postgres_server, kernel_blackhole)
    assert served == 2
    assert elapsed < 12, f"the request hung {elapsed:.1f}s with keepalives=0"


@pytest.mark.parametrize("driver", SUPPORTED_DRIVERS)
def test_a_connection_idle_too_long_is_pinged_not_replaced(shared_server, driver):
    events = []
    policy = dropsafe.Policy(pool=dropsafe.PoolPolicy(ping_after_idle=0), hooks=(events.append,))
    url = shared_server.url(driver)
    if driver == "asyncpg":

        async def scenario():
            engine = dropsafe.create_async_engine(url, policy=policy, pool_size=1)
            try:
                pids = []
                for _ in range(3):
                    async with engine.connect() as conn:
                        pids.append((await conn.execute(BACKEND_PID)).scalar())
                return pids
            finally:
                await engine.dispose()

        pids = asyncio.run(scenario())
    else:
        engine = dropsafe.create_engine(
            url, policy=policy, pool_size=1, connect_args=shared_server.connect_args(driver)
        )
        try:
            pids = [_request(engine) for _ in range(3)]
        finally:
            engine.dispose()
    assert len(set(pids)) == 1, "a live connection was replaced"
    pings = [event for event in events if isinstance(event, PingSucceeded)]
    assert [ping.why for ping in pings] == ["idle", "idle"]  # not the fresh first checkout
    assert all(0 < ping.latency < 5 for ping in pings)


@pytest.mark.shares_server
def test_a_unit_survives_when_the_replacement_connection_dies_too(
    postgres_server, chaos_proxy, disposing
):
    """Fault: the pooled connection is reset, and the connection made to replace it at the same
    checkout is terminated right after its handshake (a storm of faults, as under a restart).

    SQLAlchemy gives a checkout two tries; when the check refused both, it raised its own
    InvalidRequestError("This connection is closed"), which is no driver error, so the unit of
    work was not retried and the request failed. Outcome: the unit runs again and succeeds.
    """
    engine = disposing(
        dropsafe.create_engine(
            chaos_proxy.route(postgres_server.url("psycopg2")), pool_size=1, max_overflow=0
        )
    )
    killed: list[int] = []

    def kill_once(dbapi_connection, record):
        if killed:
            return
        pid = dbapi_connection.get_backend_pid()
        postgres_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")
        killed.append(pid)
        # The server's goodbye (57P01) has reached the socket: the check will see it.
        readable, _, _ = select.select([dbapi_connection.fileno()], [], [], 10)
        assert readable

    _request(engine)  # one idle connection in the pool
    assert chaos_proxy.cut("rst") == 1
    sa.event.listen(engine, "connect", kill_once)
    assert dropsafe.run_transaction(engine, lambda c: c.execute(BACKEND_PID).scalar())
    assert len(killed) == 1
