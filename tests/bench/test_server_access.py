"""Only the test that started a throwaway server may enter it: not other local users.

A server that trusts every local user hands a superuser (and ``COPY ... FROM PROGRAM``, i.e.
the server's OS account) to anyone on the machine while the tests run.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa

from children import psql_as_nobody
from dropsafe.testing import PgBouncer, multi_host_url

ATTACK = "COPY (SELECT 1) TO PROGRAM 'id'"

# shared_server: a server of this module's own: it reads the server's processes and files.
pytestmark = pytest.mark.own_server


def _connect_without_password(host, port):
    # No password, no password file: what any local program can try.
    return psycopg2.connect(
        host=host, port=port, user="postgres", dbname="postgres", passfile=os.devnull
    )


def test_tcp_without_the_password_is_refused(shared_server):
    with pytest.raises(psycopg2.OperationalError, match="password"):
        _connect_without_password(shared_server.host, shared_server.port).close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=shared_server.host,
            port=shared_server.port,
            user="postgres",
            dbname="postgres",
            password="guessed",  # noqa: S106 - a wrong password on purpose
        ).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_cannot_enter_by_tcp_or_socket(shared_server):
    psql = shared_server.binaries.tool("psql")
    port = str(shared_server.port)
    hosts = [shared_server.host]
    # The socket's folder keeps out every account but the server's own (which owns its files).
    if Path(f"/proc/{shared_server.pid}").stat().st_uid != pwd.getpwnam("nobody").pw_uid:
        hosts.append(str(shared_server.socket_dir))
    for host in hosts:
        target = ("-h", host, "-p", port, "-U", "postgres", "-c", ATTACK)
        code, output = psql_as_nobody(psql, *target, timeout=30)
        assert code != 0, f"nobody entered through {host}: {output}"
        assert "uid=" not in output


@pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="needs pgbouncer")
def test_the_pooler_in_front_refuses_too(shared_server):
    with PgBouncer(shared_server) as bouncer:
        with pytest.raises(psycopg2.OperationalError, match=r"password|SASL|auth"):
            _connect_without_password(bouncer.host, bouncer.port).close()
        # The owner still gets through, with the password its URL carries.
        engine = sa.create_engine(bouncer.url())
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()
        assert bouncer.console("SHOW VERSION")


def test_the_owner_enters_with_what_the_urls_carry(shared_server):
    password = shared_server.password
    assert len(password) >= 20  # generated, not guessable
    for url in (shared_server.url(), multi_host_url([shared_server])):
        assert f":{password}@" in url
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT current_user")).scalar() == "postgres"
        finally:
            engine.dispose()


def test_the_password_is_not_shown(shared_server):
    password = shared_server.password
    assert password not in repr(shared_server)
    assert password not in str(shared_server)
    assert str(shared_server.port) in repr(shared_server)
    # Files holding it are readable by the server's account only.
    for path in shared_server.base_dir.rglob("*"):
        if path.is_file() and password.encode() in path.read_bytes():
            assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"


def test_each_server_has_its_own_password(shared_server, postgres_server):
    assert shared_server.password != postgres_server.password
