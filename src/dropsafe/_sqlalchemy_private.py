"""The private attributes of SQLAlchemy that dropsafe uses, each with the reason, in one place.

SQLAlchemy offers no public way to do these. A SQLAlchemy that renames one breaks this file
only (scripts/sqlalchemy_compat.py runs the suite on every supported version).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.pool import _ConnectionFairy

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, ExecutionContext
    from sqlalchemy.pool import Pool, PoolProxiedConnection

    from dropsafe._dbapi import DBAPIConnection

__all__ = ["POOL_CHECKOUT", "pool_connect_function", "set_pool_creator", "switch_connection"]

#: The class of a pool checkout (``sqlalchemy.pool._ConnectionFairy``, one made per checkout,
#: with a ``__dict__``), told from the first connect's ad hoc connection (whose unknown
#: attributes reach the DBAPI connection's) by identity: no call, at every statement.
POOL_CHECKOUT: type = _ConnectionFairy


def pool_connect_function(pool: Pool) -> Callable[..., DBAPIConnection]:
    """Return how ``pool`` connects: its creator in the one-argument form it calls.

    ``Pool._invoke_creator``, called with the pool's entry (or None): SQLAlchemy turns the
    user's ``creator`` (with or without the entry argument) into this form; wrapping it keeps
    whichever the user gave.
    """
    return pool._invoke_creator


def set_pool_creator(pool: Pool, creator: Callable[..., DBAPIConnection]) -> None:
    """Make ``pool`` connect through ``creator``.

    ``Pool._creator``: the setter behind ``Pool(creator=...)``, and what ``Pool.recreate()``
    hands the new pool (``engine.dispose()``), so the wrap outlives a dispose.
    """
    pool._creator = creator


def switch_connection(
    connection: Connection, context: ExecutionContext | None, fresh: PoolProxiedConnection
) -> None:
    """Put ``fresh`` under ``connection`` and its execution ``context``, their Transaction kept.

    No ``context`` at a COMMIT (the dialect's ``do_commit``): the Connection's alone.

    No public API replaces the connection under an open ``Transaction``: ``invalidate()``
    makes its next use raise ``PendingRollbackError``. ``Connection._dbapi_connection`` is the
    pool checkout it runs on; the context's ``_dbapi_connection`` is where its documented
    ``create_cursor()`` makes cursors. The caller checks first that both exist (``hasattr``):
    where a SQLAlchemy lacks either, it does not replay.
    """
    connection._dbapi_connection = fresh
    if context is not None:
        context._dbapi_connection = fresh  # type: ignore[attr-defined] # its default class only
