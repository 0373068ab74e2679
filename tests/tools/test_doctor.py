"""`dropsafe doctor` against real servers: what it reports, what it advises, how it fails."""

import shutil
import subprocess
import time

import pytest

from dropsafe._cli import main
from dropsafe._drivers import SUPPORTED_DRIVERS
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
        # Heroku's DATABASE_URL: read as postgresql+<the installed driver>, nothing listens.
        (f"postgres://app:{SECRET}@127.0.0.1:1/app", 1, "cannot reach 127.0.0.1:1"),
        # A password with an unencoded '@' and '/' that does not even parse.
        (
            f"postgresql+psycopg2://u:p@{SECRET}:w/rd@127.0.0.1/db",
            2,
            "percent-encode the user and password",
        ),
        # A parameter the driver refuses is bad input (2), not a problem found (1).
        *[
            (f"postgresql+{driver}://app:{SECRET}@127.0.0.1:1/app?sslmode=bogus", 2, "refuses")
            for driver in SUPPORTED_DRIVERS
        ],
        (f"postgresql+psycopg2://app:{SECRET}@127.0.0.1:1/app?bogus=1", 2, "refuses"),
    ],
)
def test_failures_are_one_line(capsys, monkeypatch, url, expected_code, message):
    # Exit 2 for a URL that is wrong on its face, 1 for a database that cannot be examined.
    # The doctor reads DROPSAFE_* when it runs: nothing waits out the default connect_wait (10 s).
    monkeypatch.setenv("DROPSAFE_CONNECT_WAIT", "0.5")
    started = time.monotonic()
    code, out, err = _doctor(capsys, url)
    assert time.monotonic() - started < 8
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


def test_a_heroku_url_is_examined(shared_server, capsys):
    url = shared_server.url("psycopg2").replace("postgresql+psycopg2://", "postgres://")
    code, out, err = _doctor(capsys, url, shared_server.password)
    assert code == 0, err
    assert "database      postgresql+" in out


def _paste_into_psql(server, advice: str, user: str) -> subprocess.CompletedProcess[str]:
    """Paste the advice's SQL into psql, as a user would: through its standard input."""
    sql = advice.split(": ", 1)[1].split(" (or in your provider", 1)[0]
    return subprocess.run(
        [
            server.binaries.tool("psql"),
            *("-X", "-v", "ON_ERROR_STOP=1", "-h", str(server.socket_dir)),
            *("-p", str(server.port), "-U", user, "-d", "postgres"),
        ],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("superuser", [True, False])
def test_the_advised_settings_paste_into_psql_and_take_effect(postgres_server, capsys, superuser):
    # A fresh server (the advice changes its settings): OS keepalive defaults and no
    # idle-in-transaction timeout, as a new server has them.
    user = "postgres" if superuser else "app_role"
    if not superuser:
        postgres_server.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{SECRET}'")
    url = postgres_server.url(user=user, password=SECRET if not superuser else None)
    code, out, _ = _doctor(capsys, url, postgres_server.password)
    assert code == 0
    advice = [line for line in out.splitlines() if "SET tcp_keepalives_idle" in line]
    advice += [line for line in out.splitlines() if "SET idle_in_transaction" in line]
    assert len(advice) == 2, out
    for line in advice:
        pasted = _paste_into_psql(postgres_server, line, user)
        assert pasted.returncode == 0, pasted.stderr
    code, out, _ = _doctor(capsys, url, postgres_server.password)
    assert code == 0
    assert "tcp_keepalives_idle                  60" in out
    assert "idle_in_transaction_session_timeout  1min" in out
    assert "SET tcp_keepalives_idle" not in out
