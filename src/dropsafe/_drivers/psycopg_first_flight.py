"""psycopg 3: a transaction's BEGIN sent in the same flight as its first statement.

psycopg sends BEGIN in a round trip of its own: ``BaseConnection._start_query`` runs
``_exec_command(_get_tx_start_command())`` and waits for its reply, and in pipeline mode it
syncs right after it (``_pipeline._sync_gen()``), which waits all the same. Across a WAN that
round trip is most of a one-query request's time. This module gives a connection cursors whose
``execute`` puts the very BEGIN psycopg would send (``_get_tx_start_command()``: isolation
level, read only, deferrable) in a libpq pipeline with the statement and one Sync: a single
flight, as pgjdbc's ``QueryExecutorImpl.sendQueryPreamble`` does. psycopg learns that a
transaction is open from the server's own ReadyForQuery, as always, so its ``commit()`` and
``rollback()`` send COMMIT and ROLLBACK unchanged.

Only where the outcome is the one psycopg's own execute would give (anything else runs
psycopg's own, unchanged): a plain ``execute`` (not executemany, COPY, stream, a server-side
cursor), a connection in no transaction, not in autocommit nor in a pipeline of its own, one
statement whose first word is SELECT, INSERT, UPDATE, DELETE or WITH and with no ``;`` (the
pipeline uses the extended protocol: one statement, never COPY). A failed BEGIN aborts the
pipeline: the statement does not run and the error raised is BEGIN's. Why it is safe and what
it saves: docs/guarantees.md, "BEGIN rides the first statement's flight".
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Generator

__all__ = ["cursor_classes", "install", "rides_first_flight"]

#: The statements that ride: one statement, never COPY, as SQLAlchemy writes DML and queries.
_RIDES = re.compile(r"\s*(?:select|insert|update|delete|with)\b", re.IGNORECASE)
#: libpq's CONNECTION_OK (psycopg.pq.ConnStatus.OK): a connection not lost.
_OK = 0
#: libpq's PGRES_FATAL_ERROR (psycopg.pq.ExecStatus.FATAL_ERROR).
_FATAL_ERROR = 7


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
        if (
            conn._autocommit  # noqa: SLF001
            or conn._pipeline is not None  # noqa: SLF001
            or pgconn.transaction_status != idle
            or pgconn.pipeline_status != pipeline_off
            or cursor.closed
            or not rides_first_flight(query)
        ):
            yield from cursor.plain_execute_gen(query, params, prepare=prepare, binary=binary)
            return
        yield from _begin_with(cursor, base_pipeline(conn), query, params, prepare, binary)

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


def _begin_with(  # noqa: PLR0917 - execute's own arguments
    cursor: Any,  # noqa: ANN401 - a psycopg cursor
    pipeline: Any,  # noqa: ANN401 - psycopg's BasePipeline
    query: str,
    params: Any,  # noqa: ANN401 - psycopg's Params
    prepare: bool | None,
    binary: bool | None,
) -> Generator[Any, Any, None]:
    """``Cursor._execute_gen`` with its transaction's BEGIN in the statement's pipeline.

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
    try:
        # Sent (into libpq's buffer) rather than queued: the status libpq reports is ACTIVE
        # from here, so psycopg's own _start_query below sends no BEGIN of its own.
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
        else:
            for command in pipeline.command_queue:  # into libpq's buffer, all sent at once
                command()
        pgconn.pipeline_sync()
        # BEGIN's, one per queued entry, the Sync's.
        began, *replies, _ = yield from _read_flight(pgconn, 2 + len(pipeline.result_queue))
    finally:
        conn._pipeline = None  # noqa: SLF001
        _leave_pipeline(pgconn)
    # The first error is BEGIN's when BEGIN failed (the statement is then only "aborted").
    _raise_if_failed(began, pgconn)
    if unsent is not None:
        raise unsent
    for queued, results in zip(pipeline.result_queue, replies, strict=True):
        if queued is None:  # a Parse of psycopg's, for a statement prepared from now on
            _raise_if_failed(results, pgconn)
            continue
        owner, prepared = queued
        if prepared:
            conn._prepared.validate(*prepared, results)  # noqa: SLF001
        owner._check_results(results)  # noqa: SLF001
        owner._set_results(results)  # noqa: SLF001
    cursor._last_query = query  # noqa: SLF001
    yield from conn._prepared.maintain_gen(conn)  # noqa: SLF001


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
    if current is psycopg.Cursor:
        native.cursor_factory = classes[0]
    elif current is psycopg.AsyncCursor:
        native.cursor_factory = classes[1]
    else:
        return current in classes
    return True
