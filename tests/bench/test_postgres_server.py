"""PostgresServer: a real cluster with TLS, stopped, restarted, cloned and promoted."""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from dropsafe import ConfigurationError
from dropsafe.testing import PostgresServer, ServerError, _binaries, find_postgres_binaries

SSL_IN_USE = sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")

# shared_server: a server of this module's own: it stops it, reads its processes and files.
pytestmark = pytest.mark.own_server


def _scalar(url, sql, **engine_kwargs):
    engine = sa.create_engine(url, **engine_kwargs)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql) if isinstance(sql, str) else sql).scalar()
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "pg8000"])
def test_every_sync_driver_connects_over_tls(shared_server, driver):
    url = shared_server.url(driver)
    assert _scalar(url, SSL_IN_USE, connect_args=shared_server.connect_args(driver)) is True


def test_asyncpg_connects_over_tls(shared_server):
    async def ssl_in_use():
        engine = create_async_engine(shared_server.url("asyncpg"))
        try:
            async with engine.connect() as conn:
                return (await conn.execute(SSL_IN_USE)).scalar()
        finally:
            await engine.dispose()

    assert asyncio.run(ssl_in_use()) is True


def test_certificate_verifies_with_ca_file(shared_server):
    url = shared_server.url(
        "psycopg2", sslmode="verify-full", sslrootcert=str(shared_server.ca_file)
    )
    assert _scalar(url, SSL_IN_USE) is True


def test_runs_as_an_unprivileged_user(shared_server):
    owner = Path(f"/proc/{shared_server.pid}").stat().st_uid
    assert owner != 0
    if os.geteuid() != 0:
        assert owner == os.geteuid()


def test_execute_returns_rows_and_reports_errors(shared_server):
    assert shared_server.execute("SELECT 1, 'two' UNION ALL SELECT 3, 'four'") == [
        ("1", "two"),
        ("3", "four"),
    ]
    with pytest.raises(ServerError, match="syntax error"):
        shared_server.execute("SELEC 1")


def test_bad_arguments_are_refused(shared_server):
    with pytest.raises(ConfigurationError, match="driver must be one of"):
        shared_server.url("mysql")
    with pytest.raises(ConfigurationError, match="stop mode"):
        shared_server.stop("gentle")


@pytest.mark.fault
def test_terminate_backends_breaks_open_connections(postgres_server):
    engine = sa.create_engine(postgres_server.url())
    with engine.connect() as conn:
        assert postgres_server.terminate_backends() == 1
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT 1"))
    engine.dispose()


@pytest.mark.fault
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_committed_data_and_the_port(postgres_server, mode):
    postgres_server.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    port, pid = postgres_server.port, postgres_server.pid
    postgres_server.restart(mode)
    assert postgres_server.port == port
    assert postgres_server.pid != pid
    assert postgres_server.execute("SELECT v FROM kept") == [("42",)]


@pytest.mark.fault
def test_stop_then_start(postgres_server):
    postgres_server.stop("immediate")
    assert not postgres_server.running
    with pytest.raises(sa.exc.OperationalError):
        _scalar(postgres_server.url(connect_timeout="2"), "SELECT 1")
    postgres_server.start()
    assert _scalar(postgres_server.url(), "SELECT 1") == 1


@pytest.mark.slow
def test_synchronous_standby_then_promotion(postgres_server):
    postgres_server.execute("CREATE TABLE t (v int)")
    standby = postgres_server.make_standby(synchronous=True)
    try:
        assert standby.execute("SELECT pg_is_in_recovery()") == [("t",)]
        postgres_server.execute("INSERT INTO t VALUES (1)")
        # Synchronous: the COMMIT returned only once the standby had it.
        assert postgres_server.execute(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'"
        ) == [("sync",)]
        postgres_server.stop("immediate")
        standby.promote()
        standby.execute("INSERT INTO t VALUES (2)")
        assert standby.execute("SELECT v FROM t ORDER BY v") == [("1",), ("2",)]
        assert _scalar(standby.url(), SSL_IN_USE) is True
    finally:
        standby.close()
    with pytest.raises(ServerError, match="not a standby"):
        postgres_server.promote()


def test_close_removes_process_and_files_even_after_an_error():
    with (  # noqa: PT012 - the error must come from inside the block
        pytest.raises(RuntimeError, match="test body failed"),
        PostgresServer() as server,
    ):
        pid, base = server.pid, server.base_dir
        raise RuntimeError("test body failed")
    assert not Path(f"/proc/{pid}").exists()
    assert not base.exists()


def test_no_binaries_names_the_fix(monkeypatch):
    monkeypatch.setattr(_binaries, "_candidates", list)
    with pytest.raises(ConfigurationError) as raised:
        find_postgres_binaries()
    assert "apt-get install postgresql" in str(raised.value)
    assert "dropsafe[embedded]" in str(raised.value)


def test_a_missing_bindir_is_an_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DROPSAFE_PG_BINDIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigurationError, match="DROPSAFE_PG_BINDIR") as raised:
        find_postgres_binaries()
    assert "nowhere" in str(raised.value)
    assert "not a folder" in str(raised.value)


def test_an_incomplete_bindir_names_what_it_lacks(monkeypatch, tmp_path):
    real = find_postgres_binaries().bin_dir
    (tmp_path / "postgres").symlink_to(real / "postgres")
    (tmp_path / "psql").write_text("not a program")  # there, but not executable
    monkeypatch.setenv("DROPSAFE_PG_BINDIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="DROPSAFE_PG_BINDIR") as raised:
        find_postgres_binaries()
    assert "lacks the programs initdb, psql, pg_basebackup" in str(raised.value)
    with pytest.raises(ConfigurationError, match="DROPSAFE_PG_BINDIR"):
        PostgresServer()


def test_embedded_wheel_runs_with_tls_off(monkeypatch):
    pgserver_bin = _binaries._pgserver_bindir()
    if pgserver_bin is None:
        pytest.skip("the pgserver wheel is not installed")
    monkeypatch.setenv("DROPSAFE_PG_BINDIR", str(pgserver_bin))
    binaries = find_postgres_binaries()
    assert binaries.tls is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = PostgresServer()
    assert any("no TLS support" in str(w.message) for w in caught)
    with server:
        assert server.tls is False
        assert "sslmode" not in server.url()
        assert _scalar(server.url(), "SHOW server_version_num") >= "160000"


@pytest.mark.fault
def test_server_restarted_from_a_short_lived_thread_outlives_it(postgres_server):
    restarter = threading.Thread(target=postgres_server.restart, args=("fast",))
    restarter.start()
    restarter.join(timeout=60)
    assert not restarter.is_alive()
    # The kernel's parent-death signal must not have followed the thread that asked.
    assert postgres_server.execute("SELECT 1") == [("1",)]
    assert postgres_server.running


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_runs_as_a_normal_user_too():
    """A forked child drops root for the postgres user and runs a server as itself."""
    import concurrent.futures.thread  # noqa: F401 - the child may not read the stdlib
    import pwd

    from dropsafe.testing import _runtime

    user = pwd.getpwnam("postgres")
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a threaded process
        pid = os.fork()
    if pid == 0:  # the child: no pytest from here on, only os._exit
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            _runtime._spawner.cache_clear()  # the parent's spawner thread is not in this child
            with PostgresServer() as server:
                uid = Path(f"/proc/{server.pid}").stat().st_uid
                ssl = server.execute("SHOW ssl")[0][0]
                os.write(write_end, f"{uid == os.getuid()} {ssl}".encode())
        except BaseException as exc:
            os.write(write_end, f"error {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == "True on"


IDENTITY = "SELECT system_identifier::text FROM pg_control_system()"


def test_copied_clusters_are_clusters_of_their_own(shared_server):
    # Every server but a process's first is a copy of one initdb: dropsafe's commit resolution
    # tells clusters apart by their system identifier, so each copy needs its own, and its
    # own password (the template's is thrown away, another server's must not work).
    with PostgresServer() as copy, PostgresServer(fresh_initdb=True) as fresh:
        identities = {s.execute(IDENTITY)[0][0] for s in (shared_server, copy, fresh)}
        assert len(identities) == 3
        assert _scalar(copy.url("psycopg2"), "SELECT 1") == 1
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            _scalar(copy.url("psycopg2", password=shared_server.password), "SELECT 1")
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            _scalar(fresh.url("psycopg2", password=copy.password), "SELECT 1")
        standby = copy.make_standby()
        try:
            assert standby.execute(IDENTITY) == copy.execute(IDENTITY)
        finally:
            standby.close()
