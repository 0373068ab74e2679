"""A hook or a log handler that raises never changes what a unit of work does (issue 31).

Faults: a handler on the ``dropsafe`` logger whose ``emit`` raises (a log shipper that is
down), and a hook that raises, while (a) a unit of work meets a real serialization failure
once, and (b) a unit's COMMIT reply is lost (the proxy resets the connection while the server
runs the COMMIT). Checked: (a) the unit runs twice and returns, the failures are counted (the
first of each kind goes to stderr: tests/base/test_log.py); (b) the commit is resolved, the
caller gets its result, the row exists once. Before the fix the handler's error came out of
``run_transaction``: 1 run instead of 2, and in (b) an error that is not
`CommitOutcomeUnknown` for a unit that had committed.
"""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from commit_faults import SLOW_COMMIT_SCHEMA, Unit, WhenCommitRuns, insert, rows

import dropsafe
from dropsafe._log import observer_failures
from dropsafe.events import LoggingHook
from log_capture import dropsafe_logger_at_debug

pytestmark = pytest.mark.fault

DRIVERS = ["psycopg2", "psycopg", "asyncpg"]
CONFLICT = sa.text("DO $$ BEGIN RAISE EXCEPTION 'planted conflict' USING ERRCODE = '40001'; END $$")


class ShipperDown(Exception):
    """The log shipper's own error."""


class _RaisingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:  # noqa: ARG002 - it fails whatever it gets
        raise ShipperDown("the log shipper is down")


def _raising_hook(event: object) -> None:
    raise ShipperDown("the metrics backend is down")


@pytest.fixture
def broken_logging():
    with dropsafe_logger_at_debug(_RaisingHandler()):
        yield


POLICY = dropsafe.Policy(
    unit=dropsafe.UnitPolicy(backoff_initial=0, backoff_max=0),
    hooks=(LoggingHook(), _raising_hook),
)


@pytest.mark.usefixtures("broken_logging")
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "pg8000"])
def test_a_raising_handler_does_not_stop_a_retry(shared_server, driver):
    engine = dropsafe.create_engine(
        shared_server.url(driver), connect_args=shared_server.connect_args(driver), policy=POLICY
    )
    runs = []
    failures = observer_failures()

    def unit(conn):
        runs.append(1)
        if len(runs) == 1:
            conn.execute(CONFLICT)
        return "done"

    try:
        assert dropsafe.run_transaction(engine, unit) == "done"
    finally:
        engine.dispose()
    assert len(runs) == 2
    assert observer_failures() > failures  # counted; the first of a kind went to stderr


@pytest.mark.usefixtures("broken_logging")
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_raising_handler_does_not_stop_a_commit_resolution(postgres_server, chaos_proxy, driver):
    postgres_server.execute(SLOW_COMMIT_SCHEMA)
    unit = Unit(
        driver, chaos_proxy.route(postgres_server.url(driver)), insert(7, 1.0), policy=POLICY
    )
    watcher = WhenCommitRuns(postgres_server, lambda: chaos_proxy.cut("rst"))
    assert unit.run() == "done"
    watcher.join(timeout=20)
    assert unit.calls == 1
    assert rows(postgres_server, 7) == 1
