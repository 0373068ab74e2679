"""The pending commit: a unit's xid and backend, read right before its COMMIT.

The engine's ``do_commit`` (`dropsafe._unit.dialect_hooks`) runs after every flush and
``before_commit`` hook, right before the DBAPI COMMIT: there the xid read in a statement's
flight is taken, or else one fixed statement reads the xid (giving one, with
``synchronous_commit`` off, to a transaction on a primary that has none: a NOTIFY takes its xid
only at COMMIT), the backend's pid, the server's life the first time, and the WAL position. A
lost reply is then resolved by that xid (`dropsafe._commit_truth.resolution`). `watch_engine`
puts the unit's hooks on an engine, once per engine. Why each part: docs/guarantees.md ("How it
keeps it", "Why the xid read has a round trip of its own", "Effects at COMMIT without an xid").
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from dropsafe._classify import classify
from dropsafe._commit_truth.pending_commit import PendingCommit, lsn_number
from dropsafe._commit_truth.server_life import (
    UNREADABLE,
    ServerLife,
    known_server_life,
    remember_server_life,
)
from dropsafe._commit_truth.server_sql import ASYNCHRONOUS, UNFLUSHED, mark_statement, one_row
from dropsafe._engine_state import root_engine, state_of
from dropsafe._errors import ConfigurationError
from dropsafe._process import renew_in_child
from dropsafe._unit.dialect_hooks import UnitHooks, hook_dialect
from dropsafe._unit.shapes import (
    refuse_autocommit,
    refuse_autocommit_at_begin,
    refuse_two_phase,
)
from dropsafe._unit.tracker import AttemptTracker, current_attempt

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session

__all__ = [
    "ended_around",
    "on_its_engine",
    "other_connections",
    "watch_engine",
    "watch_engines_of_routing",
]


# Process-wide, not per engine: it also guards the routing Session classes below.
_INSTALL_LOCK = threading.Lock()


def _renew_install_lock() -> None:
    global _INSTALL_LOCK  # noqa: PLW0603 - another thread may hold it at a fork
    _INSTALL_LOCK = threading.Lock()


renew_in_child(_renew_install_lock)


def watch_engine(engine: Engine) -> None:
    """Put the hooks a unit of work needs on ``engine``'s dialect: once per engine.

    One before each COMMIT (it notes the connections an attempt commits and reads the xid
    before each COMMIT of a unit) and the shape refusals of `dropsafe._unit.shapes`
    (`dropsafe._unit.dialect_hooks` says why not SQLAlchemy's events). Idempotent; put there by
    the first unit of work on an engine. Outside a unit of work each costs one call and one
    context-variable read per COMMIT, BEGIN or statement: no decision is made.
    """
    state = state_of(engine)
    if state.recording:
        return
    # On the root engine's dialect: an execution_options() copy shares it (and its state).
    root = root_engine(engine)
    with _INSTALL_LOCK:
        hook_dialect(root.dialect, _HOOKS)
        state.recording = True


# Keyed by Session class, not by engine: a routing Session reaches engines unknown before.
_ROUTING_SESSIONS: weakref.WeakSet[type[Session]] = weakref.WeakSet()


def watch_engines_of_routing(session_class: type[Session]) -> None:
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
    if current_attempt() is not None:
        watch_engine(connection.engine)


def _before_commit(conn: Connection) -> None:
    """Before each COMMIT on a watched engine: the last moment, after every flush and hook.

    A COMMIT the unit's function made itself, on the same connection, is noted too and harmless
    there: once the unit's own COMMIT succeeded, that connection's transaction is gone as well.
    """
    attempt = current_attempt()
    if attempt is None:
        return
    attempt.committing_connections.append(conn)
    if not attempt.armed:
        if _is_the_units(attempt, conn):
            _refuse_own_commit(attempt)
        return  # a connection the function opened itself: outside the unit
    if attempt.marks is not None:  # a later COMMIT of a unit over several connections
        attempt.sent.append(conn)
        return
    if attempt.commits_sent == 0 and attempt.session is not None:
        others = other_connections(attempt.session, conn)
        if others:
            _mark_several(attempt, conn, others)
            return
    if not attempt.read_xid:
        attempt.commits_sent += 1
        return
    pending = _read_in_flight(conn, attempt)  # with the reads it dropped before, if any
    if pending is None:
        pending = _mark(conn, attempt)
        if pending is not None and attempt.earlier:
            pending = dataclasses.replace(pending, earlier=attempt.earlier)
    attempt.pending = _unflushed_if_notifying(attempt, pending)
    attempt.commits_sent += 1  # from here on, the COMMIT may reach the server


def _unflushed_if_notifying(
    attempt: AttemptTracker, pending: PendingCommit | None
) -> PendingCommit | None:
    """Mark ``pending`` unflushed where the unit may notify: its COMMIT may wait for no WAL.

    PostgreSQL flushes a commit record only after WAL the transaction wrote itself
    (``RecordTransactionCommit``: ``wrote_xlog``); an xid is no proof of it. A write that wrote
    none (an UNLOGGED or temporary table, a view's INSTEAD OF trigger that found its row there,
    an xid the read in flight assigned before a statement that then wrote nothing) commits
    asynchronously, and its NOTIFY is delivered before a crash may lose the commit record.
    Neither the mark nor the read in flight can tell (no function says whether a transaction
    wrote WAL), so a unit that may notify is unknown after a crash, never run again (its
    notification heard twice); a unit that notifies nothing runs again as before (a lost
    asynchronous commit that nobody heard of is safe to redo).
    """
    if pending is None or not attempt.notifies or pending.asynchronous or pending.unflushed:
        return pending
    return dataclasses.replace(pending, unflushed=True)


def _read_in_flight(conn: Connection, attempt: AttemptTracker) -> PendingCommit | None:
    """Return the xid read in a writing statement's flight, where it can stand as the mark.

    It stands where it knows what the mark would read: a backend pid (not behind a pooler:
    the engine reads none there) and its server's life (learned at connect, or by an earlier
    mark on the connection). Otherwise, or where nothing was read, the mark reads it.

    Notes the reads the engine dropped in ``attempt.earlier``, before the mark is sent (it may
    fail, or read no xid): a read is dropped where the function ended the server's transaction
    around SQLAlchemy (the DBAPI connection's own ``commit()``, then perhaps a raw write), and
    the one held too when it no longer stands (ended around SQLAlchemy as well). The old
    transaction may have committed part of the unit: it is asked about before a rerun, and with
    a lost COMMIT resolved 'aborted' (`dropsafe._commit_truth.resolution`). The mark alone
    (``read_xid_in_flight`` off) reads nothing before the COMMIT: nothing to ask about.
    """
    state = state_of(conn.engine)
    read_by = state.flight_xid
    if read_by is None:
        return None
    pending = read_by(conn)
    if pending is None:
        attempt.earlier = _dropped_and_held(conn)
        return None
    attempt.earlier = pending.earlier
    if pending.backend_pid == 0 or pending.server_life is UNREADABLE:
        return None
    attempt.server_life = pending.server_life
    return pending


def _ended_before_the_mark(conn: Connection) -> tuple[PendingCommit, ...]:
    """Return the reads of ``conn``'s transaction the function may have ended itself.

    `_read_in_flight`'s note, for each connection of a unit over several (`_mark_several`,
    which reads every mark): the reads dropped, and the one held when it no longer stands.
    """
    read_by = state_of(conn.engine).flight_xid
    if read_by is None:
        return ()
    standing = read_by(conn)
    return _dropped_and_held(conn) if standing is None else standing.earlier


def on_its_engine(reads: tuple[PendingCommit, ...], conn: Connection) -> tuple[PendingCommit, ...]:
    """Return ``reads`` marked with ``conn``'s engine: asked about on its own server.

    In a unit over several engines, a transaction the function ended itself on one of them is
    asked about there, not on the unit's own engine (`PendingCommit.engine_ref`).
    """
    if not reads:
        return reads
    ref = weakref.ref(conn.engine)
    return tuple(dataclasses.replace(read, engine_ref=ref) for read in reads)


def _dropped_and_held(conn: Connection) -> tuple[PendingCommit, ...]:
    """Return the reads ``conn``'s transaction dropped, and the one it holds (not standing)."""
    dropped_by = state_of(conn.engine).flight_dropped
    if dropped_by is None:
        return ()
    dropped, held = dropped_by(conn)
    return dropped if held is None else (*dropped, held)


def ended_around(conn: Connection, error: BaseException) -> tuple[PendingCommit, ...]:
    """Return the xids of ``conn``'s transaction the function may have committed itself.

    For a unit's function that raised: the reads dropped (the server's transaction ended
    around SQLAlchemy since), and the read held where it may have ended so too: where the
    error is the driver's own, not SQLAlchemy's (raised by the DBAPI connection's ``commit()``,
    a raw cursor: around SQLAlchemy; the function's own COMMIT may have been lost after it
    committed), or where the connection is alive and the read no longer stands (a unit over
    several engines: another connection raised; or a retryable error after the app's own
    ``commit()``). Not on a connection that failed a statement through SQLAlchemy (it is
    invalidated, its read cannot be checked): nothing of the app's own may have committed there
    since its last read (a unit's COMMIT through SQLAlchemy is refused).
    """
    state = state_of(conn.engine)
    dropped_by = state.flight_dropped
    if dropped_by is None:
        return ()
    try:
        dropped, held = dropped_by(conn)
    except Exception:  # noqa: BLE001 - a connection SQLAlchemy closed: nothing to ask
        return ()
    if held is None:
        return dropped
    if not isinstance(error, sa_exc.StatementError):
        return (*dropped, held)
    if conn.invalidated:
        return dropped
    read_by = state.flight_xid
    try:
        stands = read_by is not None and read_by(conn) is not None
    except Exception:  # noqa: BLE001 - a state that cannot be read: asked about
        stands = False
    return dropped if stands else (*dropped, held)


def _mark(
    conn: Connection, attempt: AttemptTracker, *, committing: bool = True
) -> PendingCommit | None:
    """Read ``conn``'s xid and backend (and its server's life the first time); None: no xid.

    Read inside ``do_commit`` (`dropsafe._unit.dialect_hooks`): on the ``committing``
    connection a failure is raised as the driver raised it, and SQLAlchemy's handling of a
    failed COMMIT judges it once (a disconnect invalidates the connection; ``handle_error``
    listeners see it once, as the COMMIT's, with no statement). Another connection of the unit
    judges its own first; the committing one's handling then sees it again, wrapped.
    """
    fairy = conn.connection
    driver_connection = fairy.driver_connection
    state = state_of(conn.engine)
    server_life = known_server_life(state, driver_connection)
    with_life = server_life is None
    with_wal = state.wal_readable
    statement = mark_statement(conn.dialect, with_life=with_life, with_wal=with_wal)
    try:
        row = one_row(fairy, statement)  # one row, always: a SELECT without FROM
    except Exception as exc:  # SQLAlchemy's handling raises it again (wrapped)
        if server_life is None or (with_wal and not classify(exc).retryable):
            # Perhaps this server hides the life's functions or the WAL position (another
            # host of the engine): then its next connections read them on their own, where
            # failing costs nothing.
            with state.lock:
                state.lives_answered = state.wal_readable = False
        if committing:
            raise
        conn._handle_dbapi_exception(exc, statement, (), None, None)  # noqa: SLF001
    if server_life is None:
        server_life = ServerLife.read(row[2], row[3])
        remember_server_life(state, driver_connection, server_life)
    attempt.server_life = server_life
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


def _mark_several(attempt: AttemptTracker, conn: Connection, others: list[Connection]) -> None:
    """Before the first COMMIT of a unit over several connections: mark them all, or refuse.

    SQLAlchemy commits a Session's connections one after another, in no set order. When at
    most one of them wrote, that one's COMMIT is resolved as a single engine's would be, and
    a lost COMMIT on the others is harmless. When two wrote, no resolution can make the unit
    whole (one may commit and the other not): refused here, before any COMMIT is sent, so that
    SQLAlchemy rolls them all back. Always read, even with ``verify_commits`` off: without the
    marks, a partial commit could be retried whole.
    """
    connections = (conn, *others)
    earlier: list[PendingCommit] = []
    for connection in connections:  # all noted before any mark is sent: one may fail
        watch_engine(connection.engine)  # its COMMIT must be seen too
        earlier += on_its_engine(_ended_before_the_mark(connection), connection)
    attempt.earlier = tuple(earlier)
    marks: dict[Connection, PendingCommit | None] = {}
    for connection in connections:
        marks[connection] = _mark(connection, attempt, committing=connection is conn)
    # A transaction that had no xid before its mark (`PendingCommit.asynchronous`) wrote
    # nothing: only a NOTIFY it queued could be lost with its COMMIT (docs/guarantees.md).
    writers = [
        (connection, pending)
        for connection, pending in marks.items()
        if pending is not None and not pending.asynchronous
    ]
    if len(writers) > 1:
        names = ", ".join(
            sorted({w.engine.url.render_as_string(hide_password=True) for w, _ in writers})
        )
        attempt.refusal = ConfigurationError(
            f"the unit of work wrote through {len(writers)} connections ({names}); their "
            "COMMITs cannot be made all-or-nothing, nor retried whole, without two-phase "
            "commit, so nothing was committed. Run one unit of work per engine instead "
            "(one run_transaction call each; see docs/guarantees.md)"
        )
        raise attempt.refusal
    attempt.marks = marks
    if writers:
        writer, pending = writers[0]
        attempt.writer = writer
        attempt.pending = _unflushed_if_notifying(
            attempt, dataclasses.replace(pending, engine_ref=weakref.ref(writer.engine))
        )
    attempt.sent.append(conn)
    attempt.commits_sent += 1


def _is_the_units(attempt: AttemptTracker, conn: Connection) -> bool:
    """Whether ``conn`` is one of the unit's connections (not one the function opened)."""
    if conn is attempt.connection:
        return True
    session = attempt.session
    transaction = session.get_transaction() if session is not None else None
    if transaction is None:
        return False
    connections = transaction._connections  # noqa: SLF001 - no public way to list them
    return any(connection is conn for connection, *_ in connections.values())


def _unit_connection_of(checkout: object) -> Connection | None:
    """Return the current unit's Connection on pool ``checkout``, or None (`dialect_hooks`)."""
    attempt = current_attempt()
    if attempt is None:
        return None
    session = attempt.session
    others = other_connections(session) if session is not None else []
    for connection in (attempt.connection, *others):
        if connection is not None and _runs_on(connection, checkout):
            return connection
    return None


def _runs_on(connection: Connection, checkout: object) -> bool:
    try:
        return connection.connection is checkout
    except Exception:  # noqa: BLE001 - closed or invalidated: not the one committing
        return False


def _refuse_own_commit(attempt: AttemptTracker) -> None:
    """Raise for a COMMIT that the unit sends itself, before it is sent.

    Autobegin opens the next transaction at once, so the unit goes on; if its final COMMIT
    were then lost and the unit retried, the part before its own COMMIT would be written twice.
    """
    attempt.refusal = ConfigurationError(
        "the unit of work committed its own transaction (session.commit() or "
        "connection.commit() inside the function); retried after a failure, the part before "
        "that COMMIT would be written twice, so it was rolled back. Leave the COMMIT to "
        "run_transaction: use session.flush() to send statements early, begin_nested() for a "
        "savepoint, or split the work into two units of work"
    )
    raise attempt.refusal


_HOOKS = UnitHooks(
    current=current_attempt,
    at_begin=refuse_autocommit_at_begin,
    at_begin_twophase=refuse_two_phase,
    before_statement=refuse_autocommit,
    before_commit=_before_commit,
    connection_of=_unit_connection_of,
)
