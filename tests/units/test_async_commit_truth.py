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
import threading

import psycopg2
import pytest
import sqlalchemy as sa
from commit_faults import SLOW_COMMIT_SCHEMA, Unit, rows
from test_commit_truth import (
    Recorder,
    _backend_pid,
    _libpq_url,
    _lose_the_first_reply,
    _wait,
)

import dropsafe
from dropsafe import CommitOutcomeUnknown
from dropsafe.testing import PostgresServer

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg"])
def test_an_asynchronous_write_whose_commit_a_crash_lost_is_unknown(kernel_blackhole, driver):
    with PostgresServer(settings={"wal_writer_delay": "10s"}) as server:  # WAL kept in memory
        server.execute(SLOW_COMMIT_SCHEMA)
        bystander = psycopg2.connect(_libpq_url(server))
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
            policy=dropsafe.Policy(
                connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
                unit=dropsafe.UnitPolicy(commit_status_timeout=20, deadline=40),
                hooks=(recorder,),
            ),
        )
        holes = contextlib.ExitStack()
        lose_the_reply = _lose_the_first_reply(holes, kernel_blackhole)
        crashes = []

        def crash_once_committed(engine):
            lose_the_reply(engine)

            @sa.event.listens_for(engine, "commit")
            def crash_after_it(connection):
                if crashes:
                    return
                pid = _backend_pid(connection)

                def crash():
                    _wait(
                        lambda: server.execute(
                            f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND state = 'idle'"
                        ),
                        20,
                        "the COMMIT to be done on the server",
                    )
                    os.kill(bystander_pid, signal.SIGKILL)  # every backend reset: a crash

                crashes.append(threading.Thread(target=crash, daemon=True))
                crashes[0].start()

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
