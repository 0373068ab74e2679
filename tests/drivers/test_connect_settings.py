"""TCP settings reach every driver's real socket; a value the user set always wins."""

from __future__ import annotations

import asyncio
import socket

import pytest
import sqlalchemy as sa

import dropsafe


def _sockopts(sock):
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    }


def _raw_connection(engine):
    with engine.connect() as conn:
        return conn.connection.dbapi_connection


def test_psycopg2_gets_libpq_settings_and_user_values_win(shared_server, disposing):
    engine = disposing(
        dropsafe.create_engine(shared_server.url("psycopg2", tcp_user_timeout="2500"))
    )
    params = _raw_connection(engine).get_dsn_parameters()
    assert params["tcp_user_timeout"] == "2500"  # the user's
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "2"
    assert params["connect_timeout"] == "5"


def test_psycopg_gets_libpq_settings(shared_server, disposing):
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=4, keepalive_idle=7)
    )
    engine = disposing(dropsafe.create_engine(shared_server.url("psycopg"), policy=policy))
    params = _raw_connection(engine).info.get_parameters()
    assert params["tcp_user_timeout"] == "4000"
    assert params["keepalives_idle"] == "7"


def test_pg8000_socket_is_tuned_and_reads_are_not_timed_out(shared_server, disposing):
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url("pg8000"), connect_args=shared_server.connect_args("pg8000")
        )
    )
    raw = _raw_connection(engine)
    assert _sockopts(raw._usock) == {"keepalive": 1, "idle": 2, "user_timeout": 4000}
    # pg8000's connect timeout would also cut long queries: it is lifted after connecting.
    assert raw._usock.gettimeout() is None


def test_asyncpg_socket_is_tuned(shared_server):
    async def sockopts():
        engine = dropsafe.create_async_engine(shared_server.url("asyncpg"))
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                sock = raw.dbapi_connection._connection._transport.get_extra_info("socket")
                return _sockopts(sock)
        finally:
            await engine.dispose()

    assert asyncio.run(sockopts()) == {"keepalive": 1, "idle": 2, "user_timeout": 4000}


def test_policy_without_keepalives_or_user_timeout(shared_server, disposing):
    policy = dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=None, keepalive_idle=None)
    )
    engine = disposing(dropsafe.create_engine(shared_server.url("psycopg2"), policy=policy))
    params = _raw_connection(engine).get_dsn_parameters()
    assert "tcp_user_timeout" not in params or params["tcp_user_timeout"] == "0"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1


def _socket_of(dbapi_connection):
    fd = dbapi_connection.fileno()
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
@pytest.mark.parametrize(
    ("query", "expected"),
    [({"keepalives": "0"}, 4_000), ({"keepalives": "0", "tcp_user_timeout": "3000"}, 3000)],
    ids=["dropsafe-timeout", "user-timeout"],
)
def test_keepalives_off_still_gets_its_tcp_user_timeout(
    shared_server, driver, query, expected, disposing
):
    # libpq applies tcp_user_timeout only with keepalives on: a user's keepalives=0 left the
    # socket with none (0), and a request on a dead link hanging for about 15 minutes.
    engine = disposing(dropsafe.create_engine(shared_server.url(driver, **query)))
    raw = _raw_connection(engine)
    sock = _socket_of(raw)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0  # the user's
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == expected
    finally:
        sock.detach()
