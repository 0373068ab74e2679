"""The explorer through PgBouncer (issue 27 item 6): pooled shapes run, are struck, are checked.

A history through PgBouncer runs on the explorer's own server with PgBouncer (transaction or
session mode) between the app and it; the fault strikes a flight on one side of the pooler,
and the same checker judges the server afterwards (tests/tools/test_explorer.py plants a
duplicate behind PgBouncer and sees it reported).
"""

from __future__ import annotations

import shutil

import pytest

from dropsafe._bench._explore import OUTAGE_S, Explorer, History
from dropsafe._bench._pooler import ROUTES
from dropsafe._bench._shapes import CATALOG

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(
        shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") is None,
        reason="PgBouncer is not installed (apt-get install pgbouncer)",
    ),
    # Histories break connections on purpose (see tests/tools/test_explorer.py).
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def explorer():
    with Explorer() as explorer:
        yield explorer


def _step(explorer: Explorer, shape: str, driver: str, label: str) -> int:
    """Return the number of the shape's first flight whose label starts with ``label``."""
    labels = explorer.steps(shape, driver)
    return next(k for k, text in enumerate(labels, 1) if text.upper().startswith(label))


@pytest.mark.parametrize(
    ("shape", "driver"),
    [
        ("session_insert_via_pgbouncer_tx", "asyncpg"),
        ("plain_request_via_pgbouncer_tx", "psycopg"),
        ("mid_transaction_request_via_pgbouncer_tx_upstream", "psycopg2"),
        ("session_insert_via_pgbouncer_session", "psycopg-async"),
        ("mid_transaction_request_via_pgbouncer_tx_undeclared", "asyncpg"),
    ],
)
def test_a_pooled_shape_runs_through_pgbouncer_and_is_checked(explorer, shape, driver) -> None:
    route = ROUTES[CATALOG[shape].route]
    record = explorer.run(History(shape, driver, "none", 0))
    assert (record.outcome.kind, record.violation) == ("ok", None), record.outcome.detail
    assert route.pool_mode is not None
    pooler = explorer.poolers[route.pool_mode]
    served = {row["database"]: int(row["total_xact_count"]) for row in pooler.show("STATS")}
    assert served.get("explore_a", 0) > 0  # PgBouncer carried the app's transactions
    assert explorer.steps(shape, driver)  # the struck side counted the app's flights


def test_a_commit_struck_in_front_of_pgbouncer_is_resolved_or_unknown(explorer) -> None:
    shape, driver = "session_insert_via_pgbouncer_tx", "psycopg2"
    step = _step(explorer, shape, driver, "Q COMMIT")
    record = explorer.run(History(shape, driver, "reply_lost", step))
    assert record.fired
    assert record.violation is None, record.outcome.detail
    assert record.outcome.kind in ("ok", "unknown"), record.outcome.detail


def test_a_backend_behind_pgbouncer_is_found_and_terminated(explorer) -> None:
    """A client of a transaction-mode pooler has a backend only inside a transaction."""
    # Every driver's first statement carries its BEGIN now (psycopg2's since session 17): the
    # backend is the client's from that flight on, so the COMMIT's flight finds it.
    shape, driver = "session_insert_via_pgbouncer_tx", "psycopg2"
    step = _step(explorer, shape, driver, "Q COMMIT")
    record = explorer.run(History(shape, driver, "terminate", step))
    assert record.fired
    assert "fault failed" not in record.outcome.detail
    assert (record.outcome.kind, record.violation) == ("ok", None), record.outcome.detail


def test_an_outage_behind_pgbouncer_is_waited_out(explorer) -> None:
    """The server down for a second: PgBouncer's server login fails, the unit waits it out."""
    shape, driver = "session_insert_via_pgbouncer_tx", "psycopg2"
    step = _step(explorer, shape, driver, "Q BEGIN")
    record = explorer.run(History(shape, driver, "outage", step))
    assert record.fired
    assert (record.outcome.kind, record.violation) == ("ok", None), record.outcome.detail
    assert record.seconds >= OUTAGE_S  # it met the server down, and waited
