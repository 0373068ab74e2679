"""What the drivers hand dropsafe (DBAPI connections, cursors), and how to question them.

They are ``Any`` on purpose. PEP 249 is a convention, not a class: psycopg2, psycopg 3,
SQLAlchemy's asyncpg adapter and pg8000 each have their own classes, and dropsafe reads their
extras (backend pid, socket, transaction status), which SQLAlchemy's ``DBAPIConnection``
Protocol does not name. One alias per role says which value a signature takes, where a bare
``Any`` would not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from dropsafe._log import SafeLogger

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect

__all__ = [
    "DBAPIConnection",
    "DBAPICursor",
    "DBAPIParameters",
    "NativeConnection",
    "ask",
    "dialect_says_disconnect",
]

logger = SafeLogger()
_Answer = TypeVar("_Answer")
_Unknown = TypeVar("_Unknown")

#: The connection a pool event or a dialect hook receives (``dbapi_connection``).
DBAPIConnection: TypeAlias = Any
#: The driver's own connection under SQLAlchemy's adapter (``.driver_connection``): an
#: ``asyncpg.Connection`` for asyncpg, the DBAPI connection itself for the others.
NativeConnection: TypeAlias = Any
#: A DBAPI cursor, as ``Dialect.do_execute`` receives it.
DBAPICursor: TypeAlias = Any
#: The parameters a statement is sent with (a sequence or a mapping, or a list of them).
DBAPIParameters: TypeAlias = Any


def ask(question: Callable[[], _Answer], *, unknown: _Unknown, what: str) -> _Answer | _Unknown:
    """Return ``question()``, asked of a connection that may be lost; ``unknown`` if it fails.

    A lost connection fails in whatever way its driver has (its own errors, ``OSError``, an
    ``AttributeError`` on a closed handle): each means "no answer", and the caller takes the
    safe side (no replay, the error stays loud). Logged at debug level, with the traceback.
    """
    try:
        return question()
    except Exception:
        logger.debug("dropsafe could not tell %s", what, exc_info=True)
        return unknown


def dialect_says_disconnect(
    dialect: Dialect, error: BaseException, connection: DBAPIConnection, *, what: str
) -> bool:
    """Whether the dialect's ``is_disconnect`` calls ``error`` a lost connection; unsure: no.

    The dialect's verdict (which a user may have widened) is the last word dropsafe asks for
    when its own reading of the error says nothing; a verdict that raises counts as no.
    """
    return ask(
        lambda: (
            isinstance(error, dialect.loaded_dbapi.Error)
            and bool(dialect.is_disconnect(error, connection, None))
        ),
        unknown=False,
        what=what,
    )
