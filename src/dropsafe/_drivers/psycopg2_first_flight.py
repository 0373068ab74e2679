"""psycopg2: a transaction's BEGIN sent in the query string of its first statement.

psycopg2 sends BEGIN with ``PQexec`` before a transaction's first statement
(``pq_begin_locked``), a round trip of its own, and keeps its transaction state in C: nothing
of Python's can make it send BEGIN with the statement. In its ``autocommit`` mode it sends no
BEGIN at all, and a query string of several statements runs in one flight and returns the last
one's result (simple protocol): ``BEGIN;`` followed by the statement opens the transaction and
runs the statement in one round trip, and libpq's transaction status (the server's
ReadyForQuery) says that a transaction is open.

So the connections made with this module's class (``connection_factory``, where the app gave
none) are psycopg2's in ``autocommit`` underneath, and this class keeps the transaction that
psycopg2 would have kept, from libpq's transaction status:
- a cursor's ``execute`` on a connection in no transaction puts the very BEGIN psycopg2 would
  send (isolation level, read only, deferrable) in front of the statement, on a line of its own;
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
  before.
Why it is safe and what it saves: docs/guarantees.md, "BEGIN rides the first statement's
flight" (psycopg2).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["connection_class", "uses_first_flight"]

# libpq's PGTransactionStatusType (psycopg2.extensions.TRANSACTION_STATUS_*).
_IDLE = 0
_UNKNOWN = 4
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
        """What every cursor of the connection does before psycopg2's own steps.

        `cursor_class` gives each class its own ``execute``, which calls the next class's
        directly (a ``super()`` call less at every statement).
        """

        def executemany(self, query: Any, vars_list: Any) -> Any:  # noqa: ANN401 - psycopg2's
            items = iter(vars_list)
            first = next(items, _NOTHING)
            if first is _NOTHING:
                return super().executemany(query, ())  # type: ignore[misc]
            self._dropsafe_begin_if_idle()
            return super().executemany(query, _chain(first, items))  # type: ignore[misc]

        def callproc(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            self._dropsafe_begin_if_idle()
            return super().callproc(*args, **kwargs)  # type: ignore[misc]

        def copy_from(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            self._dropsafe_begin_if_idle()
            return super().copy_from(*args, **kwargs)  # type: ignore[misc]

        def copy_to(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            self._dropsafe_begin_if_idle()
            return super().copy_to(*args, **kwargs)  # type: ignore[misc]

        def copy_expert(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg2's
            self._dropsafe_begin_if_idle()
            return super().copy_expert(*args, **kwargs)  # type: ignore[misc]

        def _dropsafe_begin_if_idle(self) -> None:
            conn = self.connection  # type: ignore[attr-defined]
            if not conn._dropsafe_native and conn.get_transaction_status() == _IDLE:  # noqa: SLF001
                conn._dropsafe_run(conn._dropsafe_begin)  # noqa: SLF001

    def execute_of(next_execute: Callable[..., Any]) -> Callable[..., Any]:
        """Return an ``execute`` that puts BEGIN in front of the statement, then runs the next.

        ``next_execute`` is the next class's in the cursor's order (the factory's own).
        """

        def execute(self: Any, query: Any, vars: Any = None) -> Any:  # noqa: A002, ANN401 - psycopg2's
            conn = self.connection
            if not conn._dropsafe_native and conn.get_transaction_status() == _IDLE:  # noqa: SLF001
                begin = conn._dropsafe_begin  # noqa: SLF001
                kind = type(query)
                if kind is str and query.strip():
                    query = begin + ";\n" + query
                elif kind is bytes and query.strip():
                    query = begin.encode() + b";\n" + query
                elif query:  # psycopg2's sql.Composable, only blanks: BEGIN alone, as psycopg2
                    conn._dropsafe_run(begin)  # noqa: SLF001
                # An empty query: psycopg2 refuses it before its BEGIN.
            return next_execute(self, query, vars)

        return execute

    def cursor_class(factory: object) -> type[Any] | None:
        """Return ``factory`` with `FirstFlightCursor` in front of it (made once per class).

        None for a factory that is no subclass of psycopg2's cursor (psycopg2 refuses it, or
        it is a function that makes cursors).
        """
        if not (isinstance(factory, type) and issubclass(factory, base_cursor)):
            return None
        cls = mixed.get(factory)
        if cls is None:
            execute = execute_of(factory.execute)  # type: ignore[attr-defined]
            cls = type(factory.__name__, (FirstFlightCursor, factory), {"execute": execute})
            cls.__module__ = __name__
            mixed[factory] = cls
        return cls

    new_cursor = base.cursor
    cursor_execute = base_cursor.execute
    plain_cursor = cursor_class(base_cursor)

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
            autocommit_of.__set__(self, True)  # noqa: FBT003 - a new connection: no SQL sent

        # -- transactions ---------------------------------------------------------------

        def commit(self) -> None:
            if self._dropsafe_native or self.closed or self.get_transaction_status() == _IDLE:
                base.commit(self)  # psycopg2's own: its error on a closed connection
                if self._dropsafe_native:
                    self._dropsafe_back()
                return
            cursor = new_cursor(self, None, base_cursor)  # `_dropsafe_run`, inline
            try:
                cursor_execute(cursor, "COMMIT")
            finally:
                cursor.close()

        def rollback(self) -> None:
            if self._dropsafe_native or self.closed or self.get_transaction_status() == _IDLE:
                base.rollback(self)
                if self._dropsafe_native:
                    self._dropsafe_back()
                return
            cursor = new_cursor(self, None, base_cursor)  # `_dropsafe_run`, inline
            try:
                cursor_execute(cursor, "ROLLBACK")
            finally:
                cursor.close()

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
            state = self.get_transaction_status()
            return _STATUS_READY if state in {_IDLE, _UNKNOWN} else _STATUS_BEGIN

        # -- the session's characteristics -------------------------------------------------

        @property
        def autocommit(self) -> bool:
            return bool(self._dropsafe_native and autocommit_of.__get__(self))

        @autocommit.setter
        def autocommit(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: autocommit_of.__set__(self, value))

        @property
        def isolation_level(self) -> object:
            if self._dropsafe_native:
                return isolation_of.__get__(self)
            return self._dropsafe_characteristics[0]

        @isolation_level.setter
        def isolation_level(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: isolation_of.__set__(self, value))

        @property
        def readonly(self) -> object:
            if self._dropsafe_native:
                return readonly_of.__get__(self)
            return self._dropsafe_characteristics[1]

        @readonly.setter
        def readonly(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: readonly_of.__set__(self, value))

        @property
        def deferrable(self) -> object:
            if self._dropsafe_native:
                return deferrable_of.__get__(self)
            return self._dropsafe_characteristics[2]

        @deferrable.setter
        def deferrable(self, value: object) -> None:
            self._dropsafe_in_own_mode("set_session", lambda: deferrable_of.__set__(self, value))

        def set_session(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - psycopg2's
            self._dropsafe_in_own_mode(
                "set_session", lambda: base.set_session(self, *args, **kwargs)
            )

        def set_isolation_level(self, level: object) -> None:
            # psycopg2 rolls back the transaction under way first, whatever the level.
            if not self._dropsafe_native and self._dropsafe_in_transaction():
                self._dropsafe_run("ROLLBACK")
            self._dropsafe_in_own_mode("set_session", lambda: base.set_isolation_level(self, level))

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

        def reset(self) -> None:
            if not self._dropsafe_native and self._dropsafe_in_transaction():
                self._dropsafe_run("ROLLBACK")  # psycopg2's ABORT
            base.reset(self)  # DISCARD ALL; psycopg2's defaults: not in autocommit
            self._dropsafe_native = True
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
                factory = cursor_factory or self.cursor_factory
                cls = plain_cursor if factory is None else cursor_class(factory)
                if cls is not None:
                    return new_cursor(self, None, cls, withhold, scrollable)
                # A factory that is no cursor class: its cursors cannot send BEGIN, even
                # later, after psycopg2's own transaction: psycopg2's mode for good.
                self._dropsafe_for_good = True
            if not self._dropsafe_native:
                self._dropsafe_to_native()
            return new_cursor(self, name, cursor_factory, withhold, scrollable)

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

        def tpc_recover(self) -> Any:  # noqa: ANN401 - psycopg2's list of Xids
            if self._dropsafe_native or self._dropsafe_in_transaction():
                # In a transaction psycopg2 reads inside it and leaves it open: so does this.
                return base.tpc_recover(self)
            result: list[Any] = []
            self._dropsafe_in_own_mode("tpc_recover", lambda: result.append(base.tpc_recover(self)))
            return result[0]

        # -- this class's own steps ----------------------------------------------------------

        def _dropsafe_run(self, command: str) -> None:
            """Send ``command`` (BEGIN, COMMIT, ROLLBACK) and wait for its reply."""
            cursor = new_cursor(self, None, base_cursor)
            try:
                cursor_execute(cursor, command)
            finally:
                cursor.close()

        def _dropsafe_in_transaction(self) -> bool:
            return not self.closed and self.get_transaction_status() != _IDLE

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
            isolation, readonly, deferrable = self._dropsafe_characteristics
            if (isolation, readonly, deferrable) != (None, None, None):
                base.set_session(
                    self,
                    isolation_level=_DEFAULT if isolation is None else isolation,
                    readonly=_DEFAULT if readonly is None else readonly,
                    deferrable=_DEFAULT if deferrable is None else deferrable,
                )
            self._dropsafe_native = True

        def _dropsafe_back(self) -> None:
            """Leave psycopg2's own mode where its transaction is over and autocommit off."""
            if (
                not self._dropsafe_native
                or self._dropsafe_for_good
                or self.closed
                or autocommit_of.__get__(self)
                or status_of.__get__(self) != _STATUS_READY
                or self.get_transaction_status() != _IDLE
            ):
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
            self._dropsafe_native = False

    FirstFlightConnection.__module__ = __name__
    return FirstFlightConnection


_NOTHING = object()


def _chain(first: object, rest: Any) -> Any:  # noqa: ANN401 - an iterator of parameters
    yield first
    yield from rest
