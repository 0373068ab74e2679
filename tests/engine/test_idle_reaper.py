"""A NAT that forgets idle flows (idle_reaper), and what each kind of pool does behind it.

Behind Azure's load balancer (4 min) or an AWS NAT gateway (350 s) a pooled connection that sat
idle too long is forgotten, and its next query gets no answer at all. Here the middlebox forgets
after a few seconds; every wait is bounded, and the time that passes is read from the kernel
(the flow is gone from conntrack), never slept.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from typing import TYPE_CHECKING

import psycopg2
import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe import ConfigurationError
from dropsafe._drivers import socket_fd
from dropsafe.testing._runtime import free_port

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(60)]

IDLE = 2  # seconds of silence after which the middlebox forgets a flow


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _client_port(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


def _shut(fd: int) -> None:
    """End a hung read at once: the test has seen the hang, it need not wait out TCP."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _forgotten(reaper, fd: int) -> None:
    port = _client_port(fd)
    _wait_until(lambda: reaper.tracked_flows(port) == 0, IDLE + 10)


def _libpq(server, **params: object):
    return psycopg2.connect(
        server.url("psycopg2").replace("postgresql+psycopg2", "postgresql"), **params
    )


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _pooled_fd(engine) -> int:
    """Make the pool's one connection (a query on it), give it back: its socket's fd."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        return conn.connection.dbapi_connection.fileno()


def _hardened_pool_of_one(server, disposing, **connection: object):
    """A dropsafe engine, a pool of one, with these ConnectionPolicy settings."""
    policy = dropsafe.Policy(connection=dropsafe.ConnectionPolicy(**connection))
    return disposing(dropsafe.create_engine(server.url("psycopg2"), policy=policy, pool_size=1))


def _select_2(engine, deadline: float) -> object:
    """A unit of work that reads 2, within ``deadline``."""
    return dropsafe.run_transaction(
        engine, lambda conn: conn.execute(sa.text("SELECT 2")).scalar(), deadline=deadline
    )


def _nft_tables() -> str:
    return subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=False
    ).stdout


def test_an_idle_flow_is_forgotten_and_its_next_query_gets_no_answer(shared_server, idle_reaper):
    # Another port's idle flow must be left alone: the middlebox touches only the given port.
    other = socket.create_server(("127.0.0.1", 0))
    with (  # noqa: PT012 - the error must come from inside the block
        pytest.raises(RuntimeError, match="inside"),
        idle_reaper(shared_server.port, IDLE) as reaper,
        other,
    ):
        table = reaper.table
        assert table in _nft_tables()
        # keepalives on (libpq turns tcp_user_timeout off with keepalives=0), but too late.
        idle = _libpq(shared_server, keepalives_idle=600, tcp_user_timeout=2000)
        alive = _libpq(shared_server, keepalives_idle=1, keepalives_interval=1)
        bystander = socket.create_connection(other.getsockname(), timeout=5)
        accepted, _ = other.accept()
        with closing(idle), closing(alive), bystander, accepted:
            for conn in (idle, alive):
                conn.cursor().execute("SELECT 1")
            _forgotten(reaper, idle.fileno())
            # Keepalives kept the other flow remembered: it answers at once.
            assert reaper.tracked_flows(_client_port(alive.fileno())) == 1
            cursor = alive.cursor()
            cursor.execute("SELECT 2")
            assert cursor.fetchone() == (2,)
            bystander.sendall(b"x")
            accepted.settimeout(5)
            assert accepted.recv(1) == b"x"
            # The forgotten one gets no answer and no reset: only tcp_user_timeout ends it.
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError, match="timed out"):
                idle.cursor().execute("SELECT 3")
            assert 1.5 < time.monotonic() - started < 10
            assert reaper.dropped_packets() > 0
        # New connections are tracked afresh and work.
        with closing(_libpq(shared_server)) as fresh:
            fresh.cursor().execute("SELECT 4")
        raise RuntimeError("inside")
    assert table not in _nft_tables()


@pytest.mark.parametrize("pre_ping", [False, True], ids=["plain", "pre_ping"])
def test_a_plain_pool_hangs_on_a_forgotten_connection(
    shared_server, idle_reaper, pre_ping, disposing
):
    # libpq's defaults: keepalives after 2 hours, no tcp_user_timeout: about 15 minutes.
    engine = disposing(
        sa.create_engine(shared_server.url("psycopg2"), pool_size=1, pool_pre_ping=pre_ping)
    )
    with idle_reaper(shared_server.port, IDLE) as reaper:
        fd = _pooled_fd(engine)
        _forgotten(reaper, fd)

        def query() -> object:
            with engine.connect() as conn:  # the ping, if any, is sent here
                return conn.execute(sa.text("SELECT 2")).scalar()

        thread, outcome = _in_thread(query)
        thread.join(4)
        # Neither the query nor pre_ping's ping got an answer in 4 s (dropsafe's bound on a
        # ping is 5 s by default, tcp_user_timeout 10 s; here TCP waits ~15 minutes).
        assert thread.is_alive(), outcome
        _shut(fd)
        thread.join(10)
        assert not thread.is_alive()


def test_dropsafe_keepalives_keep_the_flow_remembered(shared_server, idle_reaper, disposing):
    engine = _hardened_pool_of_one(shared_server, disposing, keepalive_idle=1, keepalive_interval=1)
    with idle_reaper(shared_server.port, IDLE) as reaper:
        fd = _pooled_fd(engine)
        # The clock: a connection without keepalives opened at the same time is forgotten.
        # It stays open until the end: closed, its goodbye and the kernel's retransmissions of
        # it, on its forgotten flow, are dropped too, and would count (CI once saw 2 more).
        clock = _libpq(shared_server, keepalives_idle=600, tcp_user_timeout=1000)
        with closing(clock):
            clock.cursor().execute("SELECT 1")
            _forgotten(reaper, clock.fileno())
            assert reaper.tracked_flows(_client_port(fd)) == 1
            dropped = reaper.dropped_packets()
            started = time.monotonic()
            with engine.connect() as conn:
                assert conn.connection.dbapi_connection.fileno() == fd  # the same connection
                assert conn.execute(sa.text("SELECT 2")).scalar() == 2
            assert time.monotonic() - started < 1
            assert reaper.dropped_packets() == dropped


@pytest.mark.parametrize(
    "keepalive_idle",
    [None, 4],
    ids=["keepalives_off", "keepalive_later_than_the_middlebox"],
)
def test_dropsafe_bounds_the_wait_and_the_unit_retries_on_a_fresh_connection(
    shared_server, idle_reaper, keepalive_idle, disposing
):
    # tcp_user_timeout ends the first query on the forgotten flow; the unit of work retries it
    # whole on a new connection, which the middlebox tracks afresh.
    engine = _hardened_pool_of_one(
        shared_server,
        disposing,
        tcp_user_timeout=2,
        keepalive_idle=keepalive_idle,
        keepalive_interval=1,
    )
    with idle_reaper(shared_server.port, IDLE) as reaper:
        _forgotten(reaper, _pooled_fd(engine))
        started = time.monotonic()
        result = _select_2(engine, deadline=20)
        elapsed = time.monotonic() - started
        assert result == 2
        # About tcp_user_timeout, never TCP's 15 minutes.
        assert elapsed < 8, elapsed
        assert reaper.dropped_packets() > 0


def test_bad_arguments_are_refused_before_any_rule(idle_reaper):
    with pytest.raises(ConfigurationError, match="port"), idle_reaper(0, 5):
        pass
    with pytest.raises(ConfigurationError, match="idle_timeout"), idle_reaper(5432, 0):
        pass
    with pytest.raises(ConfigurationError, match="idle_timeout"), idle_reaper(5432, float("nan")):
        pass


def test_without_tcp_timeouts_the_units_deadline_still_ends_the_wait(
    shared_server, idle_reaper, disposing
):
    # The attack: keepalives later than the middlebox, and no tcp_user_timeout. The query on
    # the forgotten flow is retransmitted for about 15 minutes (keepalives stop once data is
    # unacknowledged); only the unit's deadline ends it, and the deadline is then spent.
    # The connection has run no unit yet, so the unit first reads its server's life: that
    # read must be bounded too (it was not: it hung past the deadline).
    engine = _hardened_pool_of_one(
        shared_server, disposing, tcp_user_timeout=None, keepalive_idle=4, keepalive_interval=1
    )
    with idle_reaper(shared_server.port, IDLE) as reaper:
        fd = _pooled_fd(engine)
        _forgotten(reaper, fd)
        started = time.monotonic()
        thread, outcome = _in_thread(lambda: _select_2(engine, deadline=3))
        thread.join(10)
        hung = thread.is_alive()
        if hung:
            _shut(fd)
            thread.join(10)
        assert not hung, "the unit outlived its deadline"
        # The socket shut down at the deadline: a lost connection, raised as such.
        assert "error" in outcome, outcome
        assert dropsafe.classify(outcome["error"]) is dropsafe.ErrorKind.DISCONNECT
        assert time.monotonic() - started < 6


def test_the_same_bound_holds_for_an_async_unit(shared_server, idle_reaper):
    # The attack above, with asyncpg and run_transaction_async.
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(
            tcp_user_timeout=None, keepalive_idle=4, keepalive_interval=1
        )
    )
    fds: list[int] = []

    async def unit(conn):
        return (await conn.execute(sa.text("SELECT 2"))).scalar()

    async def scenario(reaper):
        engine = dropsafe.create_async_engine(
            shared_server.url("asyncpg"), policy=policy, pool_size=1
        )
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                raw = await conn.get_raw_connection()
                fds.append(socket_fd(raw.dbapi_connection))
            await asyncio.to_thread(_forgotten, reaper, fds[0])
            started = time.monotonic()
            try:
                await dropsafe.run_transaction_async(engine, unit, deadline=3)
            except Exception as exc:
                return exc, time.monotonic() - started
            return None, time.monotonic() - started
        finally:
            await engine.dispose()

    with idle_reaper(shared_server.port, IDLE) as reaper:
        thread, outcome = _in_thread(lambda: asyncio.run(scenario(reaper)))
        thread.join(IDLE + 20)
        hung = thread.is_alive()
        if hung and fds:
            _shut(fds[0])
            thread.join(10)
        assert not hung, "the unit outlived its deadline"
        error, elapsed = outcome["result"]
        assert dropsafe.classify(error) is dropsafe.ErrorKind.DISCONNECT, error
        assert elapsed < 6, elapsed


HOLDER = """
import sys
from dropsafe.testing import idle_reaper

with idle_reaper(int(sys.argv[1]), 60) as reaper:
    print(reaper.table, flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_killed_owners_table_goes_away(idle_reaper, how):
    # SIGTERM removes it at once; after SIGKILL (no cleanup can run) the next start sweeps it.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(free_port("127.0.0.1"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        table = holder.stdout.readline().strip()
        assert table.startswith("dropsafe_idlereaper_"), "the holder did not start"
        assert table in _nft_tables()
        holder.send_signal(how)
        holder.wait(30)
        if how is signal.SIGKILL:
            assert table in _nft_tables()  # left behind
            with idle_reaper(free_port("127.0.0.1"), 5):
                pass
        assert table not in _nft_tables()
    finally:
        holder.kill()
        holder.communicate(timeout=30)
