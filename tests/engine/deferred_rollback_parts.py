"""What the tests of psycopg2's ROLLBACK not awaited share (test_deferred_rollback*.py)."""

from __future__ import annotations

import time

import sqlalchemy as sa

BACKEND_PID = sa.text("SELECT pg_backend_pid()")
#: Longer than a close that does not wait for the server can take on a loaded machine.
PROMPT_S = 2.0
DEADLINE_S = 20.0
IDLE = 0  # psycopg2.extensions.TRANSACTION_STATUS_IDLE


def until(condition, what):
    """Wait for ``condition()`` (polled), at most `DEADLINE_S`; fail saying ``what``."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)  # polling a condition, with a deadline
