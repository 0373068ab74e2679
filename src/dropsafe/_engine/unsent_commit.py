"""A COMMIT about to go on a connection known gone: replay the transaction, commit it elsewhere.

Before the COMMIT is sent, the connection's socket is looked at (no round trip): the server's
goodbye or its close already arrived (a terminated backend, a restart), or asyncpg's goodbye
watch saw them. Or the driver refused to send the COMMIT at all (asyncpg, having read the
goodbye in between: `Driver.refused_unsent`). The backend has then exited: nothing it was
sent after can commit, so the transaction certainly did not. The COMMIT is still sent (it
fails at once, with the driver's own error: the one raised if the replay cannot be done), then
the recorded transaction is replayed on a fresh connection under the same verified rules, and
committed there. Never when the connection looked alive and the driver sent the COMMIT: its
bytes may have reached the server, and whether it committed is then unknown (not this
module's to guess). docs/guarantees.md, "A transaction lost before its COMMIT is replayed".
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Literal

from dropsafe._classify import ErrorKind, classify
from dropsafe._drivers.base import Health
from dropsafe._engine.fresh_connection import ask_before_replay, replay_bounded
from dropsafe._engine.replay_refusals import sent_around
from dropsafe._engine.session_state import mark_connection
from dropsafe._engine.xid_in_flight import sent_around_read, with_dropped
from dropsafe._errors import CommitOutcomeUnknown
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe._sqlalchemy_private import switch_connection
from dropsafe.events import TransactionReplayed

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._drivers.base import Driver
    from dropsafe._engine.fresh_connection import FreshConnections
    from dropsafe._engine.transcript import Transcript
    from dropsafe._engine.xid_in_flight import XidInFlight
    from dropsafe.events import Hook

__all__ = ["UnsentCommit"]

logger = SafeLogger()

# What a look at a connection idle in a transaction, every reply read, sees of a backend gone.
_GONE = frozenset({Health.CLOSED, Health.DATA_WAITING})


class UnsentCommit:
    """Wraps one engine's ``do_commit``: a COMMIT on a connection known gone is done elsewhere."""

    def __init__(
        self,
        dialect: Dialect,
        driver: Driver,
        fresh: FreshConnections,
        hooks: tuple[Hook, ...],
        transcript_of: Callable[[Connection], Transcript | None],
        *,
        xid: XidInFlight | None = None,
    ) -> None:
        self._dialect = dialect
        self._driver = driver
        self._fresh = fresh
        self._hooks = hooks
        self._transcript_of = transcript_of
        self._xid = xid  # resolves a COMMIT lost after it was sent, where the xid was read
        # Each recorded checkout's Connection (do_commit is given the checkout alone); weak
        # both ways, gone with the checkout.
        self._connections: weakref.WeakKeyDictionary[object, weakref.ref[Connection]] = (
            weakref.WeakKeyDictionary()
        )

    def note(self, checkout: PoolProxiedConnection, connection: Connection) -> None:
        """Remember which Connection ``checkout`` runs under (a transaction is recorded)."""
        self._connections[checkout] = weakref.ref(connection)

    def wrap_commit(self) -> None:
        """Put a ``do_commit`` on this engine's dialect instance (as replay's ``do_execute``)."""
        dialect = self._dialect
        commit = dialect.do_commit

        def do_commit(dbapi_connection: PoolProxiedConnection) -> None:
            found = self._connections.get(dbapi_connection)
            connection = None if found is None else found()
            transcript = None if connection is None else self._transcript_of(connection)
            if (
                connection is None
                or transcript is None
                or (transcript.refused is not None and transcript.pending is None)
            ):
                commit(dbapi_connection)
                return
            replayable = transcript.refused is None
            gone = replayable and self._gone(dbapi_connection)
            if gone and sent_around(transcript) is not None:
                # Bytes sent around SQLAlchemy since its last statement (a DBAPI commit(),
                # a raw cursor's write): the transcript lacks them, and the app may have
                # committed part of it. Looked at only once the backend is seen gone.
                transcript.refuse("bytes were sent around SQLAlchemy before its COMMIT")
                replayable = gone = False
            # Bytes sent around SQLAlchemy since the last statement (a DBAPI commit(), then a
            # raw cursor's write): the xid read may be an ended transaction's, and resolve
            # nothing. Counted before the COMMIT adds its own.
            around = transcript.pending is not None and sent_around_read(transcript)
            try:
                commit(dbapi_connection)
            except Exception as error:
                if gone or (replayable and self._driver.refused_unsent(error)):
                    # Gone before the COMMIT left, or the driver refused to send it: it did not
                    # commit.
                    self._commit_elsewhere(connection, dbapi_connection, error, transcript, commit)
                    return
                pending = None if around else transcript.pending
                if pending is None or self._xid is None:
                    raise  # it may have reached the server, and nothing can ask about it
                # With the reads dropped before it (the app ended a transaction around
                # SQLAlchemy): if this COMMIT did not commit, they are asked about too.
                pending = with_dropped(pending, transcript)
                if transcript.notifies and not (pending.unflushed or pending.asynchronous):
                    # Its writes may have written no WAL (an UNLOGGED table, a view's trigger
                    # that wrote nothing): its COMMIT then waited for no flush, its NOTIFY was
                    # heard, and a crash may lose the commit record. No read proves WAL.
                    pending = dataclasses.replace(pending, unflushed=True)
                # Sent, and perhaps committed: the server is asked about the xid (or raises).
                if self._xid.resolve(connection, pending, error) == "committed":
                    _drop(dbapi_connection, error)
                    return
                if not replayable:
                    raise  # it did not commit, and cannot be done again
                self._commit_elsewhere(connection, dbapi_connection, error, transcript, commit)
            # A COMMIT that succeeded on a connection seen gone: not possible; nothing to do.

        vars(dialect)["do_commit"] = do_commit

    def _gone(self, checkout: PoolProxiedConnection) -> bool:
        """Whether the socket says the backend already said goodbye or closed (no round trip).

        Bytes waiting count as a goodbye: every reply of the transaction's statements was read
        (a valid transcript means they went through SQLAlchemy, which reads them whole), and a
        backend idle in a transaction sends nothing unasked but its goodbye before it exits
        (FATAL: terminated, idle-in-transaction timeout, recovery conflict, shutdown; or the
        WARNING of a crash); notifications wait for the transaction's end. The close follows
        the goodbye only once the backend has aborted (milliseconds): without this, a COMMIT
        sent in that window failed the request though it could not have committed.
        """
        try:
            return self._driver.probe(checkout.dbapi_connection) in _GONE
        except Exception:  # a look that fails proves nothing: the COMMIT goes as usual
            logger.debug("dropsafe could not look at a connection before COMMIT", exc_info=True)
            return False

    def _commit_elsewhere(  # the commit's connection, error, record and sender
        self,
        connection: Connection,
        checkout: PoolProxiedConnection,
        error: Exception,
        transcript: Transcript,
        commit: Callable[[PoolProxiedConnection], None],
    ) -> None:
        """Replay ``transcript`` on a fresh connection and commit it there; else raise ``error``."""
        text = describe_error(error)
        counts = (len(transcript.statements), transcript.rows, transcript.bytes)

        def refused(reason: str, outcome: Literal["refused", "failed"] = "refused") -> None:
            logger.debug(
                "dropsafe did not replay a transaction at COMMIT (%s): %s", outcome, reason
            )
            emit(self._hooks, TransactionReplayed(text, outcome, *counts, reason=reason))

        lost_state = self._fresh.session_of_lost(checkout, transcript.native)
        if lost_state is None:
            refused("the lost connection's session state is unknown")
            raise error
        try:
            fresh = self._fresh.take(connection, None, error, lost_state, changes=False)
        except Exception:
            refused("no fresh connection could be set up for it", "failed")
            raise
        if fresh is None:
            refused("a fresh connection would not be in the same session state")
            raise error
        switch_connection(connection, None, fresh)
        try:
            difference = ask_before_replay(fresh, lost_state) or replay_bounded(transcript, fresh)
        except Exception as again:  # the original error is the one to raise
            logger.debug("dropsafe's replay of a transaction failed", exc_info=True)
            difference = ("failed", f"the replay failed: {describe_error(again)}")
        if difference is not None:
            self._fresh.leave_dead(connection, None, fresh, error)
            refused(*difference[::-1])
            raise error
        mark_connection(fresh.driver_connection, changes=False)
        try:
            commit(fresh)
        except Exception as again:
            # Its bytes were sent and its xid was not read: lost on the way, it may have
            # committed (the app must not take it for failed and write again). One the server
            # refused (a deferred constraint) is raised as it is.
            if classify(again, during_commit=True) is not ErrorKind.COMMIT_UNKNOWN:
                raise
            reason = "the replay's COMMIT was sent and its reply lost; its xid was not read"
            raise CommitOutcomeUnknown(
                f"the connection failed during COMMIT of a replayed transaction: {reason}",
                xid=None,
                reason=reason,
            ) from again
        logger.debug("dropsafe replayed a transaction and committed it elsewhere: %s", text)
        emit(self._hooks, TransactionReplayed(text, "replayed", *counts))


def _drop(checkout: PoolProxiedConnection, error: Exception) -> None:
    """Invalidate the lost connection of a COMMIT that committed: the pool must not reuse it."""
    try:
        checkout.invalidate(error)
    except Exception:  # a connection that cannot even be closed is gone all the same
        logger.debug("dropsafe could not invalidate a lost connection", exc_info=True)
