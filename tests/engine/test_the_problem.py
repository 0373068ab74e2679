"""The user's problem, reproduced with plain SQLAlchemy: pooled connections that died.

Each test warms a pool, breaks its connection with a real fault, and asserts the error the
app sees, in the driver's own words. These are what dropsafe exists to make disappear.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

pytestmark = pytest.mark.fault
# The proxy's cuts and terminated backends break connections, never the server.
shares_server = pytest.mark.shares_server


def _break(fault, server, proxy):
    if fault == "terminate":
        assert server.terminate_backends() == 1
    else:
        assert proxy.cut(fault) == 1


def _error_after_fault(server, proxy, driver, fault, **params):
    engine = sa.create_engine(proxy.route(server.url(driver, **params)))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # the pool now holds a live connection
        _break(fault, server, proxy)
        with pytest.raises(sa.exc.DBAPIError) as raised, engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return raised.value
    finally:
        engine.dispose()


def _operational_error_saying(words, server, proxy, driver, fault):
    """The error after ``fault`` (``_error_after_fault``): an OperationalError, the driver's
    own ``words`` in it."""
    error = _error_after_fault(server, proxy, driver, fault)
    assert isinstance(error, sa.exc.OperationalError)
    assert words in str(error.orig)
    return error


@shares_server
@pytest.mark.parametrize("fault", ["fin", "rst"])
def test_psycopg2_over_tls_says_ssl_syscall_eof(postgres_server, chaos_proxy, fault):
    words = "SSL SYSCALL error: EOF detected"
    error = _operational_error_saying(words, postgres_server, chaos_proxy, "psycopg2", fault)
    assert error.connection_invalidated


@shares_server
@pytest.mark.parametrize("fault", ["fin", "rst", "terminate"])
def test_psycopg2_without_tls_says_server_closed(postgres_server, chaos_proxy, fault):
    error = _error_after_fault(postgres_server, chaos_proxy, "psycopg2", fault, sslmode="disable")
    assert "server closed the connection unexpectedly" in str(error.orig)


@shares_server
def test_psycopg2_over_tls_terminated_backend(postgres_server, chaos_proxy):
    error = _error_after_fault(postgres_server, chaos_proxy, "psycopg2", "terminate")
    assert "SSL connection has been closed unexpectedly" in str(error.orig)


@shares_server
@pytest.mark.parametrize("fault", ["fin", "rst"])
def test_psycopg3_over_tls_says_unexpected_eof(postgres_server, chaos_proxy, fault):
    words = "SSL error: unexpected eof while reading"
    error = _operational_error_saying(words, postgres_server, chaos_proxy, "psycopg", fault)
    assert error.orig.sqlstate is None


@shares_server
def test_psycopg3_terminated_backend_is_admin_shutdown(postgres_server, chaos_proxy):
    import psycopg.errors

    error = _error_after_fault(postgres_server, chaos_proxy, "psycopg", "terminate")
    assert isinstance(error.orig, psycopg.errors.AdminShutdown)
    assert error.orig.sqlstate == "57P01"


@shares_server
@pytest.mark.parametrize("fault", ["fin", "rst", "terminate"])
def test_asyncpg_says_closed_in_the_middle_of_operation(postgres_server, chaos_proxy, fault):
    async def scenario():
        engine = create_async_engine(chaos_proxy.route(postgres_server.url("asyncpg")))
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            _break(fault, postgres_server, chaos_proxy)
            with pytest.raises(sa.exc.DBAPIError) as raised:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            return raised.value
        finally:
            await engine.dispose()

    error = asyncio.run(scenario())
    # Not an OperationalError: asyncpg's disconnects arrive as the generic DBAPIError.
    assert type(error) is sa.exc.DBAPIError
    assert "connection was closed in the middle of operation" in str(error.orig)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_blackholed_query_hangs_past_the_tests_own_timer(
    postgres_server, kernel_blackhole, disposing
):
    engine = disposing(sa.create_engine(postgres_server.url("psycopg2")))
    outcome: list[object] = []
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        with kernel_blackhole(postgres_server.port):
            worker = threading.Thread(
                target=lambda: outcome.append(conn.execute(sa.text("SELECT 2")).scalar()),
                daemon=True,
            )
            worker.start()
            worker.join(timeout=5)
            # Five seconds on, the driver has neither an answer nor an error.
            assert worker.is_alive()
            assert outcome == []
        # Once the network heals, TCP's retransmission delivers the query after all.
        worker.join(timeout=60)
        assert outcome == [2]
