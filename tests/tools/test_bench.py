"""`dropsafe bench`: the quick run CI makes, and the fairness choices behind its numbers.

Each fairness test checks a choice that made an old table flatter dropsafe, without timing:
pools warm before the timed window, a naive loop that retries a refused connect, a pre_ping
baseline with dropsafe's TCP settings, and 0 ms cells that bypass the proxy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from bench_sections import SECTIONS, file_running

from dropsafe._bench._engines import (
    Variant,
    drive_async,
    drive_sync,
    make_async,
    make_psycopg_pool,
    make_sync,
)
from dropsafe._bench._faults import PRE_PING_TCP
from dropsafe._bench._healthy import cell_url
from dropsafe._bench._ledger import insert_naively, prepare
from dropsafe._cli import main
from dropsafe._drivers.libpq import LIBPQ_KEYS

CLIENTS = 8


def _wait_for(ready, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.01)
    return ready()


def test_every_section_of_the_quick_benchmark_is_checked():
    """Every section of `dropsafe bench` has its expectations and a test file that runs it."""
    from dropsafe._bench import SECTIONS as ALL

    assert set(SECTIONS) == set(ALL)
    here = Path(__file__).parent
    for section in ALL:
        path = here / file_running(section)
        assert path.exists(), f"no test file runs the {section} section: {path.name}"
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert section == module.SECTION
        assert callable(module.test_quick_benchmark_writes_its_section)


def test_unknown_section_is_refused(capsys):
    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("driver", "variant"),
    [("psycopg2", Variant("plain")), ("psycopg", Variant("dropsafe"))],
)
def test_sync_pool_is_warm_before_the_timed_window(shared_server, driver, variant, disposing):
    """Connects inside the window would count their cost in one variant's p99 and not another's."""
    target = disposing(make_sync(variant, shared_server.url(driver), CLIENTS))
    connects: list[float] = []
    sa.event.listen(target.engine, "connect", lambda *_: connects.append(time.perf_counter()))
    sample = drive_sync(target, "query", CLIENTS, 0.3)
    assert sample.latencies
    assert len(connects) == CLIENTS
    assert [t for t in connects if t >= sample.started] == []


def test_async_pool_is_warm_before_the_timed_window(shared_server):
    connects: list[float] = []

    async def run():
        target = await make_async(Variant("plain"), shared_server.url("asyncpg"), CLIENTS)
        sa.event.listen(
            target.engine.sync_engine, "connect", lambda *_: connects.append(time.perf_counter())
        )
        try:
            return await drive_async(target, "query", CLIENTS, 0.3)
        finally:
            await target.engine.dispose()

    sample = asyncio.run(run())
    assert sample.latencies
    assert len(connects) == CLIENTS
    assert [t for t in connects if t >= sample.started] == []


def test_psycopg_pool_is_full_before_the_timed_window(shared_server, disposing):
    """psycopg_pool fills itself in the background: the bench waits until it holds them all."""
    connects: list[float] = []
    target = disposing(
        make_psycopg_pool(
            shared_server.url("psycopg"),
            CLIENTS,
            configure=lambda _: connects.append(time.perf_counter()),
        )
    )
    sample = drive_sync(target, "query", CLIENTS, 0.3)
    assert len(connects) == CLIENTS
    assert [t for t in connects if t >= sample.started] == []


@pytest.mark.fault
def test_naive_loop_retries_a_refused_connect(postgres_server, chaos_proxy):
    """A careful user's loop retries a connect that failed: nothing was sent."""
    prepare(postgres_server)
    engine = sa.create_engine(
        chaos_proxy.route(postgres_server.url("psycopg2")), pool_pre_ping=True
    )
    attempts: list[float] = []
    sa.event.listen(engine, "do_connect", lambda *_: attempts.append(time.monotonic()))
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            insert_naively(engine, "op-1")
        except BaseException as exc:
            errors.append(exc)

    chaos_proxy.refuse()
    thread = threading.Thread(target=insert)
    thread.start()
    try:
        # A second connect attempt means the refused one was retried, not raised.
        assert _wait_for(lambda: len(attempts) >= 2 or not thread.is_alive(), 20)
        chaos_proxy.heal()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert errors == []
        rows = postgres_server.execute("SELECT count(*) FROM ledger WHERE op_id = 'op-1'")
        assert rows == [("1",)]
    finally:
        chaos_proxy.heal()
        thread.join(timeout=30)
        engine.dispose()


def test_pre_ping_tcp_variant_has_dropsafes_libpq_settings(shared_server):
    """The fair half-open baseline: pre_ping with the very TCP settings dropsafe's engine sets."""

    def parameters(variant: Variant) -> dict[str, object]:
        target = make_sync(variant, shared_server.url("psycopg2"), 1)
        try:
            with target.engine.connect() as connection:
                dsn = connection.connection.dbapi_connection.info.dsn_parameters
                return {name: dsn.get(name) for name in LIBPQ_KEYS} | {
                    "pre_ping": target.engine.pool._pre_ping
                }
        finally:
            target.dispose()

    fair = parameters(PRE_PING_TCP)
    assert None not in fair.values()
    assert fair.pop("pre_ping") is True
    guarded = parameters(Variant("dropsafe"))
    guarded.pop("pre_ping")
    assert fair == guarded


def test_pre_ping_tcp_variant_tunes_asyncpg_sockets_like_dropsafe(shared_server):
    options = (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )

    async def socket_options(variant: Variant) -> list[int]:
        target = await make_async(variant, shared_server.url("asyncpg"), 1)
        try:
            async with target.engine.connect() as connection:
                raw = await connection.get_raw_connection()
                sock = raw.dbapi_connection.driver_connection._transport.get_extra_info("socket")
                return [sock.getsockopt(level, name) for level, name in options]
        finally:
            await target.engine.dispose()

    fair = asyncio.run(socket_options(PRE_PING_TCP))
    assert fair[0] == 1
    assert fair[-1] > 0
    assert fair == asyncio.run(socket_options(Variant("dropsafe")))


@pytest.mark.shares_server
def test_zero_ms_cells_connect_straight_to_the_server(postgres_server, chaos_proxy):
    """The in-process proxy caps throughput and hides CPU cost: only latency needs it."""
    direct = sa.make_url(cell_url(postgres_server, chaos_proxy, 0, "psycopg2"))
    delayed = sa.make_url(cell_url(postgres_server, chaos_proxy, 10, "psycopg2"))
    assert direct.port == postgres_server.port != chaos_proxy.port
    assert delayed.port == chaos_proxy.port
