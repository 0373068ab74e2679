"""A unit that writes with ``synchronous_commit`` off (its own ``SET LOCAL``, or the role's,
database's or server's setting) and notifies.

Its COMMIT delivers the notification before the commit record is flushed; a crash then loses
the commit, and its xid reads ``aborted``. Running the unit again notifies a second time: after
a crash, such a COMMIT is unknown, as one the mark itself made asynchronous.
"""

from __future__ import annotations

import pytest
from commit_faults import (
    SLOW_COMMIT_SCHEMA,
    crash_once_the_commit_is_done,
    rows,
)

from dropsafe.testing import PostgresServer

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_an_asynchronous_write_whose_commit_a_crash_lost_is_unknown(kernel_blackhole, driver):
    with PostgresServer(settings={"wal_writer_delay": "10s"}) as server:  # WAL kept in memory
        server.execute(SLOW_COMMIT_SCHEMA)
        crashed = crash_once_the_commit_is_done(
            server,
            kernel_blackhole,
            driver,
            [
                "SET LOCAL synchronous_commit = off",
                "INSERT INTO ledger VALUES (7)",
                "SELECT pg_notify('dropsafe_test', 'async-write')",
            ],
        )
        written = rows(server, 7)
    # The dangerous history: the crash lost the commit (no row), after listeners had heard it.
    assert (crashed, written) == (("unknown", 1, ["unknown"]), 0)
