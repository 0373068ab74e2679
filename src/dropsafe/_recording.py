"""The pending commit: a unit of work's xid and backend, read right before its COMMIT.

SQLAlchemy's engine-level ``commit`` event fires after every flush and every ``before_commit``
listener, right before the DBAPI COMMIT. There, a unit of work reads its transaction's xid and
its backend's pid in one round trip (and, on a connection's first mark, its server's life: see
`dropsafe._server_life`). The read goes through the DBAPI cursor, one fixed string per case: no
statement compilation, no result machinery; a failure still passes through SQLAlchemy's error
handling (the connection invalidated on a disconnect, the error wrapped), as a statement's would.

The same statement reads the server's WAL insert position (on engines whose server answered it
at the first read of its life), a lower bound of the commit record's LSN, which
`dropsafe._failover_audit` compares with a promoted standby's fork point.

A transaction that wrote has an xid. One that did not may still have an effect at COMMIT:
``NOTIFY`` (spelled in a statement, or queued by a function or a trigger) takes its xid only
there, and nothing a client can read shows that a notification is queued. So the mark gives
every transaction on a primary an xid: one that has none yet gets one with
``synchronous_commit`` off for that transaction only (``set_config(..., true)``): its COMMIT
writes a commit record but waits for no WAL flush and no standby (PostgreSQL would not flush
it anyway: it wrote nothing before), so a read-only unit pays no flush; after a crash such an
xid is unknown, never "aborted" (a listener may have heard it before the crash).
A standby assigns no xid (and refuses NOTIFY): there the transaction has none and may run
again. If the COMMIT's reply is lost, `dropsafe._resolution` asks the server what became of
this xid. Why the read is not sent in the same flight as COMMIT: docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from dropsafe._classify import classify
from dropsafe._server_life import (
    SERVER_LIFE_SQL,
    WAL_POSITION_SQL,
    ServerLife,
    doubt_server_life,
    remember_server_life,
    server_life_of,
    wal_position_readable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection, Dialect, Engine

__all__ = ["CommitRecorder", "PendingCommit", "lsn_number", "record_commits", "recording"]

#: What follows an xid that the mark assigned with ``synchronous_commit`` off.
_ASYNCHRONOUS = " async"


def _xid_expression(modern: bool) -> str:
    """Return the mark's first column: the xid as text, assigning one where there is none.

    The xid already assigned (the transaction wrote: its COMMIT flushes), or on a primary a new
    one, marked `_ASYNCHRONOUS`: PostgreSQL flushes no commit record of a transaction that
    wrote no WAL before it (``RecordTransactionCommit``), and ``synchronous_commit`` off makes
    that hold too for one that wrote WAL without an xid (a read that pruned a page). A NOTIFY's
    COMMIT in a transaction that wrote nothing else never waited for a flush either. (CASE
    evaluates lazily: a standby never assigns.)
    """
    current = "pg_current_xact_id" if modern else "txid_current"
    assigned = f"{current}_if_assigned()"
    return (
        f"CASE WHEN {assigned} IS NOT NULL THEN {assigned}::text "
        "WHEN pg_is_in_recovery() THEN NULL "
        "WHEN set_config('synchronous_commit', 'off', true) = 'off' "
        f"THEN {current}()::text || '{_ASYNCHRONOUS}' END"
    )


# The backend's pid is read in the mark, not once per connection: behind a transaction-mode
# pooler each transaction may run on another backend, and the resolver fences that one.
# The mark's statements, built once: [PostgreSQL 13+][read the server's life]
# [read the WAL insert position: a lower bound of the commit record's LSN, which
# `dropsafe._failover_audit` compares with a promoted standby's fork point; only on engines
# whose server answered it before]. (xid8 functions arrived in PostgreSQL 13; txid_* before.)
_READS = {
    (modern, with_life, with_wal): (
        f"SELECT {_xid_expression(modern)}, pg_backend_pid()"
        + (f", {SERVER_LIFE_SQL}" if with_life else "")
        + (f", {WAL_POSITION_SQL}" if with_wal else "")
    )
    for modern in (True, False)
    for with_life in (True, False)
    for with_wal in (True, False)
}


@dataclass(frozen=True)
class PendingCommit:
    """A COMMIT that was about to be sent: its xid, its backend and its server's life.

    ``wal_lsn`` is the server's WAL insert position read in the same statement, as a number
    (0: not read): the commit record lies at or after it. ``asynchronous``: the mark assigned
    the xid with ``synchronous_commit`` off (the transaction had none: it wrote nothing).
    """

    xid: int
    backend_pid: int
    server_life: ServerLife
    wal_lsn: int = 0
    asynchronous: bool = False


class CommitRecorder:
    """What one attempt of a unit of work learned about its COMMIT, filled in by listeners."""

    def __init__(self) -> None:
        #: The last COMMIT's xid and backend; None when that transaction wrote nothing.
        self.pending: PendingCommit | None = None
        #: COMMITs sent (or about to be) while armed: more than one cannot be retried whole.
        self.commits_sent = 0
        #: Whether to read the xid (``UnitPolicy.verify_commits``); COMMITs are counted anyway.
        self.read_xid = True
        #: The life of the server the last COMMIT went to (None: not read).
        self.server_life: ServerLife | None = None
        self.armed = False

    def committing(self) -> CommitRecorder:
        """Record the COMMITs sent inside this ``with`` block (the unit's own, not the user's).

        The recorder is its own context manager: a generator-based one costs a few
        microseconds per unit of work.
        """
        self.armed = True
        return self

    def __enter__(self) -> None:
        self.armed = True

    def __exit__(self, *exc_info: object) -> None:
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


_RECORDING_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_INSTALL_LOCK = threading.Lock()


def record_commits(engine: Engine) -> None:
    """Install the listener that reads the xid before each COMMIT of a unit of work.

    Idempotent; installed by the first unit of work on an engine, never by `harden` (an engine
    that runs none keeps SQLAlchemy's event-free fast path). Outside a unit of work it costs
    one context-variable read per COMMIT; statements pay nothing (no per-statement listener:
    every transaction gets its xid in the mark, whatever its statements say).
    """
    if engine in _RECORDING_ENGINES:  # event.contains costs more than a unit's own work
        return
    with _INSTALL_LOCK:
        if not event.contains(engine, "commit", _read_before_commit):
            event.listen(engine, "commit", _read_before_commit)
        _RECORDING_ENGINES.add(engine)


def _read_before_commit(conn: Connection) -> None:
    """Engine ``commit`` listener: the last moment before COMMIT, after every flush and hook."""
    recorder = _RECORDER.get()
    if recorder is None or not recorder.armed:
        return
    if not recorder.read_xid:
        recorder.commits_sent += 1
        return
    fairy = conn.connection
    driver_connection = fairy.driver_connection
    server_life = server_life_of(driver_connection)
    with_life = server_life is None
    with_wal = wal_position_readable(conn.engine)
    statement = _read_statement(conn.dialect, with_life=with_life, with_wal=with_wal)
    cursor: Any = None
    row: Any = None  # one row, always: a SELECT without FROM
    try:
        cursor = fairy.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(statement)
        row = cursor.fetchone()
        cursor.close()
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's handling re-raises it (wrapped)
        if server_life is None or (with_wal and not classify(exc).retryable):
            # Perhaps this server hides the life's functions or the WAL position (another
            # host of the engine): then its next connections read them on their own, where
            # failing costs nothing.
            doubt_server_life(conn.engine)
        conn._handle_dbapi_exception(exc, statement, (), cursor, None)  # noqa: SLF001
    if server_life is None:
        server_life = ServerLife.read(row[2], row[3])
        remember_server_life(conn.engine, driver_connection, server_life)
    recorder.server_life = server_life
    # No xid: a standby's transaction (it assigns none), which wrote nothing: run it again.
    recorder.pending = (
        None
        if row[0] is None
        else PendingCommit(
            int(str(row[0]).removesuffix(_ASYNCHRONOUS)),
            int(row[1]),
            server_life,
            lsn_number(row[-1]) if with_wal else 0,
            asynchronous=str(row[0]).endswith(_ASYNCHRONOUS),
        )
    )
    recorder.commits_sent += 1  # from here on, the COMMIT may reach the server


def lsn_number(text: object) -> int:
    """Return a ``pg_lsn`` read as text (``16/B374D848``) as a number; 0 for None."""
    if text is None:
        return 0
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def _read_statement(dialect: Dialect, *, with_life: bool, with_wal: bool) -> str:
    version: tuple[int, ...] = getattr(dialect, "server_version_info", None) or (13,)
    return _READS[version[0] >= 13, with_life, with_wal]  # noqa: PLR2004 - pg_current_xact_id: 13+
