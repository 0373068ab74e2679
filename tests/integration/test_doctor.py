"""`dropsafe doctor` against real servers: what it reports, what it advises, how it fails."""

import shutil

import pytest

from dropsafe._cli import main
from dropsafe.testing import ChaosProxy, PgBouncer
from dropsafe.testing._server import PASSWORD_ROLE

SECRET = "Doctor-Needle-42"  # noqa: S105 - the needle the test searches for


def _doctor(capsys, url, *needles):
    code = main(["doctor", url])
    captured = capsys.readouterr()
    for needle in (SECRET, *needles):
        assert needle not in captured.out + captured.err
    return code, captured.out, captured.err


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_report_and_recommendations(shared_server, capsys, driver):
    url = shared_server.url(driver)  # it carries the server's password
    code, out, _ = _doctor(capsys, url, shared_server.password)
    assert code == 0
    assert "PostgreSQL 15" in out or "PostgreSQL 1" in out
    assert "TLS           on (TLSv1" in out
    assert "round trip" in out
    assert "ping" in out
    assert "idle_in_transaction_session_timeout = '60s'" in out
    assert "sslmode=verify-full" in out
    assert "tcp_keepalives_idle = 60" in out


def test_a_proxy_in_between_is_noticed(shared_server, capsys):
    with ChaosProxy(shared_server.host, shared_server.port) as proxy:
        code, out, _ = _doctor(capsys, proxy.route(shared_server.url()), shared_server.password)
    assert code == 0
    assert "a pooler or proxy is in between" in out


@pytest.mark.fault
@pytest.mark.skipif(
    shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") is None, reason="needs PgBouncer"
)
@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_transaction_mode_pooler_is_found_and_named(shared_server, capsys, driver, mode):
    with PgBouncer(shared_server, pool_mode=mode) as bouncer:
        code, out, _ = _doctor(capsys, bouncer.url(driver), shared_server.password)
    assert code == 0
    advice = "ConnectionPolicy(pooler='transaction')"
    if mode == "transaction":
        assert "pooler        transaction mode" in out
        assert advice in out
    else:
        assert "pooler        no transaction-mode pooler seen" in out
        assert advice not in out


def test_no_pooler_is_seen_on_a_direct_connection(shared_server, capsys):
    code, out, _ = _doctor(capsys, shared_server.url("asyncpg"), shared_server.password)
    assert code == 0
    assert "pooler        no transaction-mode pooler seen" in out


def test_a_standby_is_named(postgres_server, capsys):
    standby = postgres_server.make_standby()
    try:
        code, out, _ = _doctor(capsys, standby.url(), standby.password)
    finally:
        standby.close()
    assert code == 0
    assert "(standby, read-only)" in out
    assert "target_session_attrs=read-write" in out


@pytest.mark.parametrize(
    ("url", "expected_code", "message"),
    [
        (f"postgresql+psycopg2://app:{SECRET}@127.0.0.1:1/app", 1, "cannot reach 127.0.0.1:1"),
        (f"not-a-url:{SECRET}", 2, "malformed database URL"),
        (f"mysql://app:{SECRET}@db/app", 2, "PostgreSQL only"),
    ],
)
def test_failures_are_one_line(capsys, url, expected_code, message):
    # Exit 2 for a URL that is wrong on its face, 1 for a database that cannot be examined.
    code, out, err = _doctor(capsys, url)
    assert code == expected_code
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_refused_authentication(shared_server, capsys):
    shared_server.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right-one'")
    try:
        url = shared_server.url(user=PASSWORD_ROLE, password=SECRET)
        code, _, err = _doctor(capsys, url)
    finally:
        shared_server.execute(f"DROP ROLE {PASSWORD_ROLE}")
    assert code == 1
    assert f"authentication refused for user {PASSWORD_ROLE}" in err
