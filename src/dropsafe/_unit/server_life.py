"""Which server, and which life of it: what makes an xid's answer mean something.

An xid means something only on the WAL history that handed it out. After
a crash restart (any backend killed hard: the postmaster resets them all and replays WAL) the
WAL still in memory is gone, the postmaster start time does not move, and the lost xids are
handed out again: "committed" may then be a newer transaction's. So each connection reads once,
before the first unit of work it runs, what identifies its server's history:

- ``pg_control_system().system_identifier``: set by initdb, shared by a primary and its
  standbys, different on any other cluster;
- the checkpointer process: ``pg_postmaster_start_time()`` and the checkpointer's pid. A crash
  restart ends every child of the postmaster and starts new ones (new pids), keeping the
  start time; a clean restart moves the start time. No routine command (a stats reset, a
  configuration reload, CHECKPOINT, VACUUM) touches either. A role without
  ``pg_read_all_stats`` sees other processes' pids but not their type, so the checkpointer is
  read as the oldest process with neither a database nor a user (checkpointer, background
  writer, WAL writer, autovacuum launcher: PostgreSQL starts the checkpointer first). The start
  time tells apart two servers whose pids are equal (containers: each its own pid namespace,
  and a restarted one hands out the same pids again);
- ``pg_stat_bgwriter.stats_reset``: PostgreSQL resets its shared statistics at the end of every
  crash recovery (and a standby made by ``pg_basebackup`` starts with its own), but keeps them
  across a clean restart, after which no xid is reused (the shutdown checkpoint records the next
  one). An administrator's ``pg_stat_reset_shared('bgwriter')`` moves it too;
- the timeline: the newer of the last checkpoint's and the one recovery ended on (a promotion
  moves the second at once, the first only when its checkpoint ends). A standby copied from a
  cleanly stopped primary (a cold copy, a snapshot of a stopped server) restores the primary's
  statistics, ``stats_reset`` included; promoted, it hands out again the xids the old primary
  gave after the copy, but on a new timeline.

Two reads are of the same history when their system identifiers and timelines are equal and
either their checkpointers are the same process (no crash since: the start time and pid are
equal) or their ``stats_reset`` are equal (no crash since, perhaps a clean restart). A crash
moves both, so it is always seen; a stats reset or a clean restart moves only one. Only both at
once between a COMMIT and its resolution (a reset, then a clean restart) make a history look
new: the answer is then unknown (or aborted where that is proven anyway), never a wrong
"committed". A promotion always makes a history new.
Verified on PostgreSQL 15 as a role without privileges (tests/integration/test_commit_truth.py):
a backend SIGKILLed, an immediate stop, a fast restart, ``pg_stat_reset*``, ``pg_reload_conf``;
a promoted cold copy (tests/integration/test_commit_truth_failover.py).
All of it is readable by any role.

Reading it costs a round trip only on an engine's first connections: once one of its servers has
answered it, each new connection reads it in its first xid mark instead (`dropsafe._unit.recording`,
the same statement, no round trip of its own).

The same first read tries the WAL insert position (`WAL_POSITION_SQL`): only an engine whose
server answered it has every xid mark read it too (for `dropsafe._unit.failover_audit`), so a server
that hides it (a fork without PostgreSQL's WAL) never fails an app's transaction.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dropsafe._classify import classify
from dropsafe._process import renew_lock_in_child

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = [
    "SERVER_LIFE_SQL",
    "WAL_POSITION_SQL",
    "ServerLife",
    "doubt_server_life",
    "learn_server_life",
    "must_learn_server_life",
    "remember_server_life",
    "server_life_of",
    "text_or_none",
    "wal_position_readable",
]

#: Two columns that identify a server's life, for a SELECT list (`ServerLife.read` parses
#: them): the system identifier, and ``stats_reset|postmaster start|checkpointer pid|timeline``.
SERVER_LIFE_SQL = (
    "(SELECT system_identifier::text FROM pg_control_system()), "
    "concat((SELECT stats_reset FROM pg_stat_bgwriter), '|', pg_postmaster_start_time(), '|', "
    "(SELECT min(pid) FROM pg_stat_get_activity(NULL) WHERE datid IS NULL AND usesysid IS NULL), "
    "'|', GREATEST((SELECT timeline_id FROM pg_control_checkpoint()), "
    "(SELECT min_recovery_end_timeline FROM pg_control_recovery())))"
)


#: The WAL insert position, for a SELECT list: a lower bound of a coming commit record's LSN.
#: A standby has none (the function would raise there).
WAL_POSITION_SQL = (
    "CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END"
)


@dataclass(frozen=True)
class ServerLife:
    """One WAL history of one cluster, between two crashes (see the module's docstring)."""

    system_identifier: str | None
    stats_reset: str | None
    postmaster_start: str | None = None
    checkpointer: str | None = None  # its pid, as text
    timeline: str | None = None  # moved by a promotion (see the module's docstring)

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
        """Whether no crash happened between these two reads (see the module's docstring).

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


_UNREADABLE = ServerLife(None, None)


class _ServerLives:
    """Each connection's server's life, read once when it opens.

    Held weakly by the driver's own connection object (SQLAlchemy's asyncio adapters cannot be
    weakly referenced, the connections they adapt can), so nothing outlives the pool.
    """

    def __init__(self) -> None:
        self._by_connection: weakref.WeakKeyDictionary[Any, ServerLife] = (
            weakref.WeakKeyDictionary()
        )
        # Engines one of whose servers answered the read: their new connections read it in
        # their first mark. (The engine, not the connection: a server that hides these
        # functions would make the mark fail, and with it the app's transaction.)
        self._answered: weakref.WeakSet[Engine] = weakref.WeakSet()
        # Engines one of whose servers answered the WAL position: their marks read it.
        self._wal_readable: weakref.WeakSet[Engine] = weakref.WeakSet()
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork

    def learn(self, connection: Connection) -> None:
        """Read the life of ``connection``'s server, once per DBAPI connection, if it must be.

        Called before a unit of work's first statement, so outside any transaction of the
        app (the read is rolled back at the DBAPI level; SQLAlchemy has sent nothing yet).
        Does nothing when the connection's life is known, or when its engine's servers have
        answered the read before: the first mark of the connection reads it then.
        A connection that fails here (a pooler that accepted it but cannot reach the server)
        raises: the unit waits and connects again, as for a refused connect. Any other failure
        (a fork or proxy that hides these functions) makes the connection unprovable.
        """
        if not self.must_learn(connection):
            return
        fairy = connection.connection
        driver_connection = fairy.driver_connection
        dbapi_connection: Any = fairy.dbapi_connection
        wal_readable = True
        try:
            try:
                row = _read_one(dbapi_connection, f"SELECT {SERVER_LIFE_SQL}, {WAL_POSITION_SQL}")
            except Exception as exc:
                if classify(exc).retryable:
                    raise
                # Perhaps only the WAL position is hidden: the life alone, then.
                wal_readable = False
                row = _read_one(dbapi_connection, f"SELECT {SERVER_LIFE_SQL}")
            server_life = ServerLife.read(row[0], row[1])
        except Exception as exc:
            if classify(exc).retryable:
                connection.invalidate(exc)  # never back to the pool: it is dead
                raise
            server_life = _UNREADABLE
        if wal_readable and server_life.provable:
            with self._lock:
                self._wal_readable.add(connection.engine)
        self.remember(connection.engine, driver_connection, server_life)

    def remember(self, engine: Engine, driver_connection: object, server_life: ServerLife) -> None:
        with contextlib.suppress(TypeError), self._lock:
            self._by_connection[driver_connection] = server_life
            if server_life.provable:
                self._answered.add(engine)

    def must_learn(self, connection: Connection) -> bool:
        """Whether `learn` would read anything (cheap: no I/O, no greenlet needed)."""
        driver_connection = connection.connection.driver_connection
        with contextlib.suppress(TypeError), self._lock:  # TypeError: not weakly referable
            return not (
                driver_connection in self._by_connection or connection.engine in self._answered
            )
        return True

    def doubt(self, engine: Engine) -> None:
        """Make new connections read the life on their own again: a mark could not read it."""
        with self._lock:
            self._answered.discard(engine)
            self._wal_readable.discard(engine)

    def wal_readable(self, engine: Engine) -> bool:
        return engine in self._wal_readable

    def of(self, driver_connection: object) -> ServerLife | None:
        with contextlib.suppress(TypeError), self._lock:
            return self._by_connection.get(driver_connection)
        return _UNREADABLE  # not weakly referable: never remembered, never read in a mark


_SERVER_LIVES = _ServerLives()


def learn_server_life(connection: Connection) -> None:
    """Read the life of ``connection``'s server if it is not known yet (see the module doc)."""
    _SERVER_LIVES.learn(connection)


def server_life_of(driver_connection: object) -> ServerLife | None:
    """Return what was read for this driver connection; None: not read yet (read it now)."""
    return _SERVER_LIVES.of(driver_connection)


def must_learn_server_life(connection: Connection) -> bool:
    """Whether `learn_server_life` has anything to read on ``connection`` (no I/O)."""
    return _SERVER_LIVES.must_learn(connection)


def doubt_server_life(engine: Engine) -> None:
    """Make ``engine``'s new connections read their server's life on their own again."""
    _SERVER_LIVES.doubt(engine)


def remember_server_life(engine: Engine, driver_connection: object, life: ServerLife) -> None:
    """Keep what a connection's first mark read of its server's life (see the module doc)."""
    _SERVER_LIVES.remember(engine, driver_connection, life)


def wal_position_readable(engine: Engine) -> bool:
    """Whether ``engine``'s marks read the WAL position (a server of it answered it)."""
    return _SERVER_LIVES.wal_readable(engine)


def _read_one(dbapi_connection: Any, statement: str) -> Any:  # noqa: ANN401 - a DBAPI row
    """Run ``statement`` outside any transaction of the app's (rolled back); return its row."""
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
            return cursor.fetchone()
        finally:
            cursor.close()
    finally:
        with contextlib.suppress(Exception):
            dbapi_connection.rollback()


def text_or_none(value: object) -> str | None:
    """Return a column read from the server as text, None staying None."""
    return None if value is None else str(value)
