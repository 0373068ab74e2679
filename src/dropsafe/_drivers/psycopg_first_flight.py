"""psycopg 3: a transaction's BEGIN, and the xid read, sent in the flight of a statement.

psycopg sends BEGIN in a round trip of its own: ``BaseConnection._start_query`` runs
``_exec_command(_get_tx_start_command())`` and waits for its reply, and in pipeline mode it
syncs right after it (``_pipeline._sync_gen()``), which waits all the same. Across a WAN that
round trip is most of a one-query request's time. This module gives a connection cursors whose
``execute`` puts the very BEGIN psycopg would send (``_get_tx_start_command()``: isolation
level, read only, deferrable) in a libpq pipeline with the statement and one Sync: a single
flight, as pgjdbc's ``QueryExecutorImpl.sendQueryPreamble`` does. psycopg learns that a
transaction is open from the server's own ReadyForQuery, as always, so its ``commit()`` and
``rollback()`` send COMMIT and ROLLBACK unchanged.

The same cursors read a transaction's xid in a statement's own flight when asked
(`send_reading_xid`, issue 27 item 3): the statement, then ``SELECT <question.after>``, then
the one Sync. The statement's results are read as psycopg reads them; the mark's row is read
after them and never reaches the app. A statement that fails aborts the pipeline: the mark is
skipped and the statement's own error is raised, its transaction failed as before.

Only where the outcome is the one psycopg's own execute would give (anything else runs
psycopg's own, unchanged): a plain ``execute`` (not executemany, COPY, stream, a server-side
cursor), a connection in no transaction (or, with the xid read, in a healthy one), not in
autocommit nor in a pipeline of its own, one statement whose first word is SELECT, INSERT,
UPDATE, DELETE or WITH and with no ``;`` (the pipeline uses the extended protocol: one
statement, never COPY). A failed BEGIN aborts the pipeline: the statement does not run and the
error raised is BEGIN's. Why it is safe and what it saves: docs/guarantees.md, "BEGIN rides the
first statement's flight" and "The xid read in a statement's own flight (psycopg 3)".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

__all__ = ["XidMark", "cursor_classes", "install", "rides_first_flight", "send_reading_xid"]

#: The statements that ride: one statement, never COPY, as SQLAlchemy writes DML and queries.
_RIDES = re.compile(r"\s*(?:select|insert|update|delete|with)\b", re.IGNORECASE)
#: libpq's CONNECTION_OK (psycopg.pq.ConnStatus.OK): a connection not lost.
_OK = 0
#: libpq's PGRES_FATAL_ERROR (psycopg.pq.ExecStatus.FATAL_ERROR).
_FATAL_ERROR = 7
#: libpq's PGRES_TUPLES_OK (psycopg.pq.ExecStatus.TUPLES_OK).
_TUPLES_OK = 2
#: libpq's PQTRANS_INTRANS (psycopg.pq.TransactionStatus.INTRANS): a healthy open transaction.
_INTRANS = 2
#: Where a connection holds the xid read asked for one of its statements (`XidMark`).
_MARK_ATTRIBUTE = "_dropsafe_xid_mark"


@dataclass
class XidMark:
    """The xid read asked for the flight of one statement, and the row it read (text)."""

    #: The very text the app's execute sends: no other statement takes the mark.
    statement: str
    #: ``SELECT <question.after>``, encoded.
    select: bytes
    values: tuple[str | None, ...] | None = None


def send_reading_xid(
    send: Callable[[str], None],
    native: Any,  # noqa: ANN401 - a psycopg connection
    statement: str,
    after: str,
) -> tuple[str | None, ...] | None:
    """Send ``statement`` with ``SELECT <after>`` in its flight; return the row read, or None.

    The mark is left on the connection for the cursor's ``execute`` of that very text, which
    takes it (`execute_gen`); None where the statement went psycopg's own way (a connection
    with cursors of the app's, a statement or a state that does not ride), and nothing read.
    """
    classes = cursor_classes()
    if classes is None or getattr(native, "cursor_factory", None) not in classes:
        send(statement)
        return None
    mark = XidMark(statement, b"SELECT " + after.encode())
    setattr(native, _MARK_ATTRIBUTE, mark)
    try:
        send(statement)
    finally:
        setattr(native, _MARK_ATTRIBUTE, None)
    return mark.values


def _take_mark(conn: Any, query: object, mark: XidMark) -> XidMark | None:  # noqa: ANN401
    """Return (and take off ``conn``) ``mark``, the xid read asked of it, if it is ``query``'s."""
    if mark.statement != query:
        return None
    setattr(conn, _MARK_ATTRIBUTE, None)
    return mark


def rides_first_flight(query: object) -> bool:
    """Whether ``query`` may be sent in a pipeline after BEGIN with the same outcome."""
    return type(query) is str and ";" not in query and _RIDES.match(query) is not None


@functools.cache
def cursor_classes() -> tuple[type[Any], type[Any]] | None:
    """Return cursor classes for psycopg (sync, async) that send BEGIN in the first flight.

    None where psycopg or its libpq cannot (no pipeline mode: libpq before 14), or where
    psycopg's private steps this relies on are not there (a version not tried: 3.3 is).
    """
    import psycopg
    from psycopg import pq

    base_pipeline = _private(psycopg)
    if base_pipeline is None or not psycopg.Pipeline.is_supported():
        return None
    idle = pq.TransactionStatus.IDLE
    pipeline_off = pq.PipelineStatus.OFF

    def execute_gen(
        cursor: Any,  # noqa: ANN401 - a psycopg cursor
        query: Any,  # noqa: ANN401 - psycopg's Query
        params: Any = None,  # noqa: ANN401 - psycopg's Params
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Generator[Any, Any, None]:
        conn = cursor._conn  # noqa: SLF001 - psycopg's own step, run with the lock held
        pgconn = conn.pgconn
        # One attribute read per execute: a call only where a read was asked.
        mark = getattr(conn, _MARK_ATTRIBUTE, None)
        if mark is not None:
            mark = _take_mark(conn, query, mark)
        status = pgconn.transaction_status
        if (
            conn._autocommit  # noqa: SLF001
            or conn._pipeline is not None  # noqa: SLF001
            or not (status == idle or (mark is not None and status == _INTRANS))
            or pgconn.pipeline_status != pipeline_off
            or cursor.closed
            or not rides_first_flight(query)
        ):
            yield from cursor.plain_execute_gen(query, params, prepare=prepare, binary=binary)
            return
        yield from _one_flight(
            cursor, base_pipeline(conn), query, params, prepare, binary, status == idle, mark
        )

    class FirstFlightCursor(psycopg.Cursor):
        """psycopg's Cursor, its transaction's BEGIN sent with its first statement."""

        plain_execute_gen = psycopg.Cursor._execute_gen  # noqa: SLF001
        _execute_gen = execute_gen

    class AsyncFirstFlightCursor(psycopg.AsyncCursor):
        """psycopg's AsyncCursor, its transaction's BEGIN sent with its first statement."""

        plain_execute_gen = psycopg.AsyncCursor._execute_gen  # noqa: SLF001
        _execute_gen = execute_gen

    for cls in (FirstFlightCursor, AsyncFirstFlightCursor):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return FirstFlightCursor, AsyncFirstFlightCursor


def _private(psycopg: Any) -> Any:  # noqa: ANN401 - modules and classes of psycopg's
    """Return BasePipeline if every private step of psycopg used here is where it was."""
    try:
        from psycopg._pipeline_base import BasePipeline
    except ImportError:
        try:
            from psycopg._pipeline import (  # type: ignore[attr-defined,unused-ignore] # 3.1
                BasePipeline,
            )
        except ImportError:
            return None
    needed = {
        psycopg.Cursor: (
            "_execute_gen",
            "_start_query",
            "_convert_query",
            "_maybe_prepare_gen",
            "_check_results",
            "_set_results",  # not in psycopg 3.1 (the lower bound): psycopg's own BEGIN there
        ),
        psycopg.AsyncCursor: ("_execute_gen",),
        psycopg.Connection: ("_get_tx_start_command", "_start_query", "_check_connection_ok"),
        psycopg.generators: ("send", "fetch_many"),
    }
    if all(hasattr(owner, name) for owner, names in needed.items() for name in names):
        return BasePipeline
    return None


def _one_flight(  # noqa: C901, PLR0912, PLR0917 - one function (a helper is a call per first statement); execute's arguments
    cursor: Any,  # noqa: ANN401 - a psycopg cursor
    pipeline: Any,  # noqa: ANN401 - psycopg's BasePipeline
    query: str,
    params: Any,  # noqa: ANN401 - psycopg's Params
    prepare: bool | None,
    binary: bool | None,
    begin: bool,
    mark: XidMark | None,
) -> Generator[Any, Any, None]:
    """``Cursor._execute_gen`` in one flight: [BEGIN,] the statement[, the xid read], Sync.

    psycopg's cursor steps queue the statement on ``pipeline`` (set as the connection's, as
    ``conn.pipeline()`` sets it); the flight is sent and read here, with psycopg's own
    generators, one result set per queued entry as its pipeline reads them.
    """
    conn = cursor._conn  # noqa: SLF001 - psycopg's steps, in the order its own execute runs them
    pgconn = conn.pgconn
    conn._check_connection_ok()  # noqa: SLF001
    pgconn.enter_pipeline_mode()
    conn._pipeline = pipeline  # noqa: SLF001
    unsent: Exception | None = None
    replies: list[list[Any]] = []
    try:
        if begin:
            # Sent (into libpq's buffer) rather than queued: the status libpq reports is
            # ACTIVE from here, so psycopg's own _start_query below sends no BEGIN of its own.
            pgconn.send_query_params(conn._get_tx_start_command(), None)  # noqa: SLF001
        try:
            yield from cursor._start_query(query)  # noqa: SLF001
            pgq = cursor._convert_query(query, params)  # noqa: SLF001
            yield from cursor._maybe_prepare_gen(pgq, prepare=prepare, binary=binary)  # noqa: SLF001
        except Exception as exc:  # noqa: BLE001 - raised below, after BEGIN's reply
            # Nothing of the statement goes; BEGIN does, as psycopg's own runs it before it
            # converts the parameters: the connection is left as psycopg leaves it.
            pipeline.result_queue.clear()
            unsent = exc
            mark = None
        else:
            for command in pipeline.command_queue:  # into libpq's buffer, all sent at once
                command()
            if mark is not None:
                # After the statement: it reads the xid the statement took, and assigns none.
                pgconn.send_query_params(mark.select, None)
        if begin or unsent is None:
            pgconn.pipeline_sync()
            # BEGIN's, one per queued entry, the mark's, the Sync's.
            count = begin + len(pipeline.result_queue) + (mark is not None) + 1
            replies = yield from _read_flight(pgconn, count)
    finally:
        conn._pipeline = None  # noqa: SLF001
        _leave_pipeline(pgconn)
    if begin:
        # The first error is BEGIN's when BEGIN failed (the statement is then only "aborted").
        _raise_if_failed(replies[0], pgconn)
    if unsent is not None:
        raise unsent
    # Each queued entry its results, or their error, as psycopg's pipeline does (inline: this
    # runs at every transaction's first statement).
    queue = pipeline.result_queue
    for queued, results in zip(queue, replies[begin : begin + len(queue)], strict=True):
        if queued is None:  # a Parse of psycopg's, for a statement prepared from now on
            _raise_if_failed(results, pgconn)
            continue
        owner, prepared = queued
        if prepared:
            conn._prepared.validate(*prepared, results)  # noqa: SLF001
        owner._check_results(results)  # noqa: SLF001
        owner._set_results(results)  # noqa: SLF001
    cursor._last_query = query  # noqa: SLF001
    if mark is not None:
        mark.values = _row_of(replies[-2], pgconn)
    yield from conn._prepared.maintain_gen(conn)  # noqa: SLF001


def _row_of(results: list[Any], pgconn: Any) -> tuple[str | None, ...] | None:  # noqa: ANN401
    """Return the xid read's one row as text (None: no row), or raise its error.

    The app's statement succeeded, but its transaction cannot commit: the app must hear it
    now, as if its statement had failed, never later as a COMMIT that says ROLLBACK.
    """
    _raise_if_failed(results, pgconn)
    (result,) = results
    if result.status != _TUPLES_OK or result.ntuples != 1:
        return None
    # One comprehension, not generators: a generator is a call per value (ten a unit).
    return tuple(
        [
            None if (value := result.get_value(0, column)) is None else bytes(value).decode()
            for column in range(result.nfields)
        ]
    )


def _read_flight(pgconn: Any, count: int) -> Generator[Any, Any, list[list[Any]]]:  # noqa: ANN401
    """Send the flight and read ``count`` result sets; on a lost connection, the server's words.

    A server (or a pooler: PgBouncer's "server login has been failing") that answers with an
    error and then closes the connection: that error is raised, not the closed connection's,
    as psycopg's own ``fetch_many`` does when an error came before the connection went.
    """
    generators = _generators()
    replies: list[list[Any]] = []
    try:
        yield from generators.send(pgconn)
        for _ in range(count):
            replies.append((yield from generators.fetch_many(pgconn)))  # noqa: PERF401 - yields
    except _psycopg_errors().DatabaseError:
        for results in replies:
            _raise_if_failed(results, pgconn)
        raise
    return replies


def _leave_pipeline(pgconn: Any) -> None:  # noqa: ANN401 - psycopg's PGconn
    """Leave libpq's pipeline mode; a connection that cannot (replies left unread) is closed.

    Replies are left unread only when the flight was abandoned midway (its wait given up):
    nothing can tell which of them belong to what, so nothing more is sent on it, and the app
    gets psycopg's "the connection is closed" at its next use, which SQLAlchemy takes for a
    lost connection.
    """
    if pgconn.status != _OK or not pgconn.pipeline_status:
        return
    try:
        pgconn.exit_pipeline_mode()
    except Exception:  # noqa: BLE001 - closed, said by its next use
        pgconn.finish()


def _raise_if_failed(results: list[Any], pgconn: Any) -> None:  # noqa: ANN401 - psycopg's
    """Raise the error one queued command's results hold, as psycopg's pipeline does."""
    for result in results:
        if result.status == _FATAL_ERROR:
            raise _psycopg_errors().error_from_result(result, encoding=pgconn._encoding)  # noqa: SLF001


@functools.cache
def _generators() -> Any:  # noqa: ANN401 - psycopg.generators
    import psycopg

    return psycopg.generators


@functools.cache
def _psycopg_errors() -> Any:  # noqa: ANN401 - psycopg.errors
    import psycopg

    return psycopg.errors


def install(native: Any) -> bool:  # noqa: ANN401 - a psycopg connection
    """Give ``native`` the cursors of this module, if it has psycopg's default ones.

    A cursor factory of the app's (``ClientCursor`` behind a pooler, a class of its own) is
    kept, and so are its BEGINs. Returns whether the connection now sends BEGIN in the flight.
    """
    classes = cursor_classes()
    if classes is None:
        return False
    import psycopg  # imported already: ``native`` is one of its connections

    current = getattr(native, "cursor_factory", None)
    setattr(native, _MARK_ATTRIBUTE, None)
    if current is psycopg.Cursor:
        native.cursor_factory = classes[0]
    elif current is psycopg.AsyncCursor:
        native.cursor_factory = classes[1]
    else:
        return current in classes
    return True
