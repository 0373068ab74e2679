"""Resolve an ambiguous COMMIT by asking the server what became of the transaction's xid.

Before COMMIT, a transaction that wrote reads its own xid (``pg_current_xact_id_if_assigned()``,
PostgreSQL 13+, or ``txid_current_if_assigned()`` on 10-12); a read-only one has none. If the
connection then fails during COMMIT, a fresh connection asks ``pg_xact_status(xid)``:
``committed`` and ``aborted`` settle it; ``in progress`` (the old backend is still finishing)
is asked again until ``Policy.commit_status_timeout``; anything else, or no answer in time,
raises `CommitOutcomeUnknown`. Never a guess.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa

from dropsafe.classify import classify
from dropsafe.errors import CommitOutcomeUnknown
from dropsafe.events import CommitResolved, emit
from dropsafe.policy import Policy, seconds
from dropsafe.redaction import redact_text

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = [
    "Outcome",
    "read_xid",
    "read_xid_async",
    "resolve_commit",
    "resolve_commit_async",
]

Outcome = Literal["committed", "aborted"]

_XID_13 = sa.text("SELECT pg_current_xact_id_if_assigned()::text")
_XID_10 = sa.text("SELECT txid_current_if_assigned()::text")
_STATUS_13 = sa.text("SELECT pg_xact_status(CAST(:xid AS xid8))")
_STATUS_10 = sa.text("SELECT txid_status(CAST(:xid AS bigint))")
_FIRST_POLL = 0.02
_MAX_POLL = 0.5


def _modern(dialect: sa.Dialect) -> bool:
    version = getattr(dialect, "server_version_info", None) or (13,)
    return bool(version[0] >= 13)  # noqa: PLR2004 - pg_xact_status arrived in PostgreSQL 13


def _xid_from(value: object) -> int | None:
    return None if value is None else int(str(value))


def read_xid(connection: Connection) -> int | None:
    """Return the xid of the open transaction on ``connection``, or None if it wrote nothing."""
    query = _XID_13 if _modern(connection.dialect) else _XID_10
    return _xid_from(connection.execute(query).scalar())


async def read_xid_async(connection: AsyncConnection) -> int | None:
    """`read_xid` for an `AsyncConnection`."""
    query = _XID_13 if _modern(connection.dialect) else _XID_10
    return _xid_from((await connection.execute(query)).scalar())


class _Resolution:
    """The decision half of resolving: what a status means, how long to keep asking."""

    def __init__(self, xid: int, policy: Policy, error: BaseException) -> None:
        self.xid = xid
        self.policy = policy
        self.error = error
        self.started = time.monotonic()
        self.deadline = self.started + seconds(policy.commit_status_timeout)
        self.pause = _FIRST_POLL

    def query(self, dialect: sa.Dialect) -> sa.TextClause:
        return (_STATUS_13 if _modern(dialect) else _STATUS_10).bindparams(xid=str(self.xid))

    def settle(self, status: object) -> Outcome | None:
        """Return the outcome, or None to ask again; raise when it cannot be known."""
        if status == "committed" or status == "aborted":  # noqa: PLR1714 - narrows the type
            outcome: Outcome = "committed" if status == "committed" else "aborted"
            self._report(outcome)
            return outcome
        if status == "in progress":
            return None
        self._unknown(f"the server reports status {status!r} for xid {self.xid}")
        return None  # pragma: no cover - _unknown raises

    def next_pause(self, failure: BaseException | None = None) -> float:
        """Return how long to wait before asking again, or raise when time is up."""
        if failure is not None and not classify(failure).retryable:
            self._unknown(f"asking the server failed: {redact_text(str(failure))}", failure)
        if time.monotonic() + self.pause > self.deadline:
            why = (
                f"the server could not be asked in time: {redact_text(str(failure))}"
                if failure is not None
                else f"xid {self.xid} still in progress after "
                f"{seconds(self.policy.commit_status_timeout):g}s"
            )
            self._unknown(why, failure)
        pause, self.pause = self.pause, min(self.pause * 2, _MAX_POLL)
        return pause

    def _report(self, outcome: Literal["committed", "aborted", "unknown"]) -> None:
        emit(
            self.policy.hooks,
            CommitResolved(self.xid, outcome, time.monotonic() - self.started),
        )

    def _unknown(self, reason: str, failure: BaseException | None = None) -> None:
        self._report("unknown")
        raise CommitOutcomeUnknown(
            f"the connection failed during COMMIT of transaction {self.xid} and its outcome "
            f"cannot be known: {reason}",
            xid=self.xid,
            reason=reason,
        ) from (failure or self.error)


def resolve_commit(engine: Engine, xid: int, policy: Policy, error: BaseException) -> Outcome:
    """Ask ``engine`` (a fresh connection) whether ``xid`` committed; see the module docs."""
    resolution = _Resolution(xid, policy, error)
    while True:
        try:
            with engine.connect() as connection:
                status = connection.execute(resolution.query(connection.dialect)).scalar()
        except (sa.exc.DBAPIError, OSError) as exc:
            time.sleep(resolution.next_pause(exc))
            continue
        outcome = resolution.settle(status)
        if outcome is not None:
            return outcome
        time.sleep(resolution.next_pause())


async def resolve_commit_async(
    engine: AsyncEngine, xid: int, policy: Policy, error: BaseException
) -> Outcome:
    """`resolve_commit` for an `AsyncEngine`."""
    resolution = _Resolution(xid, policy, error)
    while True:
        try:
            async with engine.connect() as connection:
                result = await connection.execute(resolution.query(connection.dialect))
                status = result.scalar()
        except (sa.exc.DBAPIError, OSError) as exc:
            await asyncio.sleep(resolution.next_pause(exc))
            continue
        outcome = resolution.settle(status)
        if outcome is not None:
            return outcome
        await asyncio.sleep(resolution.next_pause())
