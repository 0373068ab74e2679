"""A COMMIT about to be sent, as the mark read it: what a lost reply is resolved by.

Filled by `dropsafe._unit.recording`, carried by the attempt's tracker, read by the resolution
and the failover audit (docs/guarantees.md, "Verified commits").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dropsafe._verdicts import kept_by_text

if TYPE_CHECKING:
    import weakref

    from sqlalchemy.engine import Engine

    from dropsafe._commit_truth.server_life import ServerLife

__all__ = ["PendingCommit", "lsn_number", "may_notify"]


@dataclass(frozen=True)
class PendingCommit:
    """A COMMIT that was about to be sent: its xid, its backend and its server's life.

    ``wal_lsn`` is the server's WAL insert position read in the same statement, as a number
    (0: not read): the commit record lies at or after it. ``asynchronous``: the mark assigned
    the xid with ``synchronous_commit`` off (the transaction had none: it wrote nothing).
    """

    xid: int
    backend_pid: int
    server_life: ServerLife
    wal_lsn: int = 0
    #: The engine it went through, when not the unit's own (a unit over several engines):
    #: a weak reference, since the failover audit keeps pending commits per engine.
    engine_ref: weakref.ref[Engine] | None = field(default=None, compare=False, repr=False)
    asynchronous: bool = False
    #: The transaction had its xid and its COMMIT may wait for no WAL flush: ``synchronous_commit``
    #: off, or a transaction that may notify and may have written no WAL (`may_notify`): its
    #: commit record may be lost in a crash after listeners heard its NOTIFYs
    #: (`dropsafe._commit_truth.resolution`).
    unflushed: bool = False
    #: Xids read earlier in the same SQLAlchemy transaction and dropped: the server's
    #: transaction ended under it, around SQLAlchemy (the DBAPI connection's own ``commit()``
    #: or ``rollback()``, a ``COMMIT`` statement), and another began. Where this COMMIT did
    #: not commit, the resolution asks about them too: one that committed made part of the
    #: work durable, and it must not run again (`dropsafe._commit_truth.resolution`).
    earlier: tuple[PendingCommit, ...] = field(default=(), compare=False, repr=False)


def lsn_number(text: object) -> int:
    """Return a ``pg_lsn`` read as text (``16/B374D848``) as a number; 0 for None."""
    if text is None:
        return 0
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


# A statement that may notify: its text says so (NOTIFY, pg_notify(), a DO block or a WITH that
# does either; a function of the database's own is asked about by the resolution). Verdicts by
# text, as `dropsafe._engine.session_state`'s: an app sends few distinct texts, and a search per
# statement costs a microsecond where a dictionary read costs tens of nanoseconds. Bounded.
_NOTIFY = re.compile("notify", re.IGNORECASE).search
_NOTIFY_VERDICTS: dict[str, bool] = {}


@kept_by_text(_NOTIFY_VERDICTS)
def may_notify(statement: str) -> bool:
    """Whether ``statement`` may queue a notification (its text names ``notify``).

    PostgreSQL flushes a commit record only after WAL the transaction wrote itself (xact.c,
    ``RecordTransactionCommit``): a transaction whose writes wrote none (an UNLOGGED table, a
    trigger that wrote nothing, an xid assigned by a read) delivers its notifications before a
    crash may lose its commit. docs/guarantees.md, "A unit that may notify".
    """
    return _NOTIFY(statement) is not None
