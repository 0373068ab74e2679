"""A server that cannot be reached is retryable on every driver, however the connect fails.

Faults: the server's port refuses (nothing listens), and the server vanishes (its packets
dropped in the kernel, so the connect waits for its timeout). Each driver reports these its
own way (libpq text, psycopg's ConnectionTimeout, asyncpg's raw OSError or TimeoutError,
pg8000's InterfaceError around a socket error); each must classify as retryable, so that a unit
of work waits the outage out instead of failing.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe import classify

pytestmark = pytest.mark.fault

DRIVERS = ["psycopg2", "psycopg", "asyncpg", "pg8000"]
CONNECT_TIMEOUT = 2.0


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _connect_error(server, driver, port):
    """Connect through a dropsafe engine to ``port``; return the error and how long it took."""
    url = server.url(driver).replace(f":{server.port}/", f":{port}/")
    # One connect's error is under test: no connect_wait (tests/engine/test_connect_wait.py).
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(connect_timeout=CONNECT_TIMEOUT, connect_wait=0)
    )
    started = time.monotonic()
    if driver == "asyncpg":

        async def attempt():
            engine = dropsafe.create_async_engine(url, policy=policy)
            try:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            except Exception as exc:
                return exc
            finally:
                await engine.dispose()
            return None

        error = asyncio.run(attempt())
    else:
        engine = dropsafe.create_engine(
            url, policy=policy, connect_args=server.connect_args(driver)
        )
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:
            error = exc
        else:
            error = None
        finally:
            engine.dispose()
    return error, time.monotonic() - started


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_refused_connect_is_retryable(shared_server, driver):
    error, _ = _connect_error(shared_server, driver, _closed_port())
    assert error is not None
    assert classify(error).retryable, repr(error)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_connect_to_a_vanished_server_is_retryable(shared_server, driver, kernel_blackhole):
    with kernel_blackhole(shared_server.port):
        error, elapsed = _connect_error(shared_server, driver, shared_server.port)
    assert error is not None
    print(f"{driver}: {type(error).__name__} after {elapsed:.1f}s: {str(error)[:120]!r}")
    assert classify(error).retryable, repr(error)
    # libpq rounds connect_timeout to whole seconds (and takes 2 for 1); a margin for load.
    assert elapsed <= CONNECT_TIMEOUT + 2.0
