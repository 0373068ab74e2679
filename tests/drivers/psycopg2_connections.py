"""What the psycopg2 first-flight tests share: a server's DSN, and a connection's flags as the
app reads them (test_psycopg2_first_flight.py, test_psycopg2_first_flight_attacks.py)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def dsn(server: Any) -> str:
    """``server``'s libpq DSN for psycopg2.connect, with its password."""
    url = sa.make_url(server.url("psycopg2"))
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def flags(conn: Any) -> tuple[object, ...]:
    """The connection's flags an app reads, and libpq's transaction status."""
    return (
        conn.autocommit,
        conn.status,
        conn.isolation_level,
        conn.readonly,
        conn.deferrable,
        conn.get_transaction_status(),
    )
