"""Putting a fresh connection under a SQLAlchemy Connection whose own was lost.

The fresh connection must be in the lost one's session state (`dropsafe._engine.session_state`
proves it) before a replay sends anything on it; the Connection's Transaction, and the ORM's,
stay as they are (`dropsafe._sqlalchemy_private.switch_connection`). A replay's lock waits are
bounded here too, and a first statement a pooler turned away (it reached no server) is sent
again while the pooler says so (`FreshConnections.send_again`); a replay whose fresh connection
the server ended (`ended_by_the_server`) runs again on another. Why that is safe:
docs/guarantees.md, "A transaction's first statement is replayed, once" and "A fresh
connection lost too".
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Literal

from dropsafe._classify import error_chain, sqlstate_of, turned_away
from dropsafe._drivers import socket_fd
from dropsafe._drivers.deadline import bounded
from dropsafe._engine.server_facts import learned_session, outside_effects
from dropsafe._engine.session_state import (
    give_characteristics,
    mark_connection,
    session_changed,
    session_differs,
    session_used,
    snapshot,
)
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe._sqlalchemy_private import switch_connection

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Connection, Dialect, ExecutionContext
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._dbapi import DBAPICursor, NativeConnection
    from dropsafe._drivers.base import Driver
    from dropsafe._engine.connect_wait import ConnectWait
    from dropsafe._engine.transcript import Transcript
    from dropsafe._engine_state import EngineState

__all__ = [
    "REPLAY_ATTEMPTS",
    "REPLAY_LOCK_TIMEOUT_MS",
    "FreshConnections",
    "ask_before_replay",
    "ended_by_the_server",
    "replay_bounded",
]

logger = SafeLogger()


class FreshConnections:
    """Takes one engine's fresh connections for its replays, in the lost ones' session state."""

    def __init__(
        self, dialect: Dialect, driver: Driver | None, state: EngineState, *, learns: bool
    ) -> None:
        self._dialect = dialect
        self._driver = driver
        self._state = state
        # Whether this engine learns each session's start at connect (`server_facts`): then
        # it is part of the session state compared, and its last item.
        self._learns = learns

    def _state_of(
        self, checkout: PoolProxiedConnection, native: NativeConnection
    ) -> tuple[object, ...] | None:
        """Return what of ``checkout``'s session state is known without a round trip, or None."""
        state = None if self._driver is None else snapshot(self._driver, native)
        if state is None or not self._learns:
            return state
        learned = learned_session(checkout)
        return None if learned is None else (*state, learned)

    def session_of_lost(
        self, checkout: PoolProxiedConnection, native: NativeConnection
    ) -> tuple[object, ...] | None:
        """Return the lost connection's session state as far as it is known; None if unknowable.

        Unknowable once any statement since its connect may have changed it: an earlier
        checkout's ``SET search_path`` (its transaction committed) is still on the connection
        a later checkout gets, and would not be on a fresh one.
        """
        if session_changed(checkout.driver_connection):
            logger.debug(
                "dropsafe will not replay this first statement: a statement since its "
                "connection was made may have changed the session's state"
            )
            return None
        state = self._state_of(checkout, native)
        if state is None:
            logger.debug(
                "dropsafe will not replay this first statement: its connection's "
                "transaction characteristics or session start are unknown"
            )
        return state

    def send_again(
        self,
        connection: Connection,
        context: ExecutionContext,
        send: Callable[[Any], None],
        error: Exception,
        lost_state: tuple[object, ...],
        *,
        changes: bool,
        waits: ConnectWait,
        attempts: list[int],
    ) -> bool:
        """Send the first statement again on a fresh connection; whether it was (`reconnect`).

        A pooler with no server yet (its server restarting) closes the fresh connection before
        it gives the statement to any server: the statement ran nowhere, so it is sent again on
        another fresh connection while the pooler says so, as ``waits`` waits for a connect.
        A fresh connection the server ended while the statement ran (`ended_by_the_server`)
        is replaced too, `REPLAY_ATTEMPTS` fresh connections in all, until the connect wait's
        deadline. ``attempts`` gets one item: the fresh connections it was sent on.
        """
        sent_on: list[PoolProxiedConnection] = []
        attempts[:] = [0]

        def replay() -> bool:
            sent_on.clear()
            fresh_cursor = self.reconnect(connection, context, error, lost_state, changes=changes)
            if fresh_cursor is None:
                return False
            sent_on[:] = [connection.connection]
            attempts[0] += 1
            send(fresh_cursor)
            return True

        def turned_away_again(again: Exception) -> bool:
            if again is error:  # no fresh connection at all: the connects waited already
                return False
            kept = (
                self._driver.last_error_text(sent_on[0].dbapi_connection)
                if sent_on and self._driver is not None
                else ""
            )
            return turned_away(again, kept)

        deadline = waits.deadline()
        while True:
            try:
                return replay()
            except Exception as again:
                if turned_away_again(again):
                    return waits.try_again(replay, again, turned_away_again)
                if not (
                    sent_on
                    and attempts[0] < REPLAY_ATTEMPTS
                    and self._ended(again, sent_on[0], deadline, context)
                ):
                    raise
                logger.debug("dropsafe sends a first statement again: %s", describe_error(again))

    def _ended(
        self,
        again: Exception,
        fresh: PoolProxiedConnection,
        deadline: float | None,
        context: ExecutionContext,
    ) -> bool:
        """Whether a statement lost with ``fresh`` may be sent on another fresh connection now.

        Only when the server ended ``fresh`` (`ended_by_the_server`), the connect wait's
        ``deadline`` (None: connects do not wait) is not over, and the lost statement (the one
        in ``context``) does not name ``pg_terminate_backend``.
        """
        if deadline is None or time.monotonic() >= deadline:
            return False
        if _ENDS_BACKENDS in str(getattr(context, "statement", "")).lower():
            return False  # its 57P01 may be its own doing: pg_terminate_backend(pg_backend_pid())
        dbapi_connection = fresh.dbapi_connection
        kept = (
            ""
            if self._driver is None or dbapi_connection is None
            else self._driver.last_error_text(dbapi_connection)
        )
        return ended_by_the_server(again, kept)

    def replay(
        self,
        connection: Connection,
        context: ExecutionContext,
        lost: tuple[Callable[[Any], None], Exception, tuple[object, ...], Transcript],
        refused: Callable[..., None],
        also_lost: Callable[[Exception, PoolProxiedConnection], bool],
        *,
        waits: ConnectWait,
    ) -> tuple[PoolProxiedConnection, tuple[Literal["refused", "failed"], str] | None, int]:
        """Replay a transaction, then its lost statement, on a fresh connection (another if lost).

        ``lost`` is what was lost: the statement's sender, its error, the lost connection's
        session state, the transaction's transcript. Returns the fresh connection, why the
        replay did not hold (None: it did) and the fresh connections used. Raises the lost
        statement's error when no fresh connection in that session state can be had. A fresh
        connection found lost (``also_lost``) by the replay's first question, before anything
        of the transaction was sent on it, is replaced (a pooled connection the same restart
        ended, a restart right after the connect): its loss cannot be the transaction's doing.
        Lost later, it is replaced only when the server ended it (`ended_by_the_server`), until
        the connect wait's deadline: nothing of it was committed (its COMMIT is not sent), and
        a replayed statement that crashed its backend would not show that error.
        """
        send, error, lost_state, transcript = lost
        deadline = waits.deadline()
        for attempt in range(1, REPLAY_ATTEMPTS + 1):
            try:
                fresh_cursor = self.reconnect(connection, context, error, lost_state, changes=False)
            except Exception:
                refused("no fresh connection could be set up for it", "failed")
                raise
            if fresh_cursor is None:
                refused("a fresh connection would not be in the same session state")
                raise error
            fresh = connection.connection
            asked = False
            try:
                difference = ask_before_replay(fresh, lost_state)
                asked = True
                if difference is None:
                    difference = replay_bounded(transcript, fresh)
                if difference is None:
                    send(fresh_cursor)
            except Exception as again:  # the original error is the one to raise
                logger.debug("dropsafe's replay of a transaction failed", exc_info=True)
                if (
                    attempt < REPLAY_ATTEMPTS
                    and also_lost(again, fresh)
                    and (not asked or self._ended(again, fresh, deadline, context))
                ):
                    continue
                difference = ("failed", f"the replay failed: {describe_error(again)}")
            return fresh, difference, attempt
        raise AssertionError  # the last attempt returns

    def reconnect(
        self,
        connection: Connection,
        context: ExecutionContext,
        error: Exception,
        lost_state: tuple[object, ...],
        *,
        changes: bool,
    ) -> DBAPICursor | None:
        """Put a fresh connection under ``connection``, keeping its Transaction; a new cursor.

        Raises ``error`` when that cannot be done, and returns None when the fresh connection
        is not in ``lost_state`` (`take`).
        """
        fresh = self.take(connection, context, error, lost_state, changes=changes)
        if fresh is None:
            return None
        # The private part (see the module doc): the Connection and the execution context now
        # use the fresh checkout; the Connection's Transaction, and the ORM's, are untouched.
        switch_connection(connection, context, fresh)
        # The lost connection's cursor is closed first: psycopg 3 warns of a server-side
        # cursor (stream_results) deleted while open. Its connection is gone: errors are moot.
        with contextlib.suppress(Exception):
            context.cursor.close()
        cursor = context.create_cursor()
        context.cursor = cursor  # documented; set as SQLAlchemy's FAQ recipe does
        return cursor

    def take(
        self,
        connection: Connection,
        context: ExecutionContext | None,
        error: Exception,
        lost_state: tuple[object, ...],
        *,
        changes: bool,
    ) -> PoolProxiedConnection | None:
        """Invalidate ``connection``'s lost connection; a fresh one in ``lost_state``, or None.

        Raises ``error`` when none can be had, and returns None when the fresh connection,
        after its ``connect`` and ``checkout`` listeners, is not in ``lost_state`` (the lost
        one's session state): it is then left closed under the Connection (`leave_dead`),
        which SQLAlchemy invalidates as after any lost connection; its Transaction must be
        rolled back. ``context`` is None at a COMMIT.
        """
        if not hasattr(connection, "_dbapi_connection") or (
            context is not None and not hasattr(context, "_dbapi_connection")
        ):
            raise error
        # Public: closes the lost connection and checks its pool entry back in (so a pool of
        # one can hand it out again, reconnected); the Transaction stays open.
        connection.invalidate(error)
        try:
            fresh = connection.engine.raw_connection()
        except Exception:  # the lost connection's error is the one to raise
            logger.debug("dropsafe found no fresh connection to replay on", exc_info=True)
            fresh = None
        if fresh is None:
            raise error
        self._state.first_statement_sent(fresh)  # the replay is its first statement
        try:
            given = give_characteristics(self._dialect, connection, fresh)
        except Exception:  # the lost connection's error is the one to raise
            logger.debug("dropsafe could not set up a fresh connection", exc_info=True)
            given = False
        if not given:
            self.leave_dead(connection, context, fresh, error)
            raise error
        native = None if self._driver is None else self._driver.native(fresh.dbapi_connection)
        fresh_state = None if native is None else self._state_of(fresh, native)
        # The pool may hand out another pooled connection, not a new one: what its own
        # checkouts set on it counts as the lost one's would. A statement the whitelist does not
        # admit may read its sequence state (currval, lastval), which no whitelisted statement
        # marks: such a statement is replayed only on a connection that has run nothing.
        if session_changed(fresh.driver_connection) or (
            changes and session_used(fresh.driver_connection)
        ):
            logger.debug(
                "dropsafe will not replay this first statement: the pool's connection for it "
                "has run statements that may have changed its session state"
            )
            self.leave_dead(connection, context, fresh, error)
            return None
        if session_differs(lost_state, fresh_state):
            logger.debug(
                "dropsafe will not replay this first statement: a fresh connection would "
                "run it with other transaction characteristics, session parameters, or a "
                "session that started otherwise (a role's or database's defaults changed)"
            )
            self.leave_dead(connection, context, fresh, error)
            return None
        if changes:
            mark_connection(fresh.driver_connection, changes=True)
        return fresh

    def leave_dead(
        self,
        connection: Connection,
        context: ExecutionContext | None,
        fresh: PoolProxiedConnection,
        error: Exception,
    ) -> None:
        """Leave ``fresh`` closed under ``connection``: SQLAlchemy invalidates it as the lost one.

        The original ``error`` is about to be raised. SQLAlchemy invalidates the Connection's
        connection, and the whole pool if the app's ``handle_error`` listeners ask for it
        (``invalidate_pool_on_disconnect``), only when the Connection is not invalidated
        already: the lost one is, so a connection is put back under it. Closed, nothing of a
        replay on it can commit (the server ends its transaction with it).
        """
        switch_connection(connection, context, fresh)
        try:
            fresh.dbapi_connection.close()  # type: ignore[union-attr] # a checkout has one
        except Exception:  # the error to raise is the original; the Connection still must end
            logger.debug("dropsafe could not close a fresh connection", exc_info=True)
            connection.invalidate(error)


#: Fresh connections one replay may use: another when one is found lost before anything of
#: the transaction was sent on it (a restart after a restart), or was ended by the server
#: while the replay ran (`ended_by_the_server`).
REPLAY_ATTEMPTS = 3

# PostgreSQL's texts for 57P01 (ERRCODE_ADMIN_SHUTDOWN), with libpq's severity in front: the
# FATAL of pg_terminate_backend and a fast shutdown (SIGTERM; src/backend/tcop/postgres.c,
# ProcessInterrupts), and the WARNING of an immediate shutdown (SIGQUIT, PostgreSQL 14+;
# postgres.c, quickdie, PMQUIT_FOR_STOP). psycopg2's exception then carries no SQLSTATE, and
# its connection keeps the text alone (its message, its last notice). PL/pgSQL raises no
# FATAL. lc_messages other than English: not recognised, so not sent again.
_ADMIN_SHUTDOWN_TEXTS = (
    "fatal:  terminating connection due to administrator command",
    "warning:  terminating connection due to immediate shutdown command",
)
# A statement that names it may end its own backend with 57P01: never sent again for that.
_ENDS_BACKENDS = "pg_terminate_backend"


def ended_by_the_server(error: BaseException, kept: str = "") -> bool:
    """Whether the server ended the connection, not the statement it ran: SQLSTATE 57P01.

    57P01 (admin_shutdown) is what a backend sends when it is told to end (SIGTERM: an
    administrator's pg_terminate_backend, a fast shutdown): the statement's
    transaction aborts with it, and nothing the statement does makes its own backend end
    this way (unless it calls pg_terminate_backend on itself). Not 57P02 (crash_shutdown: another
    backend crashed, maybe a replay of this statement) nor a connection closed with no error
    (what a backend the statement crashed leaves behind): the statement could crash the server
    again. Read in ``error``'s chain (asyncpg keeps the server's error as the cause of its
    own), else in the connection's ``kept`` text when no SQLSTATE is in the chain.
    """
    states = {sqlstate_of(current) for current in error_chain(error)} - {None}
    if states:
        return "57P01" in states and "57P02" not in states
    kept = kept.lower()
    return any(text in kept for text in _ADMIN_SHUTDOWN_TEXTS)


# A replayed statement runs this long at most (milliseconds): the old backend of a connection
# lost to a cut the server did not see may hold the transaction's locks until it notices.
REPLAY_LOCK_TIMEOUT_MS = 2000


def ask_before_replay(
    fresh: PoolProxiedConnection, lost_state: tuple[object, ...]
) -> tuple[Literal["refused", "failed"], str] | None:
    """Why ``fresh`` must not replay the lost transaction, or None (one round trip).

    On the replay path only, before the transaction begins: whether the database lets a
    statement act outside its transaction, and whether the session user's role membership is
    still what it was (`outside_effects`). Nothing of the transaction is sent on ``fresh``
    before it.
    """
    learned = lost_state[-1]
    if not isinstance(learned, tuple):  # replay_transaction on: learned at connect, or unknown
        return "refused", "the lost connection's session start is unknown"
    reason = outside_effects(fresh, learned)
    if reason is not None:
        return "refused", reason
    return None


def replay_bounded(
    transcript: Transcript, fresh: PoolProxiedConnection
) -> tuple[Literal["refused", "failed"], str] | None:
    """Replay ``transcript`` on ``fresh``, each statement bounded; why not, or None if it did.

    Asked first: `ask_before_replay`. Each replayed statement gets `REPLAY_LOCK_TIMEOUT_MS`:
    a client-side deadline that shuts the fresh connection's socket down
    (`dropsafe._drivers.deadline`), so that the bound holds whatever the transaction sets (its
    own ``SET LOCAL lock_timeout`` is replayed as it was, and left as it was).
    """
    connection = fresh.dbapi_connection
    if connection is None or socket_fd(connection) is None:
        return "refused", "the replay's waits cannot be bounded (no socket to watch)"
    struck: list[bool] = []

    @contextlib.contextmanager
    def each_statement() -> Iterator[None]:
        deadline = time.monotonic() + REPLAY_LOCK_TIMEOUT_MS / 1000
        with bounded(connection, deadline) as bound:
            try:
                yield
            finally:
                struck.append(bound.expired)

    try:
        difference = transcript.replay_onto(fresh.cursor, each_statement)
    except Exception:
        if any(struck):
            logger.debug("dropsafe's replay of a transaction ran out of time", exc_info=True)
            return "failed", (
                f"a replayed statement ran past {REPLAY_LOCK_TIMEOUT_MS} ms (a lock the old "
                "backend may still hold): the fresh connection was closed"
            )
        raise
    return None if difference is None else ("failed", difference)
