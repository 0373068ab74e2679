"""A unit that writes with ``synchronous_commit`` off (its own ``SET LOCAL``, or the role's,
database's or server's setting) and notifies.

Its COMMIT delivers the notification before the commit record is flushed; a crash then loses
the commit, and its xid reads ``aborted``. Running the unit again notifies a second time: after
a crash, such a COMMIT is unknown, as one the mark itself made asynchronous.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psycopg2
import pytest
from commit_faults import (
    SLOW_COMMIT_SCHEMA,
    Recorder,
    Unit,
    libpq_url,
    lose_the_reply_then,
    resolving_policy,
    rows,
)

from dropsafe import CommitOutcomeUnknown
from dropsafe.testing import PostgresServer

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_an_asynchronous_write_whose_commit_a_crash_lost_is_unknown(kernel_blackhole, driver):
    with PostgresServer(settings={"wal_writer_delay": "10s"}) as server:  # WAL kept in memory
        server.execute(SLOW_COMMIT_SCHEMA)
        bystander = psycopg2.connect(libpq_url(server))
        bystander_pid = bystander.get_backend_pid()
        recorder = Recorder()
        unit = Unit(
            driver,
            server.url(driver),
            [
                "SET LOCAL synchronous_commit = off",
                "INSERT INTO ledger VALUES (7)",
                "SELECT pg_notify('dropsafe_test', 'async-write')",
            ],
            policy=resolving_policy(recorder),
        )
        holes = contextlib.ExitStack()
        crashes = []
        # Every backend reset: a crash.
        crash_once_committed = lose_the_reply_then(
            holes,
            kernel_blackhole,
            server,
            lambda: os.kill(bystander_pid, signal.SIGKILL),
            crashes,
        )

        outcome = "acknowledged"
        try:
            with holes:
                unit.run(before_commit=crash_once_committed)
        except CommitOutcomeUnknown:
            outcome = "unknown"
        finally:
            with contextlib.suppress(psycopg2.Error):
                bystander.close()
        crashes[0].join(30)
        written = rows(server, 7)
    # The dangerous history: the crash lost the commit (no row), after listeners had heard it.
    assert (outcome, unit.calls, written) == ("unknown", 1, 0)
    assert recorder.outcomes() == ["unknown"]
