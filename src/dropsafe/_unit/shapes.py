"""Which shapes a unit of work may take: those it cannot guard are refused before they run.

A unit of work is retried whole, and its one COMMIT is resolved by its xid when the reply is
lost. Two shapes break that and are refused with a `ConfigurationError` (docs/guarantees.md,
"Shapes a unit of work may take"):

- **two-phase** (``sessionmaker(twophase=True)``, ``Connection.begin_twophase()``): the COMMIT
  is ``PREPARE TRANSACTION`` then ``COMMIT PREPARED``. A prepared transaction outlives its
  connection and its backend, so a lost reply leaves it in doubt, holding its locks, until a
  transaction manager with a durable log decides it; SQLAlchemy has none, and dropsafe would
  have to become one. Refused at the call (the sessionmaker says so) or when SQLAlchemy begins
  one inside a unit (the engine's ``begin_twophase`` event), before BEGIN.
- **AUTOCOMMIT** (``isolation_level="AUTOCOMMIT"`` on the engine or in its execution options,
  or the driver connection's own ``autocommit``): each statement commits on its own, so a unit
  cut after its first statement cannot run again whole. Refused at the call when the engine
  says so, and otherwise when the unit's transaction begins (the engine's ``begin`` event: before
  the unit's function can write through the driver's own connection) and at each statement a
  unit sends under it, before it is sent (``before_cursor_execute``, for AUTOCOMMIT set later);
  outside a unit each costs one context-variable read.

And one shape that must not look like a failure: a Session hook that runs after the COMMIT
(``after_commit``, ``after_transaction_end``) and raises. The unit has committed; an error from
`run_transaction` must mean "no effect" (or be `CommitOutcomeUnknown`), so the unit's result is
returned and the hook's failure is reported: a `HookFailedAfterCommit` event and one log line.
Whether the COMMIT itself completed is read from SQLAlchemy's connections: a root transaction
stays on its connection when its COMMIT fails, and only leaves it when the COMMIT succeeded.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from typing import TYPE_CHECKING, Any, final

from sqlalchemy import event
from sqlalchemy.orm import Session

from dropsafe._errors import ConfigurationError
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe.events import HookFailedAfterCommit, LoggingHook, format_event

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from dropsafe.events import Hook

__all__ = [
    "UnitWatch",
    "begin_driver_transaction",
    "check_engine_shape",
    "check_unit_shape",
    "watching",
]

logger = SafeLogger()  # a handler that raises never changes an outcome (issue 31)

_AUTOCOMMIT = "AUTOCOMMIT"

TWO_PHASE_REFUSED = (
    "a unit of work cannot be two-phase (twophase=True, begin_twophase()): a prepared "
    "transaction whose COMMIT PREPARED reply is lost stays in doubt, holding its locks, until a "
    "transaction manager with a durable log decides it, and dropsafe is not one. Use a plain "
    "sessionmaker instead: one database's COMMIT is atomic and dropsafe resolves it by its xid; "
    "for work across databases, run one unit per database and make each idempotent, or queue "
    "the second write in an outbox table written by the first (docs/guarantees.md)"
)

AUTOCOMMIT_REFUSED = (
    "a unit of work cannot run under AUTOCOMMIT ({where}): each statement would commit on "
    "its own, and a unit cut halfway could not run again whole. Use an engine without "
    "isolation_level='AUTOCOMMIT' for units of work instead (engine.execution_options("
    "isolation_level='READ COMMITTED') makes one from it), and keep AUTOCOMMIT for work "
    "outside units, such as VACUUM or CREATE INDEX CONCURRENTLY (docs/guarantees.md)"
)


@final
class UnitWatch:
    """One attempt of a unit of work, as the shape listeners see it; ``with`` it around one.

    A class, not a generator: a generator-based context manager costs a few microseconds per
    unit of work.
    """

    __slots__ = ("_reported", "_token", "committing_connections", "hooks", "unit")

    def __init__(self, unit: str, hooks: tuple[Hook, ...]) -> None:
        self.unit = unit
        self.hooks = hooks  # the engine's, given by the unit's runner
        #: Connections whose COMMIT began during the attempt (the unit's own among them).
        self.committing_connections: list[Connection] = []
        self._reported: list[BaseException] = []
        self._token: contextvars.Token[UnitWatch | None] | None = None

    def __enter__(self) -> UnitWatch:
        self._token = _WATCH.set(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _WATCH.reset(self._token)

    def commit_completed(self, handle: object) -> bool:
        """Whether the unit's commit raised after its COMMIT completed, not in it.

        SQLAlchemy leaves a root transaction on its connection when its COMMIT fails (so that
        a rollback must follow), and removes it once the COMMIT succeeded; an invalidated
        connection lost its COMMIT's reply, whatever its transaction says. A Session
        (``handle``) also says whether all its connections committed (one per engine): its
        transaction is COMMITTED then, or already gone (a hook raised as it closed).
        """
        connections = self.committing_connections
        if not connections or any(
            connection.get_transaction() is not None or connection.invalidated
            for connection in connections
        ):
            return False
        session = getattr(handle, "sync_session", handle)  # an AsyncSession's own Session
        if not isinstance(session, Session):
            return True  # a Connection: the one above
        transaction = session.get_transaction()
        # SQLAlchemy's SessionTransaction state, named the same from 1.4 to 2.1.
        state = getattr(getattr(transaction, "_state", None), "name", None)
        return transaction is None or state == "COMMITTED"

    def hook_failed(self, error: BaseException) -> None:
        """Report ``error``, raised by a hook after the unit committed: once, never silently."""
        if any(error is seen for seen in self._reported):
            return
        self._reported.append(error)
        hooks = self.hooks
        occurred = HookFailedAfterCommit(self.unit, describe_error(error))
        emit(hooks, occurred)
        if not any(isinstance(hook, LoggingHook) for hook in hooks):
            logger.error("%s", format_event(occurred))


_WATCH: contextvars.ContextVar[UnitWatch | None] = contextvars.ContextVar(
    "dropsafe_unit_watch", default=None
)
watching = UnitWatch  # with watching(unit_name, hooks) as shapes: ...


# -- at the call -------------------------------------------------------------------------------


def check_unit_shape(bind: object, engine: Engine) -> None:
    """Refuse, at the call, a unit whose bind says it is two-phase or AUTOCOMMIT.

    Also installs the listeners that refuse the same shapes when they appear later, inside the
    unit (once per engine).
    """
    settings: dict[str, Any] | None = getattr(bind, "kw", None)  # a (async_)sessionmaker's
    if settings and settings.get("twophase"):
        raise ConfigurationError(TWO_PHASE_REFUSED)
    check_engine_shape(engine)


def check_engine_shape(engine: Engine) -> None:
    """Refuse an engine set to AUTOCOMMIT; watch it for the shapes that appear inside a unit.

    For the unit's engine and for every other engine its sessionmaker binds.
    """
    # SQLAlchemy takes only this spelling (it checks a level against the dialect's list).
    if engine.get_execution_options().get("isolation_level") == _AUTOCOMMIT:
        raise ConfigurationError(AUTOCOMMIT_REFUSED.format(where="the engine's execution_options"))
    if getattr(engine.dialect, "_on_connect_isolation_level", None) == _AUTOCOMMIT:
        raise ConfigurationError(
            AUTOCOMMIT_REFUSED.format(where="create_engine(isolation_level='AUTOCOMMIT')")
        )
    if engine not in _WATCHED_ENGINES:  # event.contains costs more than a unit's own work
        _watch_engine(engine)


_WATCHED_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_INSTALL_LOCK = threading.Lock()


def _watch_engine(engine: Engine) -> None:
    with _INSTALL_LOCK:
        if not event.contains(engine, "begin_twophase", _refuse_two_phase):
            event.listen(engine, "begin_twophase", _refuse_two_phase)
            event.listen(engine, "begin", _refuse_autocommit_at_begin)
            event.listen(engine, "before_cursor_execute", _refuse_autocommit)
            event.listen(engine, "commit", _note_commit)
        _WATCHED_ENGINES.add(engine)


# -- inside the unit ---------------------------------------------------------------------------


def _refuse_two_phase(conn: Connection, xid: object) -> None:
    """Engine ``begin_twophase`` listener: before BEGIN, so nothing has been sent."""
    del conn, xid
    if _WATCH.get() is not None:
        raise ConfigurationError(TWO_PHASE_REFUSED)


def _refuse_autocommit(  # noqa: PLR0917 - SQLAlchemy's before_cursor_execute signature
    conn: Connection,
    cursor: object,
    statement: str,
    parameters: object,
    context: object,
    executemany: bool,
) -> None:
    """Engine ``before_cursor_execute`` listener: refuse a statement that would commit alone."""
    del cursor, statement, parameters, context, executemany
    if _WATCH.get() is None:
        return
    # The driver's own flag: SQLAlchemy sets it for isolation_level="AUTOCOMMIT" (on the
    # engine or in execution options), and an app may set it on the DBAPI connection itself.
    if getattr(conn.connection.dbapi_connection, "autocommit", False):
        raise ConfigurationError(AUTOCOMMIT_REFUSED.format(where="set on its connection"))


def _refuse_autocommit_at_begin(conn: Connection) -> None:
    """Engine ``begin`` listener: refuse before the unit's function touches the connection.

    The unit's function may work through the driver's own connection (a COPY, a cursor of its
    own) before SQLAlchemy sends a statement; under the driver's ``autocommit`` that work has
    committed alone by then, and a refusal at the first statement would be an error with an
    effect.
    """
    if _WATCH.get() is not None and getattr(conn.connection.dbapi_connection, "autocommit", False):
        raise ConfigurationError(AUTOCOMMIT_REFUSED.format(where="set on its connection"))


async def begin_driver_transaction(dbapi_connection: object) -> None:
    """Send the BEGIN of SQLAlchemy's asyncpg adapter now, before the unit's function runs.

    The adapter sends BEGIN only at the first statement it is given: asyncpg work the function
    does before that (``copy_records_to_table``, ``execute`` on the driver's connection) would
    commit alone, and a unit run again would do it twice. The same round trip, made earlier.
    Private names of the adapter (``_start_transaction``; ``_transaction`` in SQLAlchemy 2.1,
    ``_started`` in 2.0), as `dropsafe._drivers` reads them; other drivers begin on the server
    with the first statement of any kind, and an adapter without these names is left alone.
    """
    start = getattr(dbapi_connection, "_start_transaction", None)
    if start is None:
        return
    if hasattr(dbapi_connection, "_transaction"):
        started = dbapi_connection._transaction is not None  # noqa: SLF001
    else:
        started = getattr(dbapi_connection, "_started", True)
    if not started:
        await start()


def _note_commit(conn: Connection) -> None:
    """Engine ``commit`` listener: remember the connections an attempt of a unit commits.

    A COMMIT the unit's function made itself, on the same connection, is harmless here: once
    the unit's own COMMIT succeeded, that connection's transaction is gone as well.
    """
    watch = _WATCH.get()
    if watch is not None:
        watch.committing_connections.append(conn)
