"""Which shapes a unit of work may take: those it cannot guard are refused before they run.

Two-phase and AUTOCOMMIT units are refused with a `ConfigurationError`: at the call when the
bind says so, otherwise by the unit's hooks on the engine's dialect (`dropsafe._unit.dialect_hooks`,
put there by `dropsafe._unit.recording.watch_engine`) before BEGIN, before the function touches
its connection, and before each statement. Why each shape breaks a unit, and what a hook that raises
after the COMMIT is reported as: docs/guarantees.md, "Shapes a unit of work may take".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from dropsafe._classify import ErrorKind, classify
from dropsafe._commit_truth.pending_commit import may_notify
from dropsafe._errors import ConfigurationError
from dropsafe._unit.tracker import current_attempt

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "begin_driver_transaction",
    "check_engine_shape",
    "check_unit_shape",
    "refuse_autocommit",
    "refuse_autocommit_at_begin",
    "refuse_two_phase",
]

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


# -- at the call -------------------------------------------------------------------------------


def check_unit_shape(bind: object, engine: Engine) -> None:
    """Refuse, at the call, a unit whose bind says it is two-phase or AUTOCOMMIT.

    The hooks below refuse the same shapes when they appear later, inside the unit.
    """
    settings: dict[str, Any] | None = getattr(bind, "kw", None)  # a (async_)sessionmaker's
    if settings and settings.get("twophase"):
        raise ConfigurationError(TWO_PHASE_REFUSED)
    check_engine_shape(engine)


def check_engine_shape(engine: Engine) -> None:
    """Refuse an engine set to AUTOCOMMIT: the unit's, and every other its sessionmaker binds."""
    # SQLAlchemy takes only this spelling (it checks a level against the dialect's list).
    if engine.get_execution_options().get("isolation_level") == _AUTOCOMMIT:
        raise ConfigurationError(AUTOCOMMIT_REFUSED.format(where="the engine's execution_options"))
    if getattr(engine.dialect, "_on_connect_isolation_level", None) == _AUTOCOMMIT:
        raise ConfigurationError(
            AUTOCOMMIT_REFUSED.format(where="create_engine(isolation_level='AUTOCOMMIT')")
        )


# -- inside the unit ---------------------------------------------------------------------------


def refuse_two_phase() -> None:
    """Before BEGIN TWOPHASE inside a unit (`dialect_hooks`): nothing has been sent."""
    raise ConfigurationError(TWO_PHASE_REFUSED)


def refuse_autocommit(dbapi_connection: object, statement: str) -> None:
    """Before each statement inside a unit (`dialect_hooks`): refuse one that commits alone.

    It also notes a statement that may notify (`AttemptTracker.notifies`): the one hook every
    statement of a unit already pays for.
    """
    attempt = current_attempt()
    if attempt is None:
        return
    if may_notify(statement):
        attempt.notifies = True
    # The driver's own flag: SQLAlchemy sets it for isolation_level="AUTOCOMMIT" (on the
    # engine or in execution options), and an app may set it on the DBAPI connection itself.
    if _under_autocommit(dbapi_connection):
        raise ConfigurationError(AUTOCOMMIT_REFUSED.format(where="set on its connection"))


def refuse_autocommit_at_begin(dbapi_connection: object) -> None:
    """Before BEGIN inside a unit (`dialect_hooks`): before the function touches the connection.

    The unit's function may work through the driver's own connection (a COPY, a cursor of its
    own) before SQLAlchemy sends a statement; under the driver's ``autocommit`` that work has
    committed alone by then, and a refusal at the first statement would be an error with an
    effect.
    """
    if _under_autocommit(dbapi_connection):
        raise ConfigurationError(AUTOCOMMIT_REFUSED.format(where="set on its connection"))


def _under_autocommit(dbapi_connection: object) -> bool:
    """Whether the driver's connection is open and in its ``autocommit`` mode.

    A closed one is not refused: psycopg2 and psycopg keep the flag they had when the
    connection was lost (they refuse to change it on a closed connection: dropsafe's question
    at connect, asked in autocommit, cannot put it back), and such a connection must fail its
    first statement as lost, which a unit retries, not as a unit under AUTOCOMMIT.
    """
    return bool(getattr(dbapi_connection, "autocommit", False)) and not getattr(
        dbapi_connection, "closed", False
    )


async def begin_driver_transaction(connection: AsyncConnection) -> None:
    """Send the BEGIN of SQLAlchemy's asyncpg adapter now, before the unit's function runs.

    The adapter sends BEGIN only at the first statement it is given: asyncpg work the function
    does before that (``copy_records_to_table``, ``execute`` on the driver's connection) would
    commit alone, and a unit run again would do it twice. The same round trip, made earlier.
    Private names of the adapter (``_start_transaction``; ``_transaction`` in SQLAlchemy 2.1,
    ``_started`` in 2.0), as `dropsafe._drivers` reads them; other drivers begin on the server
    with the first statement of any kind, and an adapter without these names is left alone.

    This BEGIN is sent past SQLAlchemy's execute, so a lost connection is reported here as
    SQLAlchemy reports a lost statement's: the Connection is invalidated with the error. The
    engine's listeners then see why it was lost (a host that stopped answering is left out of
    connects) and the pool drops it at once.
    """
    sync_connection = cast("Connection", connection.sync_connection)  # an open one's
    dbapi_connection: object = sync_connection.connection.dbapi_connection
    start = getattr(dbapi_connection, "_start_transaction", None)
    if start is None:
        return
    if hasattr(dbapi_connection, "_transaction"):
        started = dbapi_connection._transaction is not None  # noqa: SLF001
    else:
        started = getattr(dbapi_connection, "_started", True)
    if started:
        return
    try:
        await start()
    except Exception as exc:
        if classify(exc) is ErrorKind.DISCONNECT:
            await connection.invalidate(exc)
        raise
