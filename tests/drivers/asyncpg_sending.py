"""Send one statement on an asyncpg connection as SQLAlchemy's cursor does, the xid read or not.

Shared by the tests of asyncpg's xid read in a statement's flight (with and without faults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dropsafe._commit_truth.server_sql import xid_question
from dropsafe._drivers.asyncpg import Asyncpg

if TYPE_CHECKING:
    from collections.abc import Callable

    import sqlalchemy as sa

    from dropsafe._drivers.base import XidReading

ASYNCPG = Asyncpg()


def send_statement(
    sync_connection: sa.Connection,
    statement: str,
    params: Any,
    *,
    read: bool,
    server_side: bool = False,
    many: bool = False,
    before: Callable[[], None] | None = None,
    with_wal: bool = False,
) -> tuple[Any, XidReading | None]:
    """Return the cursor the statement was sent on, and what the read read (None: not asked).

    ``before`` runs right before the cursor sends (a fault switched on at the last moment).
    """
    dbapi_connection = sync_connection.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor(server_side=server_side)

    def send(text: str) -> None:
        if before is not None:
            before()
        if many:
            cursor.executemany(text, params)
        else:
            cursor.execute(text, params)

    if not read:
        send(statement)
        return cursor, None
    question = xid_question(sync_connection.dialect, with_wal=with_wal)
    # As the engine does: asyncpg's own connection.
    native = ASYNCPG.native(dbapi_connection)
    return cursor, ASYNCPG.send_reading_xid(send, native, statement, question)
