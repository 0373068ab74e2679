"""A plain transaction's xid, read in a writing statement's flight; a lost COMMIT resolved by it.

A COMMIT whose reply is lost may or may not have committed; only the transaction's xid lets the
server say which (`dropsafe._commit_truth.resolution`, as for a unit's COMMIT). A unit reads it
in a round trip of its own; a request must not pay one. So the first statement that may write
carries the read in its own flight (`Driver.send_reading_xid`: on psycopg2 a ``DO`` block's
NOTICE in the same query string, on psycopg 3 a pipelined ``SELECT``), until an xid is known.
A lost COMMIT reply is then resolved: committed, the COMMIT returns as if its reply had come;
aborted, the transaction is replayed (verified) on a fresh connection and committed there;
unknown, `CommitOutcomeUnknown`. Why each case is safe: docs/guarantees.md, "A COMMIT lost
outside a unit of work".
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import TYPE_CHECKING

from dropsafe._backoff import sleep_in_greenlet
from dropsafe._classify import ErrorKind, classify, sqlstate_of
from dropsafe._commit_truth.pending_commit import PendingCommit, lsn_number
from dropsafe._commit_truth.resolution import Outcome, resolve_commit
from dropsafe._commit_truth.server_life import UNREADABLE, known_server_life
from dropsafe._commit_truth.server_sql import xid_question
from dropsafe._drivers.base import driver_connection
from dropsafe._engine.server_facts import forget_do_blocks, may_run_do_blocks
from dropsafe._policy import seconds

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Dialect, ExecutionContext

    from dropsafe._commit_truth.flight_xid import FlightXid
    from dropsafe._dbapi import DBAPICursor, NativeConnection
    from dropsafe._drivers.base import Driver, XidQuestion
    from dropsafe._engine.transcript import Transcript
    from dropsafe._engine_state import EngineState
    from dropsafe.events import Hook

__all__ = [
    "XidInFlight",
    "drop_read",
    "may_write",
    "note_sent",
    "sent_around_read",
    "with_dropped",
]

# A text statement that may write: what the server would give an xid for. A SELECT that calls
# a function that writes is not read (its transaction's COMMIT stays unresolvable, as before).
_WRITES = re.compile(r"\s*(?:INSERT|UPDATE|DELETE|MERGE|WITH)\b", re.IGNORECASE)
# A WITH's rowcount is its main statement's: a SELECT's rows count though nothing was written.
_WITH = re.compile(r"\s*WITH\b", re.IGNORECASE)
# Transaction control sent as a statement, alone or among several in one text (ROLLBACK TO a
# savepoint aside): the server's transaction ended there, and the next statement runs in
# another, with another xid; the xid read before is not the one the final COMMIT ends.
_ENDS = re.compile(
    r"(?:^|;)(?:\s|--[^\n\r]*|/\*.*?\*/)*(?:commit|end|abort|prepare\s+transaction"
    r"|rollback(?!\s+(?:work\s+|transaction\s+)?to\b))\b",
    re.IGNORECASE | re.DOTALL,
)
# What a server that hides the WAL position names in its refusal (42501, permission denied).
_WAL_FUNCTION = "pg_current_wal_insert_lsn"
# What PostgreSQL's refusal of the DO block names (42501, in any lc_messages).
_PLPGSQL = "plpgsql"
# A statement that may turn synchronous_commit off after the read: its COMMIT may then not wait
# for its WAL (`PendingCommit.unflushed`). One that names it, or a set_config whose name is not
# a string literal (a bound parameter, a column: `SELECT set_config(%(name)s, ...)` names
# nothing, and ran a crashed unit again, its NOTIFY twice; tests/units/test_flight_xid_attacks.py).
_SYNCHRONOUS_COMMIT = re.compile(r"synchronous_commit|set_config\s*\((?!\s*')", re.IGNORECASE)


def may_write(context: ExecutionContext, statement: str) -> bool:
    """Whether the statement may give its transaction an xid (an INSERT, UPDATE, DELETE, ...).

    Asked of every statement until the xid is read: the compiled statement's flags, else one
    match of the text (a C call).
    """
    # DefaultExecutionContext's flags (the interface declares only some of them).
    return (
        context.isinsert
        or context.isupdate
        or context.isdelete  # type: ignore[attr-defined]
        or _WRITES.match(statement) is not None
    )


def sent_around_read(holder: Transcript | FlightXid) -> bool:
    """Whether the socket sent bytes since the last statement through SQLAlchemy, or may have.

    Once the xid is read, ``holder.sent_after`` is what the socket had sent after each
    statement the engine sent; anything more went around SQLAlchemy (the DBAPI connection's own
    ``commit()`` or ``rollback()``, a raw cursor's write: the server's transaction may have
    ended and another begun, whose COMMIT the read's xid would resolve). Unknown (not TCP, a
    closed socket) counts as sent. One getsockopt (TCP_INFO).
    """
    fd, before = holder.fd, holder.sent_after
    return fd is None or before is None or holder.count_sent(fd) != before


def drop_read(holder: Transcript | FlightXid) -> None:
    """Drop ``holder``'s read, its transaction ended around SQLAlchemy; keep it in ``dropped``.

    The app ended that transaction itself (the DBAPI connection's ``commit()`` or
    ``rollback()``, a ``COMMIT`` statement): it may have committed, part of the work with it.
    A lost COMMIT that did not commit asks about it too (`PendingCommit.earlier`).
    """
    pending = holder.pending
    if pending is not None:
        holder.dropped = (*holder.dropped, pending)
    holder.pending, holder.xid_wanted = None, True


def with_dropped(pending: PendingCommit, holder: Transcript | FlightXid) -> PendingCommit:
    """Return ``pending`` carrying the reads ``holder`` dropped before it (`drop_read`)."""
    dropped = holder.dropped
    if not dropped:
        return pending
    return dataclasses.replace(pending, earlier=(*pending.earlier, *dropped))


def note_sent(holder: Transcript | FlightXid) -> None:
    """Keep what ``holder``'s socket sent so far: a statement through SQLAlchemy just went."""
    fd = holder.fd
    holder.sent_after = None if fd is None else holder.count_sent(fd)


class XidInFlight:
    """One engine's xid reads in a writing statement's flight, and the resolution they allow."""

    def __init__(
        self, dialect: Dialect, driver: Driver, state: EngineState, hooks: tuple[Hook, ...]
    ) -> None:
        self._dialect = dialect
        self._driver = driver
        self._state = state
        self._hooks = hooks
        self._questions: dict[bool, XidQuestion] = {}  # built at the first read
        self._needs_do_blocks = driver.capabilities.xid_read_runs_do_block

    def send(
        self,
        native: NativeConnection,
        statement: str,
        send_text: Callable[[str], None],
        cursor: DBAPICursor,
    ) -> PendingCommit | None:
        """Send ``statement`` (``send_text``) and read the transaction's xid in its flight.

        Returns the COMMIT's pending state, or None: not read, or no xid yet (nothing written).
        """
        if self._needs_do_blocks and not may_run_do_blocks(driver_connection(native)):
            send_text(statement)  # a refused DO block would fail the app's transaction
            return None
        with_wal = self._state.wal_readable  # seen at connect (`server_facts`)
        question = self._questions.get(with_wal)
        if question is None:
            question = self._questions[with_wal] = xid_question(self._dialect, with_wal=with_wal)
        try:
            reading = self._driver.send_reading_xid(send_text, native, statement, question)
        except Exception as exc:
            if with_wal and _WAL_FUNCTION in str(exc):
                # Another host behind the engine's URL hides what the first one showed: the
                # app's statement failed with it, once; the next reads go without it.
                with self._state.lock:
                    self._state.wal_readable = False
            if self._needs_do_blocks and sqlstate_of(exc) == "42501" and _PLPGSQL in str(exc):
                # A role the session's user became a member of (or USAGE revoked) after
                # connect: the app's statement failed with it, once; this connection's next
                # transactions read their xid with the mark (`server_facts._DO_BLOCKS`).
                forget_do_blocks(driver_connection(native))
            raise
        if reading is None:
            return None
        values = reading.values
        if values[0] is None or _ENDS.search(statement) is not None:
            # Nothing written yet, or the server's transaction ended in the statement: the next
            # statement that may write reads.
            return None
        # Learned at connect (`server_facts.learn_session`); unknown, 'committed' is unknown.
        # Kept by the driver's connection (the pool entry's), which an async adapter wraps.
        life = known_server_life(self._state, driver_connection(native))
        return PendingCommit(
            int(values[0]),
            # The server's pid, read with the xid: behind a pooler the driver's is the pooler's
            # (PgBouncer's BackendKeyData), and a fence by it terminated nothing.
            int(values[2] or 0),
            life or UNREADABLE,
            lsn_number(values[3]) if with_wal and len(values) > 3 else 0,  # noqa: PLR2004
            # An xid the read gave before the statement: if the statement changed no row (or
            # its rowcount may count rows it did not write: a WITH), the transaction may write
            # no WAL and its COMMIT then waits for no flush.
            asynchronous=reading.assigned
            and (int(cursor.rowcount) <= 0 or _WITH.match(statement) is not None),
            # Read before the statement (psycopg2, asyncpg), the setting is the one before it: a
            # statement that itself may turn it off is noted as the statements after it are.
            unflushed=values[1] == "off" or _SYNCHRONOUS_COMMIT.search(statement) is not None,
        )

    def note_statement(self, transcript: Transcript | FlightXid, statement: str) -> None:
        """After the read, a statement that names ``synchronous_commit`` may turn it off.

        One that ends the server's transaction (a text ``COMMIT``), a connection found out
        of its transaction before the statement (a COMMIT sent around SQLAlchemy), or a socket
        that sent bytes since the last statement (a DBAPI ``commit()`` then a raw cursor's
        write: in a transaction again, `sent_around_read`) drops the xid read: the next write
        reads its own transaction's (before, a COMMIT that never arrived was resolved by the
        ended one's xid, its later writes acknowledged and missing). The dropped read is kept
        (`drop_read`): the app may have committed it.
        """
        if (
            _ENDS.search(statement) is not None
            or self._ended(transcript)
            or sent_around_read(transcript)
        ):
            drop_read(transcript)
            return
        pending = transcript.pending
        if pending is not None and not pending.unflushed and _SYNCHRONOUS_COMMIT.search(statement):
            transcript.pending = dataclasses.replace(pending, unflushed=True)

    def _ended(self, transcript: Transcript | FlightXid) -> bool:
        """Whether the server's transaction ended before the next statement (around us).

        libpq's status, no round trip.
        """
        native = transcript.native
        if native is None:
            return False
        try:
            return self._driver.transaction_idle(native) is True
        except Exception:  # noqa: BLE001 - a closed connection: its statement fails on its own
            return False

    def resolve(self, connection: Connection, pending: PendingCommit, error: Exception) -> Outcome:
        """Ask the server what became of the COMMIT ``error`` interrupted.

        Returns ``committed`` or ``aborted``; raises `CommitOutcomeUnknown` (from ``error``)
        when it cannot be known, and ``error`` itself when the server refused the COMMIT (a
        deferred constraint: nothing was committed, nothing to ask).
        """
        if classify(error, during_commit=True) is not ErrorKind.COMMIT_UNKNOWN:
            raise error
        policy = self._state.policy
        timeout = 10.0 if policy is None else seconds(policy.unit.commit_status_timeout)
        # No unit's deadline here: a server that cannot be asked is waited for as long as a
        # checkout waits out an outage, and then asked for the usual time.
        outage = 10.0 if policy is None else seconds(policy.connection.connect_wait)
        return resolve_commit(
            connection.engine,
            pending,
            error,
            timeout=timeout,
            deadline=time.monotonic() + outage + timeout,
            hooks=self._hooks,
            sleep=sleep_in_greenlet if self._dialect.is_async else time.sleep,
        )
