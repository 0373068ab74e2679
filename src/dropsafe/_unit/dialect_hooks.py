"""Where a unit of work looks at an engine: its dialect's methods, not SQLAlchemy's events.

A unit must see each BEGIN, each statement and each COMMIT on the engines it writes through
(`dropsafe._unit.shapes` refuses what it cannot guard, `dropsafe._unit.recording` reads the
xid before COMMIT). SQLAlchemy's Connection events would tell it, at a price paid by every
request on that engine once a unit ran there: one Connection listener on an engine makes
SQLAlchemy join the engine's events into each new Connection's and build an accessor for
each event it looks up (seven per transaction), then call the listeners at each statement.
About a hundred Python calls per transaction; a plain ``SELECT 1`` request took 204 calls on
a hardened engine before its first unit and 303 after (issue 28). Each method here is
replaced on the engine's own dialect instance (as the replay's ``do_execute`` and the quiet
ROLLBACK's ``do_rollback`` are): one call where it runs, and outside a unit one read of a
context variable, no decision.

Each runs where the event fired: right before the dialect's BEGIN, BEGIN TWOPHASE, statement
and COMMIT, inside the ``try`` that SQLAlchemy keeps around the dialect's call (the events
fired just before it). So an error raised here (a refusal, a failed mark) also reaches the
engine's ``handle_error`` listeners; a failed mark, already handled on its own connection,
reaches them a second time, wrapped (dropsafe's own leave a wrapped error alone).

``do_commit`` is given the pool's checkout, not the Connection that the unit's records are
kept by: that is its caller's ``self`` (``Connection._commit_impl``, known by its code object,
one frame up); a COMMIT reached another way (an app's own wrapper of ``do_commit`` around
this one) is matched by its checkout among the unit's connections.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect, ExecutionContext
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._dbapi import DBAPICursor, DBAPIParameters

__all__ = ["UnitHooks", "hook_dialect", "hooked"]


class UnitHooks(NamedTuple):
    """What a unit does at each point; each called only while ``current()`` is not None."""

    current: Callable[[], object | None]
    #: Before BEGIN: the driver's connection (its ``autocommit`` flag is read).
    at_begin: Callable[[object], None]
    #: Before BEGIN TWOPHASE.
    at_begin_twophase: Callable[[], None]
    #: Before each statement: the driver's connection and the statement's text.
    before_statement: Callable[[object, str], None]
    #: Right before COMMIT, after every flush and ``before_commit`` hook: the Connection.
    before_commit: Callable[[Connection], None]
    #: The unit's Connection whose pool checkout this is, or None (the fallback above).
    connection_of: Callable[[object], Connection | None]


def _commit_code() -> object | None:
    """``Connection._commit_impl``'s code, where it is the one that calls ``do_commit``."""
    method = getattr(Connection, "_commit_impl", None)
    code = getattr(method, "__code__", None)
    return code if code is not None and "do_commit" in code.co_names else None


_COMMIT_CODE = _commit_code()
#: Set on a dialect instance whose methods carry the unit's hooks: they are put there once.
_HOOKED = "_dropsafe_unit_hooks"


def hooked(dialect: Dialect) -> bool:
    """Whether ``dialect`` carries a unit's hooks already."""
    return _HOOKED in vars(dialect)


def hook_dialect(dialect: Dialect, hooks: UnitHooks) -> None:  # noqa: C901 - one closure each
    """Put the unit's hooks on ``dialect``'s methods (this instance's only); once per dialect.

    Whatever methods the instance has now (the engine's replay, its unsent COMMIT) run inside:
    the unit looks first, as its listeners did before the dialect's own call.
    """
    if hooked(dialect):
        return
    current = hooks.current
    begin, begin_twophase, commit = (
        dialect.do_begin,
        dialect.do_begin_twophase,
        dialect.do_commit,
    )
    execute_no_params = dialect.do_execute_no_params

    def do_begin(dbapi_connection: PoolProxiedConnection) -> None:
        if current() is not None:
            hooks.at_begin(dbapi_connection.dbapi_connection)
        begin(dbapi_connection)

    def do_begin_twophase(connection: Connection, xid: Any) -> None:  # noqa: ANN401 - any xid
        if current() is not None:
            hooks.at_begin_twophase()
        begin_twophase(connection, xid)

    def statement_seen(statement: str, context: ExecutionContext | None) -> None:
        connection = None if context is None else context.root_connection
        if connection is not None:
            hooks.before_statement(connection.connection.dbapi_connection, statement)

    def with_parameters(
        method: Callable[[DBAPICursor, str, DBAPIParameters, ExecutionContext | None], None],
    ) -> Callable[..., None]:
        """``do_execute`` or ``do_executemany`` (the same arguments), the unit looking first."""

        def hooked(
            cursor: DBAPICursor,
            statement: str,
            parameters: DBAPIParameters,
            context: ExecutionContext | None = None,
        ) -> None:
            if current() is not None:
                statement_seen(statement, context)
            method(cursor, statement, parameters, context)

        return hooked

    def do_execute_no_params(
        cursor: DBAPICursor, statement: str, context: ExecutionContext | None = None
    ) -> None:
        if current() is not None:
            statement_seen(statement, context)
        execute_no_params(cursor, statement, context)

    def do_commit(dbapi_connection: PoolProxiedConnection) -> None:
        if current() is not None:
            caller = sys._getframe(1)  # noqa: SLF001 - a frame read: Connection._commit_impl's
            connection = caller.f_locals.get("self") if caller.f_code is _COMMIT_CODE else None
            if not isinstance(connection, Connection) or (
                connection.connection is not dbapi_connection
            ):
                connection = hooks.connection_of(dbapi_connection)
            if connection is not None:
                hooks.before_commit(connection)
        commit(dbapi_connection)

    vars(dialect).update(
        do_begin=do_begin,
        do_begin_twophase=do_begin_twophase,
        do_execute=with_parameters(dialect.do_execute),
        do_executemany=with_parameters(dialect.do_executemany),
        do_execute_no_params=do_execute_no_params,
        do_commit=do_commit,
    )
    vars(dialect)[_HOOKED] = True
