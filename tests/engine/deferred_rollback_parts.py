"""What the tests of psycopg2's ROLLBACK not awaited share (test_deferred_rollback*.py)."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any
from unittest import mock

import sqlalchemy as sa

from dropsafe._drivers import psycopg2_rollback

if TYPE_CHECKING:
    from collections.abc import Iterator

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


@contextlib.contextmanager
def handed_off() -> Iterator[list[Any]]:
    """Record, inside the block, each psycopg2 connection whose ROLLBACK is handed to a worker.

    Whether a ROLLBACK was deferred, read without a race: a look in ``_PENDING`` after the
    request misses one whose worker has already ended and taken it out (a quick ROLLBACK on a
    loaded machine: once in CI).
    """
    handed: list[Any] = []
    run = psycopg2_rollback._Workers.run

    def recording(workers: Any, pending: Any) -> None:
        handed.append(pending._connection)
        run(workers, pending)

    with mock.patch.object(psycopg2_rollback._Workers, "run", recording):
        yield handed


def was_handed_off(native: Any, handed: list[Any]) -> bool:
    """Whether ``native`` is among the connections ``handed_off`` recorded."""
    return any(connection is native for connection in handed)
