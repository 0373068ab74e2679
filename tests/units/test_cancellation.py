"""A unit cancelled while its COMMIT is in flight says so on the cancellation (issue 31).

Fault: ``asyncio.wait_for`` cancels `run_transaction_async` 1 s in, while its COMMIT runs on
the server (a deferred trigger that sleeps 2 s). A cancelled task must end with
``CancelledError`` (asyncio and anyio depend on it), so dropsafe cannot raise
`CommitOutcomeUnknown` there; it notes on the ``CancelledError`` (which the caller's
``TimeoutError`` carries as its cause) that the COMMIT was in flight and its outcome is unknown,
and it adds no wait to the cancel (benchmarks/cancellation.py compares with plain SQLAlchemy).
Before: no note; nothing told the caller the write may exist.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from commit_faults import SLOW_COMMIT_SCHEMA, insert
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

import dropsafe
from dropsafe._drivers import async_drivers

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11"),
]

TIMEOUT = 1.0
BOUND = 3.0  # the cancel is honoured at the timeout; a loaded machine adds some


def _notes(error: BaseException | None) -> list[str]:
    notes, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        notes += getattr(error, "__notes__", [])
        error = error.__cause__ or error.__context__
    return notes


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", async_drivers())
def test_a_cancel_during_commit_says_the_outcome_is_unknown(postgres_server, driver):
    postgres_server.execute(SLOW_COMMIT_SCHEMA)

    async def scenario():
        engine = dropsafe.create_async_engine(postgres_server.url(driver))

        async def unit(session):
            for statement in insert(5, 2.0):
                await session.execute(text(statement))

        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError) as raised:
                await asyncio.wait_for(
                    dropsafe.run_transaction_async(async_sessionmaker(engine), unit), TIMEOUT
                )
            return raised.value, time.monotonic() - started
        finally:
            await engine.dispose()

    error, elapsed = asyncio.run(scenario())
    assert elapsed < BOUND
    assert any("COMMIT was in flight" in note for note in _notes(error)), _notes(error)
