"""Multi-host URLs: connects merely in flight never reorder the host list.

A healthy primary is listed first, a standby second, with ``target_session_attrs=any`` (so the
driver takes whichever host it tries first). 20 checkouts at once open 20 connections
concurrently: plain SQLAlchemy sends all of them to the first host, and so must dropsafe. The
rotation after a connect that really failed (a vanished first host) is covered by
test_failover.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe.testing import multi_host_url

# shared_server: a server of this module's own: it copies the server into a standby.
pytestmark = [pytest.mark.fault, pytest.mark.own_server]

CONCURRENT = 20
SERVER_PORT = sa.text("SELECT inet_server_port()")


@pytest.fixture(scope="module")
def primary_and_standby(shared_server):
    standby = shared_server.make_standby()
    yield shared_server, standby
    standby.close()


def _ports_sync(url):
    engine = dropsafe.create_engine(url, pool_size=CONCURRENT, max_overflow=0)
    all_in = threading.Barrier(CONCURRENT, timeout=60)
    ports = []
    lock = threading.Lock()

    def checkout():
        with engine.connect() as conn:
            port = conn.execute(SERVER_PORT).scalar()
            all_in.wait()  # every connection is open at once
        with lock:
            ports.append(port)

    threads = [threading.Thread(target=checkout) for _ in range(CONCURRENT)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        engine.dispose()
    assert not any(thread.is_alive() for thread in threads)
    return ports


async def _ports_async(url):
    engine = dropsafe.create_async_engine(url, pool_size=CONCURRENT, max_overflow=0)
    opened = 0
    all_in = asyncio.Event()

    async def checkout():
        nonlocal opened
        async with engine.connect() as conn:
            port = (await conn.execute(SERVER_PORT)).scalar()
            opened += 1
            if opened == CONCURRENT:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 60)  # every connection is open at once
        return port

    try:
        return await asyncio.gather(*(checkout() for _ in range(CONCURRENT)))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_concurrent_connects_all_go_to_the_first_healthy_host(primary_and_standby, driver):
    primary, standby = primary_and_standby
    url = multi_host_url([primary, standby], driver, target_session_attrs="any")
    ports = asyncio.run(_ports_async(url)) if driver == "asyncpg" else _ports_sync(url)
    assert len(ports) == CONCURRENT
    assert set(ports) == {primary.port}, f"{ports.count(standby.port)} went to the standby"
