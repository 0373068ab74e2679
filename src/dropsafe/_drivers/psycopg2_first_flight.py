"""psycopg2: a transaction's BEGIN sent in the query string of its first statement.

psycopg2 sends BEGIN with ``PQexec`` before a transaction's first statement
(``pq_begin_locked``), a round trip of its own, and keeps its transaction state in C: nothing
of Python's can make it send BEGIN with the statement. In its ``autocommit`` mode it sends no
BEGIN at all, and a query string of several statements runs in one flight and returns the last
one's result (simple protocol): ``BEGIN;`` followed by the statement opens the transaction and
runs the statement in one round trip, and libpq's transaction status (the server's
ReadyForQuery) says that a transaction is open.

So the connections made with this module's class (``connection_factory``, where the app gave
none) are psycopg2's in ``autocommit`` underneath, and this class keeps the transaction status
that psycopg2 would have kept, as psycopg2 keeps it ("in a transaction" from the BEGIN it sends
until ``commit()`` or ``rollback()``, whatever the server says meanwhile: an app's own COMMIT
statement ends the server's transaction, not psycopg2's), read and acted on under a lock of the
connection's, as psycopg2 does under its own:
- a cursor's ``execute`` on a connection in no transaction puts the very BEGIN psycopg2 would
  send (isolation level, read only, deferrable) in front of the statement, on a line of its own
  (a query without a statement gets BEGIN alone; a syntax error, the whole string unrun, BEGIN
  then the query again, alone); ``cursor.query`` reads without it;
  ``executemany``, ``callproc`` and the COPY methods, which psycopg2 runs in C, get BEGIN
  alone first, as psycopg2 sends it;
- ``commit()`` and ``rollback()`` send COMMIT and ROLLBACK where a transaction is open (an
  app's own ``commit()`` on the driver's connection commits, as psycopg2's does);
- ``autocommit``, ``isolation_level``, ``readonly``, ``deferrable`` and ``status`` read as
  psycopg2's would, and are set through psycopg2's own setters (its checks, its errors), with
  the connection put back in psycopg2's own mode for the call: no SQL is sent that psycopg2
  would not send;
- what needs psycopg2's own transaction (a named cursor, a large object, two-phase commit, an
  app's ``autocommit = True``, a cursor factory that is not a cursor class) puts the connection
  back in psycopg2's own mode, until its transaction ends; a named cursor or a large object
  opened inside a transaction this class began makes psycopg2 send its own BEGIN (the server
  answers with a WARNING "there is already a transaction in progress"), one round trip as
  before, bare (with DEFERRABLE in it the server would refuse it after the first query).
Why it is safe and what it saves: docs/guarantees.md, "BEGIN rides the first statement's
flight" (psycopg2).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["connection_class", "uses_first_flight"]

# libpq's PGTransactionStatusType (psycopg2.extensions.TRANSACTION_STATUS_*).
_IDLE = 0
# psycopg2.extensions.STATUS_READY, STATUS_BEGIN.
_STATUS_READY = 1
_STATUS_BEGIN = 2
#: psycopg2's ISOLATION_LEVEL_* values, as its ``isolation_level`` reads them, in BEGIN's words.
_ISOLATION = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}
#: What psycopg2's ``set_session`` takes for "the server's default".
_DEFAULT = "DEFAULT"
#: psycopg2's encoding names: the letters and digits, upper case (``clear_encoding_name``).
_NOT_IN_ENCODING_NAME = re.compile(r"[^A-Za-z0-9]")


def begin_text(characteristics: tuple[object, object, object]) -> str:
    """Return the BEGIN psycopg2 sends for (isolation_level, readonly, deferrable), as read."""
    isolation, readonly, deferrable = characteristics
    text = "BEGIN"
    if isolation in _ISOLATION:
        text += " ISOLATION LEVEL " + _ISOLATION[isolation]
    if readonly is not None:
        text += " READ ONLY" if readonly else " READ WRITE"
    if deferrable is not None:
        text += " DEFERRABLE" if deferrable else " NOT DEFERRABLE"
    return text


def uses_first_flight(native: object) -> bool:
    """Whether ``native`` is a connection of this module's class."""
    cls = connection_class()
    return cls is not None and isinstance(native, cls)


@functools.cache
def connection_class() -> type[Any] | None:  # noqa: C901 - one class, its methods
    """Return psycopg2's connection class that sends BEGIN in the first statement's flight.

    None where psycopg2 lacks what it relies on (the getters and setters of 2.7 and later).
    """
    import psycopg2
    import psycopg2.extensions as ext

    base = ext.connection
    base_cursor = ext.cursor
    needed = ("autocommit", "isolation_level", "readonly", "deferrable", "status", "set_session")
    if not all(hasattr(base, name) for name in needed):
        return None
    autocommit_of = base.autocommit
    isolation_of = base.isolation_level
    readonly_of = base.readonly
    deferrable_of = base.deferrable
    status_of = base.status
    mixed: dict[type[Any], type[Any]] = {}

    class FirstFlightCursor:
        """What every cursor of the connection does before psycopg2's own steps."""

        #: The BEGIN the last ``execute`` put in front of the app's query, as sent.
        _dropsafe_cut = b""

        def execute(self, query: Any, vars: Any = None) -> Any:  # noqa: A002, ANN401 - psycopg2's
            conn = self.connection  # type: ignore[attr-defined]
            # The status read and the query sent under one lock: another thread's COMMIT
            # ending in between would leave the statement outside any transaction.
            lock = conn._dropsafe_lock  # noqa: SLF001
            lock.acquire()
            try:
                cut, sent = b"", query
                if not conn._dropsafe_native and not conn._dropsafe_open:  # noqa: SLF001
                    begin = conn._dropsafe_begin  # noqa: SLF001
                    if type(query) is str and (query[:1].isalpha() or _has_statement(query)):
                        sent = begin + ";\n" + query
                        cut = conn._dropsafe_begin_cut  # noqa: SLF001
                    elif type(query) is bytes and (
                        query[:1].isalpha() or _has_statement(query.decode("latin-1"))
                    ):
                        cut = conn._dropsafe_begin_cut  # noqa: SLF001
                        sent = cut + query
                    elif query:
                        # No statement in it (blanks, comments, semicolons), or psycopg2's
                        # sql.Composable: BEGIN alone, as psycopg2 sends it (and then its
                        # error for a query without a statement).
                        conn._dropsafe_run(begin)  # noqa: SLF001
                    # An empty query: psycopg2 refuses it before its BEGIN.
                self._dropsafe_cut = cut
                if not cut:
                    return super().execute(query, vars)  # type: ignore[misc]
                try:
                    result = super().execute(sent, vars)  # type: ignore[misc]
                except psycopg2.Error as exc:
                    if not _unparsed(conn, exc):
                        # BEGIN ran if a transaction is open (or the connection was lost
                        # after it): psycopg2's status after its own BEGIN.
                        conn._dropsafe_open = conn.get_transaction_status() != _IDLE  # noqa: SLF001
                        raise
                else:
                    conn._dropsafe_open = True  # noqa: SLF001
                    return result
                # The server parses the whole string before it runs any of it: a syntax
                # error anywhere in it left BEGIN unrun, where psycopg2's own BEGIN had opened
                # the transaction that the error then aborts. BEGIN alone, then the query
                # alone, as psycopg2 sends them: its error, its text (nothing of it ran).
                conn._dropsafe_run(conn._dropsafe_begin)  # noqa: SLF001
                self._dropsafe_cut = b""
                return super().execute(query, vars)  # type: ignore[misc]
            finally:
                lock.release()

        @property
        def query(self) -> Any:  # noqa: ANN401 - psycopg2's: bytes or None
            """The query sent, as psycopg2's would read it: without the BEGIN put in front."""
            sent = base_cursor.query.__get__(self)
            cut = self._dropsafe_cut
            if cut and sent is not None and sent.startswith(cut):
                return sent[len(cut) :]
            return sent

        def executemany(self, query: Any, vars_list: Any) -> Any:  # noqa: ANN401 - psycopg2's
            items = iter(vars_list)
            first = next(items, _NOTHING)
            if first is _NOTHING:
                return super().executemany(query, ())  # type: ignore[misc]
            return self._dropsafe_in_transaction(
                super().executemany,  # type: ignore[misc]
                query,
                _chain(first, items),
            )

        def callproc(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            return self._dropsafe_in_transaction(
                super().callproc,  # type: ignore[misc]
                *args,
                **kwargs,
            )

        def copy_from(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            return self._dropsafe_in_transaction(
                super().copy_from,  # type: ignore[misc]
                *args,
                **kwargs,
            )

        def copy_to(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            return self._dropsafe_in_transaction(
                super().copy_to,  # type: ignore[misc]
                *args,
                **kwargs,
            )

        def copy_expert(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            return self._dropsafe_in_transaction(
                super().copy_expert,  # type: ignore[misc]
                *args,
                **kwargs,
            )

        def _dropsafe_in_transaction(
            self,
            run: Callable[..., Any],
            *args: Any,  # noqa: ANN401 - psycopg2's
            **kwargs: Any,  # noqa: ANN401 - psycopg2's
        ) -> Any:  # noqa: ANN401 - psycopg2's
            """``run`` (psycopg2's own, in C) after BEGIN alone where no transaction is open."""
            conn = self.connection  # type: ignore[attr-defined]
            lock = conn._dropsafe_lock  # noqa: SLF001
            lock.acquire()
            try:
                if not conn._dropsafe_native and not conn._dropsafe_open:  # noqa: SLF001
                    conn._dropsafe_run(conn._dropsafe_begin)  # noqa: SLF001
                self._dropsafe_cut = b""
                return run(*args, **kwargs)
            finally:
                lock.release()

    def cursor_class(factory: object) -> type[Any] | None:
        """Return ``factory`` with `FirstFlightCursor` in front of it (made once per class).

        None for a factory that is no subclass of psycopg2's cursor (psycopg2 refuses it, or
        it is a function that makes cursors).
        """
        if not (isinstance(factory, type) and issubclass(factory, base_cursor)):
            return None
        cls = mixed.get(factory)
        if cls is None:
            cls = mixed[factory] = type(factory.__name__, (FirstFlightCursor, factory), {})
            cls.__module__ = __name__
        return cls

    class FirstFlightConnection(base):  # type: ignore[misc, valid-type]
        """psycopg2's connection, its transaction's BEGIN sent with its first statement."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - psycopg2's
            super().__init__(*args, **kwargs)
            #: In psycopg2's own mode: its autocommit, its BEGIN, its commit().
            self._dropsafe_native = False
            #: Never to leave psycopg2's own mode again (a cursor factory of the app's).
            self._dropsafe_for_good = False
            #: In a ``with`` block this class entered (psycopg2's own would send BEGIN).
            self._dropsafe_entered = False
            #: (isolation_level, readonly, deferrable) as psycopg2 would read them; its BEGIN.
            self._dropsafe_characteristics: tuple[object, object, object] = (None, None, None)
            self._dropsafe_begin = "BEGIN"
            #: The same with its line's end, as sent in front of a query (encoded: ASCII).
            self._dropsafe_begin_cut = b"BEGIN;\n"
            #: psycopg2's status (its ``conn->status``), kept outside its own mode: in a
            #: transaction from the BEGIN this class sent until ``commit()`` or ``rollback()``,
            #: whatever libpq says meanwhile (an app's own COMMIT statement ends the server's
            #: transaction, not psycopg2's: the next statements run alone, as psycopg2's).
            self._dropsafe_open = False
            #: In psycopg2's own mode inside a transaction this class began: its
            #: characteristics held back from psycopg2 until it ends (`_dropsafe_to_native`).
            self._dropsafe_unset = False
            #: Held while the transaction status is read and acted on (a query, a COMMIT, a
            #: change of mode): psycopg2 does both under its own lock, in C, out of reach.
            #: threading's at the connect: gevent's or eventlet's where they patched it (a
            #: green thread waits for another's query, never blocking the hub).
            self._dropsafe_lock = threading.RLock()
            autocommit_of.__set__(self, True)  # noqa: FBT003 - a new connection: no SQL sent

        # -- transactions ---------------------------------------------------------------

        def commit(self) -> None:
            if not (self._dropsafe_open or self._dropsafe_native):
                # No transaction, as psycopg2 would read it: its own commit() sends nothing
                # (or raises on a closed connection). Read without the lock, as the pool's
                # reset after every request finds it: once the lock is free, nothing more.
                base.commit(self)
                return
            with self._dropsafe_lock:
                if self._dropsafe_native or self.closed or not self._dropsafe_open:
                    base.commit(self)  # psycopg2's own: its error on a closed connection
                    self._dropsafe_back()
                else:
                    # Even where the app's own SQL ended the transaction (libpq idle):
                    # psycopg2 sends its COMMIT (the server's warning "there is no
                    # transaction in progress").
                    self._dropsafe_run("COMMIT")

        def rollback(self) -> None:
            if not (self._dropsafe_open or self._dropsafe_native):
                base.rollback(self)  # as commit(): nothing to end
                return
            with self._dropsafe_lock:
                if self._dropsafe_native or self.closed or not self._dropsafe_open:
                    base.rollback(self)
                    self._dropsafe_back()
                else:
                    self._dropsafe_run("ROLLBACK")

        def __enter__(self) -> Any:  # noqa: ANN401 - the connection
            # psycopg2's own, in autocommit, would send a BEGIN of its own inside the block.
            if self._dropsafe_native:
                return base.__enter__(self)
            if self.closed:
                raise psycopg2.InterfaceError("connection already closed")
            if self._dropsafe_entered:
                raise psycopg2.ProgrammingError("the connection cannot be re-entered recursively")
            self._dropsafe_entered = True
            return self

        def __exit__(self, kind: object, value: object, traceback: object) -> None:
            if not self._dropsafe_entered:
                base.__exit__(self, kind, value, traceback)
                return
            self._dropsafe_entered = False  # psycopg2's: out, even if the end fails
            if kind is None:
                self.commit()
            else:
                self.rollback()

        @property
        def status(self) -> int:
            if self._dropsafe_native:
                return int(status_of.__get__(self))
            return _STATUS_BEGIN if self._dropsafe_open else _STATUS_READY

        # -- the session's characteristics -------------------------------------------------

        @property
        def autocommit(self) -> bool:
            return bool(self._dropsafe_native and autocommit_of.__get__(self))

        @autocommit.setter
        def autocommit(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: autocommit_of.__set__(self, value))

        @property
        def isolation_level(self) -> object:
            if self._dropsafe_native and not self._dropsafe_unset:
                return isolation_of.__get__(self)
            return self._dropsafe_characteristics[0]

        @isolation_level.setter
        def isolation_level(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: isolation_of.__set__(self, value))

        @property
        def readonly(self) -> object:
            if self._dropsafe_native and not self._dropsafe_unset:
                return readonly_of.__get__(self)
            return self._dropsafe_characteristics[1]

        @readonly.setter
        def readonly(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: readonly_of.__set__(self, value))

        @property
        def deferrable(self) -> object:
            if self._dropsafe_native and not self._dropsafe_unset:
                return deferrable_of.__get__(self)
            return self._dropsafe_characteristics[2]

        @deferrable.setter
        def deferrable(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: deferrable_of.__set__(self, value))

        def set_session(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - psycopg2's
            self._dropsafe_in_own_mode(
                "set_session", lambda: base.set_session(self, *args, **kwargs)
            )

        @_locked
        def set_isolation_level(self, level: object) -> None:
            # psycopg2 rolls back the transaction under way first, whatever the level.
            if not self._dropsafe_native and self._dropsafe_in_transaction():
                self._dropsafe_run("ROLLBACK")
            self._dropsafe_in_own_mode("set_session", lambda: base.set_isolation_level(self, level))

        @_locked
        def set_client_encoding(self, encoding: object) -> None:
            # psycopg2 rolls back the transaction under way first, where the encoding changes.
            if (
                not self._dropsafe_native
                and isinstance(encoding, str)
                and _NOT_IN_ENCODING_NAME.sub("", encoding).upper() != self.encoding
                and self._dropsafe_in_transaction()
            ):
                self._dropsafe_run("ROLLBACK")
            base.set_client_encoding(self, encoding)

        @_locked
        def reset(self) -> None:
            if not self._dropsafe_native and self._dropsafe_in_transaction():
                self._dropsafe_run("ROLLBACK")  # psycopg2's ABORT
            base.reset(self)  # DISCARD ALL; psycopg2's defaults: not in autocommit
            self._dropsafe_native = True
            self._dropsafe_unset = False
            self._dropsafe_back()

        # -- what needs psycopg2's own transaction -----------------------------------------

        def cursor(
            self,
            name: object = None,
            cursor_factory: Any = None,  # noqa: ANN401 - psycopg2's
            withhold: object = False,
            scrollable: object = None,
        ) -> Any:  # noqa: ANN401 - psycopg2's cursor
            if name is None:
                factory = cursor_factory or self.cursor_factory or base_cursor
                cls = mixed.get(factory) or cursor_class(factory)
                if cls is not None:
                    return base.cursor(self, None, cls, withhold, scrollable)
                # A factory that is no cursor class: its cursors cannot send BEGIN, even
                # later, after psycopg2's own transaction: psycopg2's mode for good.
                self._dropsafe_for_good = True
            # A cursor of the class's takes no lock, as psycopg2's takes none: only a change
            # of mode does (another thread's first flight or COMMIT ends first).
            with self._dropsafe_lock:
                if not self._dropsafe_native:
                    self._dropsafe_to_native()
            return base.cursor(self, name, cursor_factory, withhold, scrollable)

        @_locked
        def lobject(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            if not self._dropsafe_native:
                self._dropsafe_to_native()
            return base.lobject(self, *args, **kwargs)

        def tpc_begin(self, xid: object) -> None:
            self._dropsafe_in_own_mode("tpc_begin", lambda: base.tpc_begin(self, xid))

        def tpc_commit(self, *args: Any) -> None:  # noqa: ANN401 - psycopg2's
            self._dropsafe_in_own_mode("tpc_commit", lambda: base.tpc_commit(self, *args))

        def tpc_rollback(self, *args: Any) -> None:  # noqa: ANN401 - psycopg2's
            self._dropsafe_in_own_mode("tpc_rollback", lambda: base.tpc_rollback(self, *args))

        @_locked
        def tpc_recover(self) -> Any:  # noqa: ANN401 - psycopg2's list of Xids
            if self._dropsafe_native or self._dropsafe_in_transaction():
                # In a transaction psycopg2 reads inside it and leaves it open: so does this.
                return base.tpc_recover(self)
            result: list[Any] = []
            self._dropsafe_in_own_mode("tpc_recover", lambda: result.append(base.tpc_recover(self)))
            return result[0]

        # -- this class's own steps ----------------------------------------------------------

        def _dropsafe_run(self, command: str) -> None:
            """Send ``command`` (BEGIN, COMMIT, ROLLBACK) and wait for its reply.

            psycopg2's status follows: in a transaction after a BEGIN that succeeded, out of
            it after a COMMIT or ROLLBACK, even one that failed (psycopg2's ``pq_commit``).
            """
            cursor = base.cursor(self, None, base_cursor)
            beginning = command[:5] == "BEGIN"
            try:
                base_cursor.execute(cursor, command)
            finally:
                cursor.close()
                if not beginning:
                    self._dropsafe_open = False
            if beginning:
                self._dropsafe_open = True

        def _dropsafe_in_transaction(self) -> bool:
            """Whether psycopg2's status would read "in a transaction" (not libpq's)."""
            return self._dropsafe_open and not self.closed

        @_locked
        def _dropsafe_in_own_mode(self, what: str, apply: Callable[[], None]) -> None:
            """Run psycopg2's own ``apply`` in psycopg2's own mode, then come back if it can.

            Outside a transaction only, where this class keeps it (psycopg2 refuses its
            setters and two-phase commit inside one: its own status would not know).
            """
            if not self._dropsafe_native:
                if self._dropsafe_in_transaction():
                    raise psycopg2.ProgrammingError(f"{what} cannot be used inside a transaction")
                self._dropsafe_to_native()
            try:
                apply()
            finally:
                self._dropsafe_back()

        def _dropsafe_to_native(self) -> None:
            """Put the connection in psycopg2's own mode: no SQL is sent.

            psycopg2 sends SET only when it leaves autocommit with characteristics set, or
            sets them in autocommit: here they are its defaults when autocommit goes off, and
            set after.
            """
            if self.closed:
                self._dropsafe_native = True
                return
            autocommit_of.__set__(self, False)  # noqa: FBT003 - a descriptor's
            self._dropsafe_open = False  # psycopg2's own status from now on: ready
            if self._dropsafe_characteristics == (None, None, None):
                pass
            elif self.get_transaction_status() != _IDLE:
                # In a transaction this class began, psycopg2 sends a BEGIN of its own: with
                # DEFERRABLE in it the server refuses it after the first query ("SET
                # TRANSACTION [NOT] DEFERRABLE must be called before any query") and aborts
                # the transaction. A bare BEGIN there (a warning only); psycopg2 gets them
                # when the transaction is over (`_dropsafe_back`).
                self._dropsafe_unset = True
            else:
                self._dropsafe_hand_characteristics()
            self._dropsafe_native = True

        def _dropsafe_hand_characteristics(self) -> None:
            """Give psycopg2 the characteristics this class kept (outside autocommit: no SQL)."""
            isolation, readonly, deferrable = self._dropsafe_characteristics
            base.set_session(
                self,
                isolation_level=_DEFAULT if isolation is None else isolation,
                readonly=_DEFAULT if readonly is None else readonly,
                deferrable=_DEFAULT if deferrable is None else deferrable,
            )

        def _dropsafe_back(self) -> None:
            """Leave psycopg2's own mode where its transaction is over and autocommit off."""
            if (
                not self._dropsafe_native
                or self.closed
                or autocommit_of.__get__(self)
                or status_of.__get__(self) != _STATUS_READY
                or self.get_transaction_status() != _IDLE
            ):
                return
            if self._dropsafe_unset:
                # The characteristics held back from psycopg2's BEGIN inside a transaction
                # this class began: psycopg2's now (outside autocommit: no SQL sent).
                self._dropsafe_unset = False
                self._dropsafe_hand_characteristics()
            if self._dropsafe_for_good:
                return
            characteristics = (
                isolation_of.__get__(self),
                readonly_of.__get__(self),
                deferrable_of.__get__(self),
            )
            if characteristics != (None, None, None):
                base.set_session(
                    self, isolation_level=_DEFAULT, readonly=_DEFAULT, deferrable=_DEFAULT
                )
            autocommit_of.__set__(self, True)  # noqa: FBT003 - a descriptor's
            self._dropsafe_characteristics = characteristics
            self._dropsafe_begin = begin_text(characteristics)
            self._dropsafe_begin_cut = self._dropsafe_begin.encode() + b";\n"
            self._dropsafe_native = False

    FirstFlightConnection.__module__ = __name__
    return FirstFlightConnection


_NOTHING = object()
#: What PostgreSQL's lexer takes for white space.
_BLANKS = frozenset(" \t\n\r\f\v;")
_Method = TypeVar("_Method", bound="Callable[..., Any]")


def _has_statement(query: str) -> bool:
    """Whether ``query`` holds anything but blanks, semicolons and comments (nested ``/*``).

    After ``BEGIN;`` a query without a statement would read as BEGIN's success, where
    psycopg2's own query, sent alone, is refused ("can't execute an empty query").
    """
    at, end = 0, len(query)
    while at < end:
        char = query[at]
        if char in _BLANKS:
            at += 1
        elif query.startswith("--", at):
            at = query.find("\n", at)
            if at < 0:
                return False
        elif query.startswith("/*", at):
            depth, at = 1, at + 2
            while depth:
                opens, closes = query.find("/*", at), query.find("*/", at)
                if closes < 0:
                    return True  # unterminated: the server's error, after BEGIN
                if 0 <= opens < closes:
                    depth, at = depth + 1, opens + 2
                else:
                    depth, at = depth - 1, closes + 2
        else:
            return True
    return False


def _unparsed(conn: Any, exc: Any) -> bool:  # noqa: ANN401 - psycopg2's
    """Whether the query string ``exc`` refused was not run at all: a syntax error, no BEGIN.

    A syntax error (42601) at a position of the string, the connection in no transaction:
    the parser's (a syntax error raised while running, by a function's dynamic SQL, has no
    such position, and BEGIN ran before it).
    """
    return bool(
        exc.pgcode == "42601"
        and not conn.closed
        and conn.get_transaction_status() == _IDLE
        and exc.diag.statement_position is not None
    )


def _locked(method: _Method) -> _Method:
    """Run the connection's ``method`` under its lock (``_dropsafe_lock``)."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the method's
        with self._dropsafe_lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def _chain(first: object, rest: Any) -> Any:  # noqa: ANN401 - an iterator of parameters
    yield first
    yield from rest
