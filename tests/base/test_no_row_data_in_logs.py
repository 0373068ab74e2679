"""Query parameters and row data appear in no log line, no event and no metric (issue 31).

Faults: a unit of work whose statements carry planted values (an e-mail, a social security
number, a password hash as bound parameters) loses its connection (its backend terminated),
then fails with a serialization failure whose DETAIL quotes a planted row value, until it gives
up; with ``hide_parameters`` off and on. Searched: every field of every event, every record
the ``dropsafe`` logger writes, formatted with its traceback, at DEBUG, and every metric
`PrometheusHook` exposes. Before the fix, SQLAlchemy's ``[parameters: ...]`` and the server's
DETAIL reached `RetryScheduled`, `RetriesGaveUp` and `ConnectionInvalidated`, and the log lines
made of them (8 of 8 cases).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe.events import LoggingHook, PrometheusHook
from log_capture import dropsafe_logger_at_debug

prometheus_client = pytest.importorskip("prometheus_client")

pytestmark = pytest.mark.fault

EMAIL = "planted.alice@example.org"
SSN = "078-05-1120"
PASSWORD_HASH = "$2b$12$plantedHashplantedHashplantedHashplantedHa"  # noqa: S105 - planted
ROW_VALUE = "planted-row-value-4242"
PLANTED = (EMAIL, SSN, PASSWORD_HASH, ROW_VALUE)

TERMINATE = sa.text(
    "SELECT pg_terminate_backend(pg_backend_pid()) "
    "WHERE CAST(:email AS text) IS NOT NULL AND CAST(:ssn AS text) IS NOT NULL"
)
CONFLICT = sa.text("SELECT planted_conflict(CAST(:hash AS text))")


@pytest.fixture(scope="module")
def server(shared_server):
    shared_server.execute(
        "CREATE FUNCTION planted_conflict(secret text) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001', "
        f"DETAIL = 'row (' || '{ROW_VALUE}' || ', ' || secret || ')'; END $$"
    )
    return shared_server


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines():
    with dropsafe_logger_at_debug(_Lines()) as handler:
        yield handler.lines


def _policy(events, registry):
    return dropsafe.Policy(
        unit=dropsafe.UnitPolicy(max_attempts=3, backoff_initial=0, backoff_max=0),
        hooks=(events.append, LoggingHook(), PrometheusHook(registry)),
    )


def _attempt(conn, runs):
    runs.append(1)
    if len(runs) == 1:
        conn.execute(TERMINATE, {"email": EMAIL, "ssn": SSN})
    conn.execute(CONFLICT, {"hash": PASSWORD_HASH})


def _check(events, lines, registry):
    kinds = {type(event).__name__ for event in events}
    assert {"RetryScheduled", "RetriesGaveUp"} <= kinds, kinds
    metrics = prometheus_client.generate_latest(registry).decode()
    assert "dropsafe_retries_total" in metrics
    texts = [repr(dataclasses.asdict(event)) for event in events] + lines + [metrics]
    assert any("40001" in text or "serialize" in text for text in texts), texts
    leaks = [text for text in texts for value in PLANTED if value in text]
    assert not leaks, leaks


@pytest.mark.parametrize("hide_parameters", [False, True])
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "pg8000"])
def test_no_planted_value_in_any_event_or_log_line(server, lines, driver, hide_parameters):
    events: list[object] = []
    registry = prometheus_client.CollectorRegistry()
    engine = dropsafe.create_engine(
        server.url(driver),
        connect_args=server.connect_args(driver),
        policy=_policy(events, registry),
        hide_parameters=hide_parameters,
    )
    runs: list[int] = []
    try:
        with pytest.raises(sa.exc.DBAPIError):
            dropsafe.run_transaction(engine, lambda conn: _attempt(conn, runs))
    finally:
        engine.dispose()
    _check(events, lines, registry)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_no_planted_value_in_any_async_event_or_log_line(server, lines, driver):
    events: list[object] = []
    registry = prometheus_client.CollectorRegistry()

    async def scenario():
        engine = dropsafe.create_async_engine(server.url(driver), policy=_policy(events, registry))
        runs: list[int] = []

        async def attempt(conn):
            await conn.run_sync(_attempt, runs)

        try:
            with pytest.raises(sa.exc.DBAPIError):
                await dropsafe.run_transaction_async(engine, attempt)
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    _check(events, lines, registry)
