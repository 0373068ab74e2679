"""The pending commit: a unit of work's xid and backend, read right before its COMMIT.

SQLAlchemy's engine-level ``commit`` event fires after every flush and every ``before_commit``
listener, right before the DBAPI COMMIT. There, a unit of work reads its transaction's xid and
its backend's pid in one round trip (and, on a connection's first mark, its server's life: see
`dropsafe._unit.server_life`). The read goes through the DBAPI cursor, one fixed string per case: no
statement compilation, no result machinery; a failure still passes through SQLAlchemy's error
handling (the connection invalidated on a disconnect, the error wrapped), as a statement's would.

The same statement reads the server's WAL insert position (on engines whose server answered it
at the first read of its life), a lower bound of the commit record's LSN, which
`dropsafe._unit.failover_audit` compares with a promoted standby's fork point.

A transaction that wrote has an xid. One that did not may still have an effect at COMMIT:
``NOTIFY`` (spelled in a statement, or queued by a function or a trigger) takes its xid only
there, and nothing a client can read shows that a notification is queued. So the mark gives
every transaction on a primary an xid: one that has none yet gets one with
``synchronous_commit`` off for that transaction only (``set_config(..., true)``): its COMMIT
writes a commit record but waits for no WAL flush and no standby (PostgreSQL would not flush
it anyway: it wrote nothing before), so a read-only unit pays no flush; after a crash such an
xid is unknown, never "aborted" (a listener may have heard it before the crash).
A standby assigns no xid (and refuses NOTIFY): there the transaction has none and may run
again. If the COMMIT's reply is lost, `dropsafe._unit.resolution` asks the server what became of
this xid. Why the read is not sent in the same flight as COMMIT: docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import event

from dropsafe._classify import classify
from dropsafe._engine_state import root_engine, state_of
from dropsafe._errors import ConfigurationError
from dropsafe._process import renew_in_child
from dropsafe._unit.server_life import ServerLife, known_server_life, remember_server_life
from dropsafe._unit.server_sql import ASYNCHRONOUS, UNFLUSHED, mark_statement, one_row

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session

__all__ = [
    "CommitRecorder",
    "PendingCommit",
    "lsn_number",
    "other_connections",
    "record_commits",
    "record_commits_of_routing",
    "recording",
]


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
    #: The engine it went through, when not the unit's own (a unit over several engines):
    #: a weak reference, since the failover audit keeps pending commits per engine.
    engine_ref: weakref.ref[Engine] | None = field(default=None, compare=False, repr=False)
    asynchronous: bool = False
    #: The transaction had its xid and commits with ``synchronous_commit`` off: its commit
    #: record may be lost in a crash after listeners heard its NOTIFYs
    #: (`dropsafe._unit.resolution`).
    unflushed: bool = False


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
        #: The unit's first connection, and its Session (None: a Connection unit).
        self.connection: Connection | None = None
        self.session: Session | None = None
        #: A unit over several connections (None: one): every connection's mark, read before
        #: the first COMMIT; at most one of them wrote (``writer``).
        self.marks: dict[Connection, PendingCommit | None] | None = None
        self.writer: Connection | None = None
        #: The connections whose COMMIT was sent, in order (only for several connections).
        self.sent: list[Connection] = []
        #: The unit's own COMMIT, refused by the listener: raised again after the function
        #: returns, in case it caught the error.
        self.refusal: ConfigurationError | None = None

    def writer_committed(self) -> bool:
        """Whether the writing connection's COMMIT succeeded: another was sent after it.

        SQLAlchemy commits a Session's connections one after another, so a COMMIT sent after
        the writer's means that the writer's returned.
        """
        writer = self.writer
        return writer is not None and writer in self.sent and self.sent[-1] is not writer

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


# Process-wide, not per engine: it also guards the routing Session classes below.
_INSTALL_LOCK = threading.Lock()


def _renew_install_lock() -> None:
    global _INSTALL_LOCK  # noqa: PLW0603 - another thread may hold it at a fork
    _INSTALL_LOCK = threading.Lock()


renew_in_child(_renew_install_lock)


def record_commits(engine: Engine) -> None:
    """Install the listener that reads the xid before each COMMIT of a unit of work.

    Idempotent; installed by the first unit of work on an engine, never by `harden` (an engine
    that runs none keeps SQLAlchemy's event-free fast path). Outside a unit of work it costs
    one context-variable read per COMMIT; statements pay nothing (no per-statement listener:
    every transaction gets its xid in the mark, whatever its statements say).
    """
    state = state_of(engine)
    if state.recording:  # event.contains costs more than a unit's own work
        return
    # On the root engine: an execution_options() copy shares its events (and its state).
    root = root_engine(engine)
    with _INSTALL_LOCK:
        if not event.contains(root, "commit", _read_before_commit):
            event.listen(root, "commit", _read_before_commit)
        state.recording = True


# Keyed by Session class, not by engine: a routing Session reaches engines unknown before.
_ROUTING_SESSIONS: weakref.WeakSet[type[Session]] = weakref.WeakSet()


def record_commits_of_routing(session_class: type[Session]) -> None:
    """Install the listeners on each engine a routing Session (its own ``get_bind``) begins.

    Such a session may reach an engine that is neither its bind nor in its binds for the first
    time in the flush at COMMIT, and SQLAlchemy may send that connection's COMMIT first: the
    engine must be recorded when its connection begins. Sessions with SQLAlchemy's own
    ``get_bind`` reach only engines known before (the sessionmaker's bind and binds, and those
    the function used): they pay nothing.
    """
    if session_class in _ROUTING_SESSIONS:
        return
    with _INSTALL_LOCK:
        if not event.contains(session_class, "after_begin", _session_began):
            event.listen(session_class, "after_begin", _session_began)
        _ROUTING_SESSIONS.add(session_class)


def _session_began(session: Session, transaction: object, connection: Connection) -> None:
    del session, transaction
    if _RECORDER.get() is not None:
        record_commits(connection.engine)


def _read_before_commit(conn: Connection) -> None:
    """Engine ``commit`` listener: the last moment before COMMIT, after every flush and hook."""
    recorder = _RECORDER.get()
    if recorder is None:
        return
    if not recorder.armed:
        if _is_the_units(recorder, conn):
            _refuse_own_commit(recorder)
        return  # a connection the function opened itself: outside the unit
    if recorder.marks is not None:  # a later COMMIT of a unit over several connections
        recorder.sent.append(conn)
        return
    if recorder.commits_sent == 0 and recorder.session is not None:
        others = other_connections(recorder.session, conn)
        if others:
            _mark_several(recorder, conn, others)
            return
    if not recorder.read_xid:
        recorder.commits_sent += 1
        return
    recorder.pending = _mark(conn, recorder)
    recorder.commits_sent += 1  # from here on, the COMMIT may reach the server


def _mark(conn: Connection, recorder: CommitRecorder) -> PendingCommit | None:
    """Read ``conn``'s xid and backend (and its server's life the first time); None: no xid."""
    fairy = conn.connection
    driver_connection = fairy.driver_connection
    state = state_of(conn.engine)
    server_life = known_server_life(state, driver_connection)
    with_life = server_life is None
    with_wal = state.wal_readable
    statement = mark_statement(conn.dialect, with_life=with_life, with_wal=with_wal)
    try:
        row = one_row(fairy, statement)  # one row, always: a SELECT without FROM
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's handling re-raises it (wrapped)
        if server_life is None or (with_wal and not classify(exc).retryable):
            # Perhaps this server hides the life's functions or the WAL position (another
            # host of the engine): then its next connections read them on their own, where
            # failing costs nothing.
            with state.lock:
                state.lives_answered = state.wal_readable = False
        conn._handle_dbapi_exception(exc, statement, (), None, None)  # noqa: SLF001
    if server_life is None:
        server_life = ServerLife.read(row[2], row[3])
        remember_server_life(state, driver_connection, server_life)
    recorder.server_life = server_life
    # No xid: the transaction wrote nothing, and running it again is harmless.
    return (
        None
        if row[0] is None
        else PendingCommit(
            int(str(row[0]).split(" ", 1)[0]),
            int(row[1]),
            server_life,
            lsn_number(row[-1]) if with_wal else 0,
            asynchronous=str(row[0]).endswith(ASYNCHRONOUS),
            unflushed=str(row[0]).endswith(UNFLUSHED),
        )
    )


def other_connections(session: Session, conn: Connection | None = None) -> list[Connection]:
    """Return the connections of ``session``'s transaction other than ``conn``; no I/O.

    Empty when there is only one: the unit's own (the sessionmaker's bind, begun first), or
    ``conn``. One connection is two keys of SQLAlchemy's map (the engine and the
    connection): a unit on one engine pays one ``len`` here.
    """
    transaction = session.get_transaction()
    if transaction is None:
        return []
    connections = transaction._connections  # noqa: SLF001 - no public way to list them
    if len(connections) <= 2:  # noqa: PLR2004 - one connection (the unit's own), two keys
        return []
    seen: list[Connection] = []
    for connection, *_ in connections.values():
        if connection is not conn and connection not in seen:
            seen.append(connection)
    return seen


def _mark_several(recorder: CommitRecorder, conn: Connection, others: list[Connection]) -> None:
    """Before the first COMMIT of a unit over several connections: mark them all, or refuse.

    SQLAlchemy commits a Session's connections one after another, in no set order. When at
    most one of them wrote, that one's COMMIT is resolved as a single engine's would be, and
    a lost COMMIT on the others is harmless. When two wrote, no resolution can make the unit
    whole (one may commit and the other not): refused here, before any COMMIT is sent, so that
    SQLAlchemy rolls them all back. Always read, even with ``verify_commits`` off: without the
    marks, a partial commit could be retried whole.
    """
    marks: dict[Connection, PendingCommit | None] = {}
    for connection in (conn, *others):
        record_commits(connection.engine)  # its COMMIT must be seen too
        marks[connection] = _mark(connection, recorder)
    # A transaction that had no xid before its mark (`PendingCommit.asynchronous`) wrote
    # nothing: only a NOTIFY it queued could be lost with its COMMIT (docs/guarantees.md).
    writers = [
        connection
        for connection, pending in marks.items()
        if pending is not None and not pending.asynchronous
    ]
    if len(writers) > 1:
        names = ", ".join(
            sorted({w.engine.url.render_as_string(hide_password=True) for w in writers})
        )
        recorder.refusal = ConfigurationError(
            f"the unit of work wrote through {len(writers)} connections ({names}); their "
            "COMMITs cannot be made all-or-nothing, nor retried whole, without two-phase "
            "commit, so nothing was committed. Run one unit of work per engine instead "
            "(one run_transaction call each; see docs/guarantees.md)"
        )
        raise recorder.refusal
    recorder.marks = marks
    if writers:
        recorder.writer = writers[0]
        pending = marks[writers[0]]
        assert pending is not None  # noqa: S101 - for the type checker
        recorder.pending = dataclasses.replace(pending, engine_ref=weakref.ref(writers[0].engine))
    recorder.sent.append(conn)
    recorder.commits_sent += 1


def _is_the_units(recorder: CommitRecorder, conn: Connection) -> bool:
    """Whether ``conn`` is one of the unit's connections (not one the function opened)."""
    if conn is recorder.connection:
        return True
    session = recorder.session
    transaction = session.get_transaction() if session is not None else None
    if transaction is None:
        return False
    connections = transaction._connections  # noqa: SLF001 - no public way to list them
    return any(connection is conn for connection, *_ in connections.values())


def _refuse_own_commit(recorder: CommitRecorder) -> None:
    """Raise for a COMMIT that the unit sends itself, before it is sent.

    Autobegin opens the next transaction at once, so the unit goes on; if its final COMMIT
    were then lost and the unit retried, the part before its own COMMIT would be written twice.
    """
    recorder.refusal = ConfigurationError(
        "the unit of work committed its own transaction (session.commit() or "
        "connection.commit() inside the function); retried after a failure, the part before "
        "that COMMIT would be written twice, so it was rolled back. Leave the COMMIT to "
        "run_transaction: use session.flush() to send statements early, begin_nested() for a "
        "savepoint, or split the work into two units of work"
    )
    raise recorder.refusal


def lsn_number(text: object) -> int:
    """Return a ``pg_lsn`` read as text (``16/B374D848``) as a number; 0 for None."""
    if text is None:
        return 0
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)
