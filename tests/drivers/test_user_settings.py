"""The user's libpq settings win over dropsafe's defaults, wherever libpq finds them.

Besides the URL and ``connect_args``, libpq reads PG* environment variables (of dropsafe's keys,
only ``connect_timeout`` has one: PGCONNECT_TIMEOUT) and service files (``service=``, found via
PGSERVICEFILE). A value from either must reach the connection unchanged; dropsafe fills in only
what no one set. Checked on real connections, by reading back what libpq used.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import dropsafe

pytestmark = pytest.mark.fault

LIBPQ_DRIVERS = ["psycopg2", "psycopg"]


def _libpq_parameters_of(url: str) -> dict[str, str]:
    """The connection parameters libpq used for a dropsafe engine's new connection (PQconninfo)."""
    engine = dropsafe.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            dbapi_connection = conn.connection.dbapi_connection
            if hasattr(dbapi_connection, "pgconn"):  # psycopg 3
                return {
                    option.keyword.decode(): option.val.decode()
                    for option in dbapi_connection.pgconn.info
                    if option.val is not None
                }
            return dict(dbapi_connection.info.dsn_parameters)  # psycopg2
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", LIBPQ_DRIVERS)
def test_pgconnect_timeout_from_the_environment_wins(shared_server, driver, monkeypatch):
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "30")
    used = _libpq_parameters_of(shared_server.url(driver))
    assert used["connect_timeout"] == "30"
    # What the user did not set still gets dropsafe's default.
    assert used["keepalives_idle"] == "2"
    assert used["tcp_user_timeout"] == "4000"


@pytest.mark.parametrize("driver", LIBPQ_DRIVERS)
def test_a_service_files_values_win(shared_server, driver, monkeypatch, tmp_path):
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        "# the user's service file\n"
        "[other]\n"
        "keepalives_interval=9\n"
        "\n"
        "[app]\n"
        f"host={shared_server.host}\n"
        f"port={shared_server.port}\n"
        "user=postgres\n"
        f"password={shared_server.password}\n"
        "dbname=postgres\n"
        "sslmode=require\n"
        "connect_timeout=33\n"
        "keepalives_idle=77\n"
        "tcp_user_timeout=4321\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    used = _libpq_parameters_of(f"postgresql+{driver}:///?service=app")
    assert used["port"] == str(shared_server.port)  # the service file was used at all
    assert used["connect_timeout"] == "33"
    assert used["keepalives_idle"] == "77"
    assert used["tcp_user_timeout"] == "4321"
    # Not in this service (only in another one): dropsafe's default.
    assert used["keepalives_interval"] == "1"


@pytest.mark.parametrize("driver", LIBPQ_DRIVERS)
def test_pgservice_from_the_environment_selects_the_service(
    shared_server, driver, monkeypatch, tmp_path
):
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text("[app]\nconnect_timeout=44\n")
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    monkeypatch.setenv("PGSERVICE", "app")
    used = _libpq_parameters_of(shared_server.url(driver))
    assert used["connect_timeout"] == "44"
    assert used["keepalives_idle"] == "2"
