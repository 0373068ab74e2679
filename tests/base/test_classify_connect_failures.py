"""A server that cannot be reached is retryable on every driver, however the connect fails.

Faults: the server's port refuses (nothing listens), and the server vanishes (its packets
dropped in the kernel, so the connect waits for its timeout). Each driver reports these its
own way (libpq text, psycopg's ConnectionTimeout, asyncpg's raw OSError or TimeoutError,
pg8000's InterfaceError around a socket error); each must classify as retryable, so that a unit
of work waits the outage out instead of failing.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from one_statement import error_of_one_statement

import dropsafe
from dropsafe import classify
from dropsafe._drivers import SUPPORTED_DRIVERS
from dropsafe.testing._runtime import closed_port

pytestmark = pytest.mark.fault

DRIVERS = SUPPORTED_DRIVERS
CONNECT_TIMEOUT = 2.0


def _connect_error(server, driver, port):
    """Connect through a dropsafe engine to ``port``; return the error and how long it took."""
    url = server.url(driver).replace(f":{server.port}/", f":{port}/")
    # One connect's error is under test: no connect_wait (tests/engine/test_connect_wait.py).
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(connect_timeout=CONNECT_TIMEOUT, connect_wait=0)
    )
    started = time.monotonic()
    error = error_of_one_statement(
        url,
        driver,
        sa.text("SELECT 1"),
        policy=policy,
        connect_args=server.connect_args(driver),
    )
    return error, time.monotonic() - started


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_refused_connect_is_retryable(shared_server, driver):
    with closed_port("127.0.0.1") as port:
        error, _ = _connect_error(shared_server, driver, port)
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
