"""A checkout waits out a short outage: restarts, a stopped server, bad credentials, a full pool.

Faults: the server stopped (``fast`` or ``immediate``, which crashes it: the next start runs
crash recovery and answers 57P03 meanwhile) and started again while a checkout is under way;
the server stopped for good; a wrong password. Outcomes: the checkout gets a connection as soon
as the server accepts again (within ``ConnectionPolicy.connect_wait``), fails after about
``connect_wait`` when the server stays away, fails at once on an error that waiting cannot
fix, and a full pool's waiters keep their order and their own ``pool_timeout``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
import sqlalchemy.exc

import dropsafe
from dropsafe._drivers import async_drivers
from dropsafe.events import ConnectWaited
from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.fault

SYNC_DRIVERS = ["psycopg2", "psycopg"]
ASYNC_DRIVERS = async_drivers()
MODES = ["fast", "immediate"]
SLACK = 3.0  # scheduling on a loaded 2-core machine


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """One server for the module; a test that stops it starts it again before it ends."""
    with PostgresServer() as server:
        server.execute("CREATE TABLE IF NOT EXISTS filler (x int)")
        yield server


@pytest.fixture(scope="module")
def plain() -> Iterator[PostgresServer]:
    """A server without TLS, for clients that require it."""
    with PostgresServer(tls=False) as server:
        yield server


class _Events(list):  # type: ignore[type-arg]
    def __call__(self, event: object) -> None:
        self.append(event)

    def waits(self) -> list[ConnectWaited]:
        return [event for event in self if isinstance(event, ConnectWaited)]


def _policy(events: _Events, **connection: float) -> dropsafe.Policy:
    return dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(**connection),
        hooks=(dropsafe.events.LoggingHook(), events),
    )


class _Restart:
    """Stop the server now; start it again in a thread (the checkout runs meanwhile)."""

    def __init__(
        self, server: PostgresServer, mode: str, gate: threading.Event | None = None
    ) -> None:
        self._gate = gate
        # WAL written since the last checkpoint: an immediate stop leaves crash recovery to do.
        server.execute("INSERT INTO filler SELECT generate_series(1, 20000)")
        server.stop(mode)  # type: ignore[arg-type]
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._start, args=(server,))
        self._thread.start()

    def _start(self, server: PostgresServer) -> None:
        if self._gate is not None:
            self._gate.wait(timeout=30)
        try:
            server.start()
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the server did not start again"
        assert not self.errors, self.errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_sync_checkout_waits_out_a_restart(server, driver, mode, disposing):
    events = _Events()
    engine = disposing(dropsafe.create_engine(server.url(driver), policy=_policy(events)))
    restart = _Restart(server, mode)
    try:
        started = time.monotonic()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        waited = time.monotonic() - started
    finally:
        restart.join()
    (wait,) = events.waits()
    assert wait.outcome == "connected"
    assert wait.attempts >= 2
    assert wait.waited <= waited
    assert server.password not in repr(events)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_checkout_waits_out_a_restart(server, driver, mode):
    events = _Events()

    async def scenario() -> None:
        engine = dropsafe.create_async_engine(server.url(driver), policy=_policy(events))
        try:
            restart = _Restart(server, mode)
            try:
                async with engine.connect() as conn:
                    assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
            finally:
                await asyncio.to_thread(restart.join)
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    (wait,) = events.waits()
    assert wait.outcome == "connected"
    assert wait.attempts >= 2
    assert server.password not in repr(events)


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_a_stopped_server_fails_the_checkout_after_connect_wait(server, driver):
    events = _Events()
    wait = 1.5
    policy = _policy(events, connect_wait=wait, connect_timeout=2)
    server.stop("fast")
    try:
        started = time.monotonic()
        # asyncpg lets a refused connect's OSError through, unwrapped.
        with pytest.raises((sa.exc.OperationalError, OSError)) as caught:
            _checkout(server, driver, policy)
        elapsed = time.monotonic() - started
    finally:
        server.start()
    assert wait <= elapsed <= wait + SLACK
    (event,) = events.waits()
    assert event.outcome == "gave_up"
    assert event.attempts >= 2
    assert wait <= event.waited <= elapsed
    # On the driver's error, which SQLAlchemy's error wraps (and its traceback shows).
    raised = getattr(caught.value, "orig", caught.value)
    notes = " ".join(getattr(raised, "__notes__", []))
    assert "connect_wait" in notes
    assert server.password not in repr(events) + str(caught.value) + notes


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_a_wrong_password_fails_at_once(server, driver):
    events = _Events()
    policy = _policy(events, connect_wait=30)
    started = time.monotonic()
    with pytest.raises(sa.exc.DBAPIError):
        _checkout(server, driver, policy, password="not-the-password")  # noqa: S106
    assert time.monotonic() - started < 1.5
    assert events.waits() == []


def test_a_missing_database_fails_at_once(server):
    events = _Events()
    started = time.monotonic()
    with pytest.raises(sa.exc.DBAPIError):
        _checkout(server, "psycopg2", _policy(events, connect_wait=30), database="nowhere")
    assert time.monotonic() - started < 1.5
    assert events.waits() == []


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_tls_required_of_a_server_without_it_fails_at_once(plain, driver):
    """The driver reports it like a lost or refused connection; waiting would not fix it."""
    events = _Events()
    url = plain.url(
        driver, **({"ssl": "require"} if driver == "asyncpg" else {"sslmode": "require"})
    )
    started = time.monotonic()
    with pytest.raises((sa.exc.DBAPIError, OSError)):
        _checkout_url(url, driver, _policy(events, connect_wait=30))
    assert time.monotonic() - started < 1.5
    assert events.waits() == []


def test_connect_wait_zero_fails_at_once(server):
    events = _Events()
    server.stop("fast")
    try:
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            _checkout(server, "psycopg2", _policy(events, connect_wait=0))
        assert time.monotonic() - started < 1.0
    finally:
        server.start()
    assert events.waits() == []


def test_a_unit_of_work_waits_once_within_its_deadline(server):
    """The unit waits for the server itself: its checkouts must not wait connect_wait on top."""
    events = _Events()
    engine = dropsafe.create_engine(server.url(), policy=_policy(events, connect_wait=30))
    server.stop("fast")
    try:
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            dropsafe.run_transaction(
                engine, lambda conn: conn.execute(sa.text("SELECT 1")), deadline=1.5
            )
        assert time.monotonic() - started <= 1.5 + SLACK
    finally:
        server.start()
        engine.dispose()
    assert events.waits() == []


def test_an_async_unit_of_work_waits_once_within_its_deadline(server):
    events = _Events()

    async def unit(conn: object) -> None:
        await conn.execute(sa.text("SELECT 1"))  # type: ignore[attr-defined]

    async def scenario() -> None:
        engine = dropsafe.create_async_engine(
            server.url("asyncpg"), policy=_policy(events, connect_wait=30)
        )
        try:
            await dropsafe.run_transaction_async(engine, unit, deadline=1.5)
        finally:
            await engine.dispose()

    server.stop("fast")
    try:
        started = time.monotonic()
        with pytest.raises((sa.exc.OperationalError, OSError)):
            asyncio.run(scenario())
        assert time.monotonic() - started <= 1.5 + SLACK
    finally:
        server.start()
    assert events.waits() == []


def test_full_pool_waiters_keep_their_pool_timeout(server, disposing):
    """A checkout waiting for the server holds its slot; a queued one still times out on time."""
    events = _Events()
    engine = disposing(
        dropsafe.create_engine(
            server.url(), policy=_policy(events), pool_size=1, max_overflow=0, pool_timeout=1
        )
    )
    outcomes: dict[str, object] = {}

    def first() -> None:
        with engine.connect() as conn:
            outcomes["first"] = conn.execute(sa.text("SELECT 1")).scalar()

    gate = threading.Event()  # the server stays down until the queued checkout is done
    restart = _Restart(server, "immediate", gate)
    try:
        holder = threading.Thread(target=first)
        holder.start()
        _wait_until(lambda: engine.pool.checkedout() == 1)
        started = time.monotonic()
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        queued = time.monotonic() - started
        gate.set()
        holder.join(timeout=30)
    finally:
        gate.set()
        restart.join()
    assert outcomes == {"first": 1}
    assert 1.0 <= queued <= 1.0 + SLACK, "the queued checkout's pool_timeout changed"


def test_full_pool_waiters_keep_their_order(server, disposing):
    """Checkouts queued behind one that waits for the server are served in arrival order."""
    engine = disposing(
        dropsafe.create_engine(
            server.url(), policy=_policy(_Events()), pool_size=1, max_overflow=0, pool_timeout=30
        )
    )
    served: list[str] = []
    lock = threading.Lock()

    def checkout(name: str) -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with lock:
                served.append(name)

    restart = _Restart(server, "fast")
    threads = []
    try:
        for count, name in enumerate(["first", "second", "third"]):
            thread = threading.Thread(target=checkout, args=(name,))
            thread.start()
            threads.append(thread)
            # The next one arrives once this one holds the slot or waits in the queue.
            _wait_until(lambda count=count: _arrived(engine, count + 1))
        for thread in threads:
            thread.join(timeout=30)
    finally:
        restart.join()
    assert served == ["first", "second", "third"]


def _arrived(engine: sa.Engine, count: int) -> bool:
    pool = engine.pool
    waiting = len(getattr(getattr(pool, "_pool", None), "not_empty", None)._waiters)  # type: ignore[union-attr]
    return pool.checkedout() + waiting >= count  # type: ignore[attr-defined]


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _checkout(
    server: PostgresServer,
    driver: str,
    policy: dropsafe.Policy,
    *,
    password: str | None = None,
    database: str = "postgres",
) -> None:
    url = server.url(driver, password=password, database=database)  # type: ignore[arg-type]
    _checkout_url(url, driver, policy)


def _checkout_url(url: str, driver: str, policy: dropsafe.Policy) -> None:
    if driver == "asyncpg":

        async def attempt() -> None:
            engine = dropsafe.create_async_engine(url, policy=policy)
            try:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            finally:
                await engine.dispose()

        asyncio.run(attempt())
        return
    engine = dropsafe.create_engine(url, policy=policy)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def test_a_replacements_wait_counts_from_the_checkout_and_ignores_a_stale_stamp(server):
    """`count_wait_from`: a replacement's connect waits only what is left of connect_wait since
    its checkout began (here none: one try, no wait); a stamp left on an entry longer than a
    replacement takes (another pool's ways) cuts no later wait short. Either is dropped."""
    from types import SimpleNamespace

    from dropsafe._engine import connect_wait
    from dropsafe._engine.guard import guard_of

    events = _Events()
    wait = 1.5
    engine = dropsafe.create_engine(
        server.url("psycopg2"), policy=_policy(events, connect_wait=wait, connect_timeout=2)
    )
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    refused = engine.dialect.loaded_dbapi.OperationalError  # the driver's own: no pool between

    def invoke(entry: object) -> object:
        del entry
        return engine.dialect.connect(*cargs, **cparams)

    waits = guard_of(engine).connect_wait
    server.stop("fast")
    try:
        spent = SimpleNamespace()
        connect_wait.count_wait_from(spent, time.monotonic() - wait)  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(refused):
            waits.connect(invoke, spent)  # type: ignore[arg-type]
        at_once = time.monotonic() - started
        stale = SimpleNamespace()
        stale.__dict__[connect_wait._BEGAN] = (time.monotonic() - 60, time.monotonic() - 30)
        started = time.monotonic()
        with pytest.raises(refused):
            waits.connect(invoke, stale)  # type: ignore[arg-type]
        waited = time.monotonic() - started
    finally:
        server.start()
        engine.dispose()
    assert at_once < wait, at_once
    assert wait <= waited <= wait + SLACK
    first, second = events.waits()
    assert (first.outcome, first.attempts) == ("gave_up", 1)
    assert second.outcome == "gave_up"
    assert second.attempts >= 2
    assert spent.__dict__ == stale.__dict__ == {}
