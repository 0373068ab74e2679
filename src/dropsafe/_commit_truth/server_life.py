"""Which server, and which life of it: what makes an xid's answer mean something.

An xid means something only on the WAL history that handed it out: a crash restart hands lost
xids out again. Each connection reads, once, what identifies its server's history (system
identifier, checkpointer, ``stats_reset``, timeline: the statement is `SERVER_LIFE_SQL`), and
`ServerLife.same_history` says whether two reads are of one history. Why each part is needed,
and what was verified on real servers: docs/guarantees.md, "How it keeps it". A connection's
read costs a round trip only until one of its engine's servers answered it; then it rides the
first mark (`dropsafe._unit.recording`). The reads live in the engine's `EngineState`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dropsafe._classify import classify
from dropsafe._commit_truth.server_sql import LIFE, LIFE_AND_WAL, one_row
from dropsafe._engine_state import EngineState, state_of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from dropsafe._engine_state import DriverConnection

__all__ = [
    "UNREADABLE",
    "ServerLife",
    "known_server_life",
    "learn_server_life",
    "must_learn_server_life",
    "remember_server_life",
    "text_or_none",
]


@dataclass(frozen=True)
class ServerLife:
    """One WAL history of one cluster, between two crashes (docs/guarantees.md)."""

    system_identifier: str | None
    stats_reset: str | None
    postmaster_start: str | None = None
    checkpointer: str | None = None  # its pid, as text
    timeline: str | None = None  # moved by a promotion (docs/guarantees.md)

    @classmethod
    def read(cls, system_identifier: object, history: object) -> ServerLife:
        """Make a life of the two columns `SERVER_LIFE_SQL` reads (None: unreadable)."""
        parts = [] if history is None else str(history).split("|")
        stats_reset, postmaster_start, checkpointer, timeline = ([*parts, "", "", "", ""])[:4]
        return cls(
            text_or_none(system_identifier),
            stats_reset or None,
            postmaster_start or None,
            checkpointer or None,
            timeline or None,
        )

    @property
    def provable(self) -> bool:
        """Whether this life can prove the same WAL history as another (see `same_history`)."""
        return self.system_identifier is not None and (
            self.stats_reset is not None or self._checkpointer_known
        )

    @property
    def _checkpointer_known(self) -> bool:
        return self.postmaster_start is not None and self.checkpointer is not None

    def same_history(self, other: ServerLife | None) -> bool:
        """Whether no crash happened between these two reads (docs/guarantees.md).

        Not transitive: a stats reset, then a clean restart, make two lives that each match the
        one read between them, not each other (answers are then unknown, never wrong).
        """
        if other is None or not (self.provable and other.provable):
            return False
        if (self.system_identifier, self.timeline) != (other.system_identifier, other.timeline):
            return False
        same_checkpointer = (
            self._checkpointer_known
            and self.postmaster_start == other.postmaster_start
            and self.checkpointer == other.checkpointer
        )
        return same_checkpointer or (
            self.stats_reset is not None and self.stats_reset == other.stats_reset
        )


#: The life of a server that did not say (a fork or proxy that hides the functions).
UNREADABLE = ServerLife(None, None)


def learn_server_life(connection: Connection) -> None:
    """Read the life of ``connection``'s server, once per DBAPI connection, if it must be.

    Called before a unit of work's first statement, so outside any transaction of the
    app (the read is rolled back at the DBAPI level; SQLAlchemy has sent nothing yet).
    Does nothing when the connection's life is known, or when its engine's servers have
    answered the read before: the first mark of the connection reads it then.
    A connection that fails here (a pooler that accepted it but cannot reach the server)
    raises: the unit waits and connects again, as for a refused connect. Any other failure
    (a fork or proxy that hides these functions) makes the connection unprovable.
    """
    if not must_learn_server_life(connection):
        return
    fairy = connection.connection
    wal_readable = True
    try:
        try:
            row = one_row(fairy, LIFE_AND_WAL, rollback="quietly")
        except Exception as exc:
            if classify(exc).retryable:
                raise
            # Perhaps only the WAL position is hidden: the life alone, then.
            wal_readable = False
            row = one_row(fairy, LIFE, rollback="quietly")
        server_life = ServerLife.read(row[0], row[1])
    except Exception as exc:
        if classify(exc).retryable:
            connection.invalidate(exc)  # never back to the pool: it is dead
            raise
        server_life = UNREADABLE
    state = state_of(connection.engine)
    if wal_readable and server_life.provable:
        state.wal_readable = True
    remember_server_life(state, fairy.driver_connection, server_life)


def remember_server_life(
    state: EngineState, driver_connection: DriverConnection, server_life: ServerLife
) -> None:
    """Keep what a connection read of its server's life (its first read, or its first mark)."""
    with contextlib.suppress(TypeError), state.lock:  # TypeError: not weakly referable
        state.server_lives[driver_connection] = server_life
        if server_life.provable:
            # Its engine's new connections read it in their first mark, not on their own.
            # (The engine, not the connection: a server that hides these functions would make
            # the mark fail, and with it the app's transaction.)
            state.lives_answered = True


def must_learn_server_life(connection: Connection) -> bool:
    """Whether `learn_server_life` would read anything (cheap: no I/O, no greenlet needed)."""
    state = state_of(connection.engine)
    if state.lives_answered:  # the usual answer at every verified unit: one read, no lock
        return False  # (read unlocked as under the lock: another thread may change it next)
    driver_connection = connection.connection.driver_connection
    with contextlib.suppress(TypeError), state.lock:  # TypeError: not weakly referable
        return not (driver_connection in state.server_lives or state.lives_answered)
    return True


def known_server_life(state: EngineState, driver_connection: DriverConnection) -> ServerLife | None:
    """Return what was read for this driver connection; None: not read yet (read it now)."""
    with contextlib.suppress(TypeError), state.lock:
        life = state.server_lives.get(driver_connection)
        return life if isinstance(life, ServerLife) else None
    return UNREADABLE  # not weakly referable: never remembered, never read in a mark


def text_or_none(value: object) -> str | None:
    """Return a column read from the server as text, None staying None."""
    return None if value is None else str(value)
