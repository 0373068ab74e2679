"""asyncpg: a transaction's BEGIN sent in the flight of its first statement (issue 28).

SQLAlchemy's asyncpg adapter begins lazily: at the first statement it is given, its
``_start_transaction`` awaits asyncpg's ``Transaction.start()``, which sends ``BEGIN`` as a
simple Query and waits for its reply: a round trip of its own before the statement's. asyncpg
has no pipeline API; dropsafe already writes messages of its own ahead of asyncpg's, in the same
transport write (`dropsafe._drivers.asyncpg_flight`), and takes their replies out of the stream
before asyncpg reads it (the watch, `dropsafe._drivers.asyncpg`).

So, on the connections of an engine that asks (``PoolPolicy.begin_in_first_flight``), the
adapter's ``_start_transaction`` sends nothing: asyncpg's ``Transaction`` is made as the
adapter makes it and left in the state its ``start()`` leaves (started, the connection's top
transaction), and the very text ``start()`` would send (isolation, read only, deferrable:
`begin_text`) is armed on the transport (`asyncpg_flight.Flight`), to go in front of the next
operation's first message, whatever operation that is: the statement's Parse on first use, its
Bind, an executemany's, a server-side cursor's, a COMMIT or ROLLBACK of a transaction that ran
nothing (BEGIN at the head of the Query's text: one harmless round trip, as before).

Where it defers nothing (the adapter's own ``_start_transaction`` runs): AUTOCOMMIT (the
adapter begins nothing), a connection asyncpg knows closed or already in a transaction (its
top transaction set, or the server's last word ``T``/``E``), a server that said goodbye or a
broken stream, a ROLLBACK whose reply is still due, a transport whose ``write`` cannot be
replaced (uvloop's), an adapter of a shape dropsafe does not know (`install`).
Why it is safe: docs/guarantees.md, "BEGIN rides the first statement's flight".
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from dropsafe._drivers.asyncpg_flight import Flight
from dropsafe._drivers.asyncpg_rollback import in_greenlet
from dropsafe._drivers.base import await_

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["begin_text", "install"]

#: asyncpg's isolation names, as its ``Transaction.start()`` writes them in BEGIN.
_ISOLATION = {
    "read_committed": " ISOLATION LEVEL READ COMMITTED",
    "read_uncommitted": " ISOLATION LEVEL READ UNCOMMITTED",
    "repeatable_read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}
#: What the adapter keeps of its transaction (SQLAlchemy 2.1: ``_transaction`` alone; 2.0
#: also a ``_started`` flag, which its cursor reads).
#: The adapter cursor's coroutine that starts a transaction for an executemany (SQLAlchemy 2.0
#: and 2.1): its BEGIN goes alone. Told by its code object, read from the cursor class (a
#: frame's name alone would miss it, silently, once renamed); an adapter whose cursor class has
#: none gets no deferred BEGIN (`install`).
_EXECUTEMANY = "_executemany"
#: In the transport's ``__dict__``: the next transaction sends its BEGIN alone.
_ALONE = "_dropsafe_begin_alone"
_NEEDED = ("_transaction", "_connection", "isolation_level", "readonly", "deferrable")


def begin_text(transaction: Any) -> str:  # noqa: ANN401 - asyncpg's Transaction
    """Return the BEGIN asyncpg's ``Transaction.start()`` sends for ``transaction`` (top level)."""
    text = "BEGIN" + _ISOLATION.get(transaction._isolation or "", "")  # noqa: SLF001 - asyncpg's
    if transaction._readonly:  # noqa: SLF001
        text += " READ ONLY"
    if transaction._deferrable:  # noqa: SLF001
        text += " DEFERRABLE"
    return text + ";"


def install(adapter: Any, watch_of: Callable[[Any], Any]) -> bool:  # noqa: ANN401 - the adapter
    """Give SQLAlchemy's asyncpg ``adapter`` the deferred BEGIN; whether it now has it.

    The adapter has ``__slots__`` (no attribute can be set on it): its class is swapped for a
    subclass with this ``_start_transaction`` and no slots of its own (the same layout).
    ``watch_of`` returns the watch on an asyncpg connection (None: none fits).
    """
    cls = type(adapter)
    if getattr(cls, "_dropsafe_begin", False):
        return True
    if (
        not all(name in _slots(cls) for name in _NEEDED)
        or not hasattr(cls, "_start_transaction")
        or cursor_class(cls) is None
    ):
        return False
    adapter.__class__ = _deferring(cls, watch_of)
    return True


#: The deferring subclass of each adapter class (one or two per process).
_SUBCLASSES: dict[tuple[type, Callable[[Any], Any]], type] = {}


def _deferring(cls: type, watch_of: Callable[[Any], Any]) -> type:
    """Return the subclass of the adapter's class whose ``_start_transaction`` defers BEGIN."""
    found = _SUBCLASSES.get((cls, watch_of))
    if found is None:
        found = _SUBCLASSES[cls, watch_of] = _subclass(cls, watch_of)
    return found


def cursor_class(cls: type) -> Any:  # noqa: ANN401 - SQLAlchemy's cursor class
    """Return the cursor class of the adapter class ``cls`` (None: it has no ``_executemany``).

    SQLAlchemy 2.1 names it on the adapter (``_cursor_cls``); 2.0's adapter makes the dialect
    module's ``AsyncAdapt_asyncpg_cursor``.
    """
    found = getattr(cls, "_cursor_cls", None)
    if found is None:
        found = getattr(sys.modules.get(cls.__module__), "AsyncAdapt_asyncpg_cursor", None)
    code = getattr(getattr(found, _EXECUTEMANY, None), "__code__", None)
    return found if code is not None else None


def _subclass(cls: type, watch_of: Callable[[Any], Any]) -> type:
    own = cls._start_transaction  # type: ignore[attr-defined] # SQLAlchemy's adapter, checked
    own_cursor = cls.cursor  # type: ignore[attr-defined]
    cursors = cursor_class(cls)  # checked by install: has an _executemany

    async def _start_transaction(self: Any) -> None:  # noqa: ANN401
        if (
            self.isolation_level == "autocommit"
            # The adapter's cursor's executemany (its frame awaits this one): asyncpg's
            # executemany, failing midway, asks is_in_transaction() and, if the server has
            # not said so yet, sends a ROLLBACK that would end the transaction unseen. Told by
            # its code object, the cursor class's now; by its name too, should a wrapper stand
            # in the class for it (the frame is still the coroutine's own).
            or (code := sys._getframe(1).f_code) is cursors._executemany.__code__  # noqa: SLF001
            or code.co_name == _EXECUTEMANY
            or not _defer(self, watch_of)
        ):
            await own(self)

    own_handle = cls._handle_exception  # type: ignore[attr-defined]

    def _handle_exception(self: Any, error: Exception) -> None:  # noqa: ANN401
        _unstart(self)
        own_handle(self, error)

    def cursor(self: Any, server_side: bool = False) -> Any:  # noqa: ANN401 - the adapter's
        if server_side:
            # asyncpg's cursor asks is_in_transaction() before it binds: the server must have
            # said so by then, so its transaction's BEGIN goes alone, first.
            _begin_alone(self)
        return own_cursor(self, server_side)

    return type(
        cls.__name__,
        (cls,),
        {
            "__slots__": (),
            "__module__": __name__,
            "_start_transaction": _start_transaction,
            "cursor": cursor,
            "_handle_exception": _handle_exception,
            "_dropsafe_begin": True,
        },
    )


def _defer(adapter: Any, watch_of: Callable[[Any], Any]) -> bool:  # noqa: ANN401, PLR0911 - one return per case left to the adapter
    """Arm BEGIN on the transport and leave the transaction started; False: send it now."""
    connection = adapter._connection  # noqa: SLF001 - the adapter's asyncpg connection
    if (
        connection.is_closed()
        or connection._top_xact is not None  # noqa: SLF001 - asyncpg's own transaction
        or connection.is_in_transaction()
    ):
        return False
    watch = watch_of(connection)
    if watch is None or watch.goodbye or watch.broken or watch.replies is not None:
        return False
    transport = connection._transport  # noqa: SLF001 - asyncpg keeps it private
    found = vars(transport)
    if found.pop(_ALONE, False) or found.get("_dropsafe_rollback") is not None:
        return False  # a server-side cursor's transaction; a ROLLBACK's reply still due
    try:
        transaction = connection.transaction(
            isolation=adapter.isolation_level,
            readonly=adapter.readonly,
            deferrable=adapter.deferrable,
        )
    except Exception:  # noqa: BLE001 - the adapter's own start raises it, translated
        return False
    flight = Flight.install(transport, watch.expect, connection.is_in_transaction)
    if flight is None or flight.begin is not None:
        return False
    started = _started_state(transaction)
    if started is None:
        flight.settle()
        return False
    flight.begin = begin_text(transaction)
    flight.begun = False
    # The state asyncpg's start() leaves: started, the connection's top transaction.
    transaction._state = started  # noqa: SLF001
    connection._top_xact = transaction  # noqa: SLF001
    adapter._transaction = transaction  # noqa: SLF001 - as the adapter's own start sets it
    if "_started" in _slots(type(adapter)):
        adapter._started = True  # noqa: SLF001 - SQLAlchemy 2.0's flag
    return True


def _unstart(adapter: Any) -> None:  # noqa: ANN401
    """Forget a transaction whose BEGIN is still armed: its first operation failed unsent.

    Nothing reached the server since the transaction was started (BEGIN rides the first
    write), so the transaction is dropped as if it had never begun: its next statement begins
    a new one (and rides with its BEGIN, or sends it alone where it must: an executemany), its
    ROLLBACK sends nothing. Left armed instead, the next operation could be one that reads
    ``is_in_transaction()`` before the server said so (an executemany failing midway sends a
    ROLLBACK that would end the transaction unseen).
    """
    connection = adapter._connection  # noqa: SLF001
    flight = Flight.on(getattr(connection, "_transport", None))
    transaction = adapter._transaction  # noqa: SLF001
    if flight is None or flight.begin is None or transaction is None:
        return
    flight.begin = None
    flight.settle()
    if connection._top_xact is transaction:  # noqa: SLF001 - asyncpg's own
        connection._top_xact = None  # noqa: SLF001
    rolled_back = getattr(type(transaction._state), "ROLLEDBACK", None)  # noqa: SLF001
    if rolled_back is not None:
        transaction._state = rolled_back  # noqa: SLF001 - as after its rollback()
    adapter._transaction = None  # noqa: SLF001
    if "_started" in _slots(type(adapter)):
        adapter._started = False  # noqa: SLF001 - SQLAlchemy 2.0's flag


def _begin_alone(adapter: Any) -> None:  # noqa: ANN401
    """Have the adapter's next transaction send its BEGIN alone; an armed one goes now."""
    transport = getattr(adapter._connection, "_transport", None)  # noqa: SLF001
    found = getattr(transport, "__dict__", None)
    if found is None:
        return
    flight = Flight.on(transport)
    if flight is None or flight.begin is None:
        if adapter._transaction is None or getattr(adapter, "_started", True) is False:  # noqa: SLF001
            found[_ALONE] = True  # for the transaction this cursor's statement begins
        return
    if in_greenlet():
        # BEGIN armed and nothing sent (the transaction's first statement failed before
        # anything went, or a server-side cursor is its first): it rides a Query that reads
        # nothing, awaited here. Not an empty query (";"): its EmptyQueryResponse has no
        # command tag, and asyncpg's simple-query result handler fails on it (AttributeError).
        await_(adapter._connection.execute("SELECT"))  # noqa: SLF001


def _started_state(transaction: Any) -> object:  # noqa: ANN401
    """Return asyncpg's STARTED state for ``transaction`` (None: an asyncpg not known)."""
    state = getattr(transaction, "_state", None)
    started = getattr(type(state), "STARTED", None)
    return started if getattr(state, "name", None) == "NEW" else None


def _slots(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}
