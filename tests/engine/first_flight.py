"""What the tests of BEGIN in the first statement's flight share, psycopg 3's
(test_begin_first_flight.py) and asyncpg's (test_begin_first_flight_asyncpg.py): the URL through
the module's `FlightProxy` and the transaction characteristics each compares, option on or off.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

#: The characteristics both drivers compare; each adds its own (``AUTOCOMMIT``: psycopg 3).
CHARACTERISTICS = [
    pytest.param({}, id="default"),
    pytest.param({"isolation_level": "SERIALIZABLE"}, id="serializable"),
    pytest.param(
        {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}, id="rr-readonly"
    ),
    pytest.param(
        {
            "isolation_level": "SERIALIZABLE",
            "postgresql_readonly": True,
            "postgresql_deferrable": True,
        },
        id="deferrable",
    ),
]


def flight_url(server: Any, proxy: Any, driver: str, **query: str) -> sa.URL:
    """``driver``'s URL to ``server`` through ``proxy``, in plaintext (the proxy reads it)."""
    plaintext = {"ssl": "disable"} if driver == "asyncpg" else {"sslmode": "disable"}
    url = sa.make_url(server.url(driver, **plaintext)).set(host="127.0.0.1", port=proxy.port)
    return url.update_query_dict(query)


def counted(proxy: Any, engine: Any, request: Any, times: int = 3) -> tuple[float, list[str]]:
    """Run ``request`` once to connect, then ``times`` more; return the flights per request.

    Each count follows a checkout of the engine's one connection, which reads (or waits for)
    the reply of the ROLLBACK left unread at checkin: the proxy has forwarded (counted) it then.
    """

    def settled() -> int:
        with engine.connect():
            pass
        return len(proxy.query_flights())

    request()
    start = settled()
    for _ in range(times):
        request()
    end = settled()
    labels = [flight.label for flight in proxy.query_flights()[start:end]]
    return len(labels) / times, labels
