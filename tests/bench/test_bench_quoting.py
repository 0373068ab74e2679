"""Names and URL parts the bench is given are quoted where they meet SQL, config files or URLs.

Issue 32, item 4: a standby's name was written raw into ``primary_conninfo`` and SQL (a quote
and a line break added a ``restore_command`` that ran); a database name was written raw into
URLs (``postgres?sslmode=disable&`` turned TLS off).
"""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy.engine import make_url

from dropsafe import ConfigurationError
from dropsafe.testing import PatroniCluster, PgBouncer, multi_host_url
from dropsafe.testing._patroni import patroni_cluster_unavailable

EVIL_DATABASE = "postgres?sslmode=disable&x=/y#z"
EVIL_PARAM = "-c x=1&sslmode=disable"

# shared_server: a server of this module's own: it copies the server into standbys.
pytestmark = pytest.mark.own_server


def _check_url(url: str, tls_key: str) -> None:
    parsed = make_url(url)
    assert parsed.database == EVIL_DATABASE
    assert parsed.query[tls_key] == "require"
    assert parsed.query["options"] == EVIL_PARAM


@pytest.mark.parametrize(("driver", "tls_key"), [("psycopg2", "sslmode"), ("asyncpg", "ssl")])
def test_a_database_name_or_a_parameter_cannot_rewrite_the_url(shared_server, driver, tls_key):
    assert shared_server.tls
    kwargs = {"database": EVIL_DATABASE, "options": EVIL_PARAM}
    _check_url(shared_server.url(driver, **kwargs), tls_key)
    _check_url(multi_host_url([shared_server], driver, **kwargs), tls_key)


@pytest.mark.skipif(patroni_cluster_unavailable() is not None, reason="needs Patroni")
def test_the_patroni_urls_quote_them_too():
    cluster = PatroniCluster()  # never started: its URLs are text
    try:
        kwargs = {"database": EVIL_DATABASE, "options": EVIL_PARAM}
        _check_url(cluster.url("psycopg2", **kwargs), "sslmode")
        _check_url(cluster.multi_host_url("psycopg2", **kwargs), "sslmode")
    finally:
        cluster.close()


@pytest.mark.parametrize(
    "name", ["x'\nrestore_command = 'touch /tmp/dropsafe-pwned'", "a\tb", "", "n" * 64, "é"]
)
def test_a_standby_name_no_config_line_can_hold_is_refused(shared_server, name):
    with pytest.raises(ConfigurationError, match="standby's name"):
        shared_server.make_standby(name=name)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_standby_name_with_quotes_is_quoted_in_sql_and_in_its_conninfo(postgres_server):
    name = 'it\'s "the" \\ standby'
    standby = postgres_server.make_standby(name=name, synchronous=True)
    try:
        rows = postgres_server.execute(
            "SELECT application_name, sync_state FROM pg_stat_replication"
        )
        assert rows == [(name, "sync")]
    finally:
        standby.close()


@pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="needs pgbouncer")
def test_the_poolers_console_takes_a_bare_database_name_only(shared_server):
    with PgBouncer(shared_server) as bouncer:
        with pytest.raises(ConfigurationError, match="database name"):
            bouncer.kill_database("postgres; SHUTDOWN")
        assert bouncer.running
        assert bouncer.console("SHOW VERSION")
        assert bouncer.kill_database("postgres") is False  # a bare name still works
