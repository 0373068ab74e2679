"""What a unit of work keeps between calls to spare its per-call work, attacked (issue 28).

A unit finds its connection's socket once per DBAPI connection (`bounded_checkout`, for the
deadline's shutdown) and checks a plain function by its code's flags at every call. Each test
here breaks if what is kept outlives what it was read from: a connection replaced after its
backend was lost, an entry kept for another connection, a forked child, a function whose code
was replaced after its first unit.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe._drivers.deadline import _SOCKET_KEY
from dropsafe._errors import ConfigurationError
from dropsafe._socket_shutdown import identity_of

pytestmark = [pytest.mark.own_server, pytest.mark.fault]

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]
DEADLINE = 2.0
# The deadline, within 10% (the first hung run holds the budget), plus a connect timeout.
BOUND = DEADLINE * 1.1 + 5


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


class _Stopper:
    """SIGSTOP a unit's own backend (its kernel still acknowledges: no TCP timeout fires)."""

    def __init__(self, server):
        self.server = server
        self.stopped: list[int] = []
        self._lock = threading.Lock()

    def stop(self, pid):
        assert self.server.signal_backend(pid, signal.SIGSTOP)
        self.stopped.append(pid)
        # Bounded even where the deadline fails to strike (what these tests attack): the
        # backend resumes past the bound, and the test fails on its time, not on a hang.
        resume = threading.Timer(BOUND + 3, self.resume)
        resume.daemon = True
        resume.start()

    def resume(self):
        with self._lock:
            for pid in self.stopped:
                self.server.signal_backend(pid, signal.SIGCONT)


def _hang_on_a_new_connection_sync(url, stopper, *, plant=None):
    """Warm the pool's one entry, lose its connection, then hang the unit on the new one.

    Returns the seconds the unit took.
    """
    policy = dropsafe.Policy(unit=dropsafe.UnitPolicy(deadline=DEADLINE))
    engine = dropsafe.create_engine(url, policy=policy, pool_size=1, max_overflow=0)
    try:
        dropsafe.run_transaction(engine, lambda c: c.execute(sa.text("SELECT 1")))
        with engine.connect() as connection:
            # The backend lost (terminated, as a failover or an administrator would):
            # SQLAlchemy replaces this entry's DBAPI connection at its next checkout.
            connection.invalidate()
            if plant is not None:
                plant(connection.connection)
        attempts = []

        def unit(connection):
            attempts.append(connection.connection.dbapi_connection)
            stopper.stop(connection.execute(sa.text("SELECT pg_backend_pid()")).scalar())
            connection.execute(sa.text("SELECT 1"))

        started = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError):
            dropsafe.run_transaction(engine, unit)
        elapsed = time.monotonic() - started
        assert attempts, "the unit never ran"
        return elapsed
    finally:
        stopper.resume()
        engine.dispose()


async def _hang_on_a_new_connection_async(url, stopper):
    policy = dropsafe.Policy(unit=dropsafe.UnitPolicy(deadline=DEADLINE))
    engine = dropsafe.create_async_engine(url, policy=policy, pool_size=1, max_overflow=0)
    try:

        async def select_1(connection):
            await connection.execute(sa.text("SELECT 1"))

        await dropsafe.run_transaction_async(engine, select_1)
        async with engine.connect() as connection:
            await connection.invalidate()  # as in the sync test

        async def unit(connection):
            pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
            stopper.stop(pid)
            await connection.execute(sa.text("SELECT 1"))

        started = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError):
            await dropsafe.run_transaction_async(engine, unit)
        return time.monotonic() - started
    finally:
        stopper.resume()
        await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_deadline_strikes_the_connection_that_replaced_a_lost_one(server, driver):
    """The socket kept for the entry's first connection is never the one shut down for the
    next: kept across the reconnect (SQLAlchemy's record_info, say), the watchdog would find
    the old socket gone and the hung unit would wait for TCP, minutes."""
    stopper = _Stopper(server)
    url = server.url(driver)
    if driver == "asyncpg":
        elapsed = asyncio.run(_hang_on_a_new_connection_async(url, stopper))
    else:
        elapsed = _hang_on_a_new_connection_sync(url, stopper)
    assert stopper.stopped, "the backend was never stopped"
    assert elapsed <= BOUND, f"took {elapsed:.1f}s"


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_socket_kept_for_another_connection_is_never_shut_down(server, driver):
    """An entry's kept socket that names another DBAPI connection (one SQLAlchemy failed to
    clear) is read again, not trusted: the unit's own socket is shut down at its deadline,
    and the other socket is left open."""
    stopper = _Stopper(server)
    mine, peer = socket.socketpair()
    try:

        def plant(pool_connection):
            # A stale entry for a connection that is not the next one, naming a live socket.
            pool_connection.info[_SOCKET_KEY] = (
                object(),
                mine.fileno(),
                identity_of(mine.fileno()),
            )

        elapsed = _hang_on_a_new_connection_sync(server.url(driver), stopper, plant=plant)
        assert stopper.stopped, "the backend was never stopped"
        assert elapsed <= BOUND, f"took {elapsed:.1f}s"
        # Not shut down: it still carries bytes both ways.
        mine.sendall(b"x")
        assert peer.recv(1) == b"x"
        peer.sendall(b"y")
        assert mine.recv(1) == b"y"
    finally:
        mine.close()
        peer.close()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_forked_child_s_unit_is_bounded_by_its_own_socket(server, driver):
    """A child forked after the parent's units kept their sockets: after SQLAlchemy's
    ``dispose(close=False)`` its units run on connections of its own, and their deadline
    strikes their own sockets (the parent's connection, shared, is never shut down)."""
    policy = dropsafe.Policy(unit=dropsafe.UnitPolicy(deadline=DEADLINE))
    engine = dropsafe.create_engine(server.url(driver), policy=policy, pool_size=1)
    stopper = _Stopper(server)
    try:
        parents = dropsafe.run_transaction(engine, _backend_pid)
        read_end, write_end = os.pipe()  # child -> parent: its backend's pid
        ack_read, ack_write = os.pipe()  # parent -> child: that backend is stopped
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read_end)
            os.close(ack_write)
            status = 1
            try:
                status = _child_unit(engine, write_end, ack_read)
            finally:
                os._exit(status)
        os.close(write_end)
        os.close(ack_read)
        try:
            ready, _, _ = select.select([read_end], [], [], 20)
            assert ready, "the child's unit never ran"
            stopper.stop(int(os.read(read_end, 100).split(b"\n")[0]))
            os.write(ack_write, b"stopped")
            ready, _, _ = select.select([read_end], [], [], BOUND + 10)  # EOF: the child exited
            if not ready:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(read_end)
            os.close(ack_write)
        assert ready, "the child's unit outlived its deadline"
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's own connection was never shut down: its next unit runs on it, not on a
        # new connection (the pool's one, pool_size=1).
        assert dropsafe.run_transaction(engine, _backend_pid) == parents
    finally:
        stopper.resume()
        engine.dispose()


def _backend_pid(connection):
    return connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()


def _child_unit(engine, write_end, ack_read):  # pragma: no cover - runs in the child
    """A forked child's unit whose backend the parent stops: 0 if it ended by its deadline."""
    engine.dispose(close=False)

    def unit(connection):
        own = connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        os.write(write_end, f"{own}\n".encode())
        if select.select([ack_read], [], [], 20)[0]:
            connection.execute(sa.text("SELECT 1"))  # its backend stopped: hangs

    started = time.monotonic()
    try:
        dropsafe.run_transaction(engine, unit, max_attempts=1)
    except sa.exc.DBAPIError:
        return 0 if time.monotonic() - started <= BOUND else 3
    return 2


def test_a_function_whose_code_became_async_is_refused_at_its_next_unit(server):
    """A plain function is checked by its code's flags at every call, never remembered: the
    same function object with an ``async def``'s code is refused, as at its first call."""
    engine = dropsafe.create_engine(server.url("psycopg2"))
    try:
        factory = sessionmaker(engine)

        def unit(session):
            return session.execute(sa.text("SELECT 1")).scalar()

        async def async_unit(session):
            return 1

        assert dropsafe.run_transaction(factory, unit) == 1
        unit.__code__ = async_unit.__code__
        with pytest.raises(ConfigurationError, match="is async: use await run_transaction_async"):
            dropsafe.run_transaction(factory, unit)
    finally:
        engine.dispose()
