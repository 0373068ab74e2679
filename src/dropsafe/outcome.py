"""Resolve an ambiguous COMMIT by asking the server what became of the transaction's xid.

Before COMMIT, a transaction that wrote reads its own xid (``pg_current_xact_id_if_assigned()``,
PostgreSQL 13+, or ``txid_current_if_assigned()`` on 10-12) together with the server's
incarnation (its postmaster start time), in the same round trip; a read-only one has no xid.
If the connection then fails during COMMIT, a fresh connection asks ``pg_xact_status(xid)``.

On the same incarnation: ``committed`` and ``aborted`` settle it; ``in progress`` (the old
backend is still finishing) is asked again until ``Policy.commit_status_timeout``.

After a crash restart or a failover the answer needs care, because an xid whose WAL was lost
can be handed to a new transaction. A transaction that committed had its WAL flushed, so its
xid is never reused: ``aborted``, ``in progress`` (a newer transaction holding the reused xid)
and an xid beyond the server's next one all mean ours did not commit there. But ``committed``
could be a newer transaction reusing the xid, so it raises `CommitOutcomeUnknown`. Anything
else, or no answer in time, raises it too. Never a guess.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from dropsafe.classify import classify
from dropsafe.errors import CommitOutcomeUnknown
from dropsafe.events import CommitResolved, emit
from dropsafe.policy import Policy, seconds
from dropsafe.redaction import redact_text

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = [
    "Outcome",
    "TransactionMark",
    "read_mark",
    "read_mark_async",
    "resolve_commit",
    "resolve_commit_async",
]

Outcome = Literal["committed", "aborted"]

_INCARNATION = "pg_postmaster_start_time()::text"
_MARK_13 = sa.text(f"SELECT pg_current_xact_id_if_assigned()::text, {_INCARNATION}")
_MARK_10 = sa.text(f"SELECT txid_current_if_assigned()::text, {_INCARNATION}")
_INCARNATION_NOW = sa.text(f"SELECT {_INCARNATION}")
_STATUS_13 = sa.text("SELECT pg_xact_status(CAST(:xid AS xid8))")
_STATUS_10 = sa.text("SELECT txid_status(CAST(:xid AS bigint))")
_FUTURE_XID = "in the future"  # the error for an xid the server has not handed out yet
_FIRST_POLL = 0.02
_MAX_POLL = 0.5


@dataclass(frozen=True)
class TransactionMark:
    """What identifies a transaction for resolution: its xid and the server's incarnation."""

    xid: int
    incarnation: str


def _modern(dialect: sa.Dialect) -> bool:
    version = getattr(dialect, "server_version_info", None) or (13,)
    return bool(version[0] >= 13)  # noqa: PLR2004 - pg_xact_status arrived in PostgreSQL 13


def _mark_from(row: Sequence[Any] | None) -> TransactionMark | None:
    if row is None or row[0] is None:
        return None
    return TransactionMark(int(row[0]), str(row[1]))


def read_mark(connection: Connection) -> TransactionMark | None:
    """Return the open transaction's mark on ``connection``, or None if it wrote nothing."""
    query = _MARK_13 if _modern(connection.dialect) else _MARK_10
    return _mark_from(connection.execute(query).first())


async def read_mark_async(connection: AsyncConnection) -> TransactionMark | None:
    """`read_mark` for an `AsyncConnection`."""
    query = _MARK_13 if _modern(connection.dialect) else _MARK_10
    return _mark_from((await connection.execute(query)).first())


class _Resolution:
    """The decision half of resolving: what a status means, how long to keep asking."""

    def __init__(self, mark: TransactionMark, policy: Policy, error: BaseException) -> None:
        self.mark = mark
        self.policy = policy
        self.error = error
        self.started = time.monotonic()
        self.deadline = self.started + seconds(policy.commit_status_timeout)
        self.pause = _FIRST_POLL

    @property
    def xid(self) -> int:
        return self.mark.xid

    def query(self, dialect: sa.Dialect) -> sa.TextClause:
        return (_STATUS_13 if _modern(dialect) else _STATUS_10).bindparams(xid=str(self.xid))

    def settle(self, status: object, incarnation: object) -> Outcome | None:
        """Return the outcome, or None to ask again; raise when it cannot be known."""
        same_server = incarnation == self.mark.incarnation
        if status == "aborted" or (not same_server and status in ("in progress", "future")):
            # After a restart or failover, a running or unknown xid is not ours: ours did not
            # commit there (a committed xid is never handed out again).
            self._report("aborted")
            return "aborted"
        if status == "committed" and same_server:
            self._report("committed")
            return "committed"
        if status == "in progress" and same_server:
            return None
        if status == "committed":
            reason = (
                f"the server restarted or failed over since (started {self.mark.incarnation}, "
                f"now {incarnation}), and 'committed' for xid {self.xid} may be a newer "
                "transaction that reused it"
            )
        else:
            reason = f"the server reports status {status!r} for xid {self.xid}"
        self._unknown(reason)
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


def _future_or_raise(error: sa.exc.DBAPIError) -> str:
    """Turn "transaction ID is in the future" into a status; re-raise anything else."""
    if _FUTURE_XID in str(error.orig):
        return "future"
    raise error


def resolve_commit(
    engine: Engine, mark: TransactionMark, policy: Policy, error: BaseException
) -> Outcome:
    """Ask ``engine`` (a fresh connection) whether the transaction committed; see the module."""
    resolution = _Resolution(mark, policy, error)
    while True:
        try:
            with engine.connect() as connection:
                incarnation = connection.execute(_INCARNATION_NOW).scalar()
                try:
                    status = connection.execute(resolution.query(connection.dialect)).scalar()
                except sa.exc.DBAPIError as exc:
                    status = _future_or_raise(exc)
        except (sa.exc.DBAPIError, OSError) as exc:
            time.sleep(resolution.next_pause(exc))
            continue
        outcome = resolution.settle(status, incarnation)
        if outcome is not None:
            return outcome
        time.sleep(resolution.next_pause())


async def resolve_commit_async(
    engine: AsyncEngine, mark: TransactionMark, policy: Policy, error: BaseException
) -> Outcome:
    """`resolve_commit` for an `AsyncEngine`."""
    resolution = _Resolution(mark, policy, error)
    while True:
        try:
            async with engine.connect() as connection:
                incarnation = (await connection.execute(_INCARNATION_NOW)).scalar()
                try:
                    result = await connection.execute(resolution.query(connection.dialect))
                    status = result.scalar()
                except sa.exc.DBAPIError as exc:
                    status = _future_or_raise(exc)
        except (sa.exc.DBAPIError, OSError) as exc:
            await asyncio.sleep(resolution.next_pause(exc))
            continue
        outcome = resolution.settle(status, incarnation)
        if outcome is not None:
            return outcome
        await asyncio.sleep(resolution.next_pause())
