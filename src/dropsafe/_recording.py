"""The pending commit: a unit of work's xid and backend, read right before its COMMIT.

SQLAlchemy's engine-level ``commit`` event fires after every flush and every ``before_commit``
listener, right before the DBAPI COMMIT. There, a unit of work reads its transaction's xid and
its backend's pid in one round trip. A transaction that wrote has an xid; one that only read has
none and may simply run again. ``NOTIFY`` is the exception: it takes its xid only at COMMIT, so a
transaction whose statements mention it is given one here (``pg_current_xact_id()``) and counts
as having written. If the COMMIT's reply is lost, `dropsafe._resolution` asks the server what
became of this xid.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import event

from dropsafe._server_life import ServerLife, server_life_of

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection, Dialect, Engine

__all__ = ["CommitRecorder", "PendingCommit", "record_commits", "recording"]

# A statement that may queue a notification: NOTIFY or pg_notify().
_NOTIFY = re.compile(r"notify", re.IGNORECASE)
# (xid8 functions arrived in PostgreSQL 13; txid_* before.)
_READ = "SELECT pg_current_xact_id_if_assigned()::text, pg_backend_pid()"
_READ_ASSIGNING = "SELECT pg_current_xact_id()::text, pg_backend_pid()"
_READ_BEFORE_13 = "SELECT txid_current_if_assigned()::text, pg_backend_pid()"
_READ_ASSIGNING_BEFORE_13 = "SELECT txid_current()::text, pg_backend_pid()"


@dataclass(frozen=True)
class PendingCommit:
    """A COMMIT that was about to be sent: its xid, its backend and its server's life."""

    xid: int
    backend_pid: int
    server_life: ServerLife


class CommitRecorder:
    """What one attempt of a unit of work learned about its COMMIT, filled in by listeners."""

    def __init__(self) -> None:
        #: The last COMMIT's xid and backend; None when that transaction wrote nothing.
        self.pending: PendingCommit | None = None
        #: COMMITs sent (or about to be) while armed: more than one cannot be retried whole.
        self.commits_sent = 0
        #: A statement may have queued a NOTIFY, which takes its xid only at COMMIT.
        self.needs_xid = False
        #: Whether to read the xid (``UnitPolicy.verify_commits``); COMMITs are counted anyway.
        self.read_xid = True
        self.armed = False

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Record the COMMITs sent inside this block (the unit's own, not the user's)."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


_RECORDER: contextvars.ContextVar[CommitRecorder | None] = contextvars.ContextVar(
    "dropsafe_commit_recorder", default=None
)


@contextlib.contextmanager
def recording(*, read_xid: bool = True) -> Iterator[CommitRecorder]:
    """Give the engines' listeners a recorder for the attempt that runs inside this block.

    A context variable reaches the listeners in threads and in SQLAlchemy's asyncio greenlets
    alike (SQLAlchemy hands its context to the greenlets it spawns).
    """
    recorder = CommitRecorder()
    recorder.read_xid = read_xid
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def record_commits(engine: Engine) -> None:
    """Install the listeners that read the xid before each COMMIT of a unit of work.

    Idempotent; installed by the first unit of work on an engine, never by `harden` (an engine
    that runs none keeps SQLAlchemy's event-free fast path). Outside a unit of work they cost
    one context-variable read per statement.
    """
    if event.contains(engine, "commit", _read_before_commit):
        return
    event.listen(engine, "before_cursor_execute", _notice_notify)
    event.listen(engine, "commit", _read_before_commit)


def _notice_notify(  # noqa: PLR0917 - SQLAlchemy's before_cursor_execute signature
    conn: Connection,
    cursor: object,
    statement: str,
    parameters: object,
    context: object,
    executemany: bool,
) -> None:
    del conn, cursor, parameters, context, executemany
    recorder = _RECORDER.get()
    if recorder is not None and not recorder.needs_xid and _NOTIFY.search(statement):
        recorder.needs_xid = True


def _read_before_commit(conn: Connection) -> None:
    """Engine ``commit`` listener: the last moment before COMMIT, after every flush and hook."""
    recorder = _RECORDER.get()
    if recorder is None or not recorder.armed:
        return
    if not recorder.read_xid:
        recorder.commits_sent += 1
        return
    row = conn.exec_driver_sql(_read_statement(conn.dialect, assign=recorder.needs_xid)).first()
    recorder.pending = (
        None
        if row is None or row[0] is None
        else PendingCommit(
            int(row[0]), int(row[1]), server_life_of(conn.connection.driver_connection)
        )
    )
    recorder.commits_sent += 1  # from here on, the COMMIT may reach the server


def _read_statement(dialect: Dialect, *, assign: bool) -> str:
    version = getattr(dialect, "server_version_info", None) or (13,)
    if version[0] >= 13:  # noqa: PLR2004 - pg_current_xact_id: 13+
        return _READ_ASSIGNING if assign else _READ
    return _READ_ASSIGNING_BEFORE_13 if assign else _READ_BEFORE_13
