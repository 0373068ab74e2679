"""A transaction's first statement, lost with its connection before any reply, is sent again.

Nothing of the app's was on that connection yet, so dropsafe puts a fresh connection in the
same session state under the SQLAlchemy Connection (its Transaction and the ORM's kept) and
sends the statement once more. Why that is safe, what is refused, the opt-outs and the two
private SQLAlchemy attributes it needs: docs/guarantees.md, "A transaction's first statement is
replayed, once". The session-state proof: `dropsafe._engine.session_state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import weakref
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy.engine.interfaces import ExecuteStyle

from dropsafe._classify import ErrorKind, classify, sqlstate_of
from dropsafe._dbapi import ask
from dropsafe._drivers import driver_for, is_supported, socket_fd_of, tcp_bytes_sent
from dropsafe._engine.session_state import (
    give_characteristics,
    mark_connection,
    may_change_session,
    session_changed,
    session_differs,
    session_used,
    snapshot,
)
from dropsafe._engine.transcript import Transcript, refusal_of_text
from dropsafe._engine_state import Unsent
from dropsafe._errors import ConfigurationError
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe._sqlalchemy_private import switch_connection
from dropsafe.events import FirstStatementReplayed, TransactionReplayed

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection, Dialect, ExecutionContext
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._dbapi import DBAPICursor, DBAPIParameters, NativeConnection
    from dropsafe._engine_state import EngineState
    from dropsafe._policy import PoolPolicy
    from dropsafe.events import Hook

__all__ = ["OPT_OUT", "FirstStatementReplay"]

logger = SafeLogger()

#: The execution option that opts a statement (or a Connection, an engine) out of the replay.
OPT_OUT = "dropsafe_replay"

# insertmanyvalues (the third style) sends batches on a cursor SQLAlchemy holds itself.
_REPLAYABLE_STYLES = frozenset({ExecuteStyle.EXECUTE, ExecuteStyle.EXECUTEMANY})


def _timed_out(error: BaseException) -> bool:
    """Whether the connection was lost to a timeout: anywhere in the chain, by type or text."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TimeoutError, asyncio.TimeoutError)) or (
            isinstance(current, OSError) and current.errno == errno.ETIMEDOUT
        ):
            return True
        if "timed out" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


# What a server sends as it ends a connection, the statement not run: a terminated backend or a
# fast or immediate shutdown, a crash of another backend, an idle session timed out.
_CONNECTION_ENDED = frozenset({"57P01", "57P02", "25P03", "57P05"})


def _check_opt_out(options: Mapping[str, object]) -> None:
    """Raise unless the opt-out, if given, is True or False.

    SQLAlchemy does not look at options it does not know, so a ``dropsafe_replay=0`` or
    ``"false"`` would be neither honoured nor refused: the statement the app meant to opt out
    would be replayed. It is refused at the statement, before anything is sent.
    """
    value = options.get(OPT_OUT, True)
    if value is not True and value is not False:
        raise ConfigurationError(f"execution option {OPT_OUT} must be True or False, not {value!r}")


def _mark(checkout: PoolProxiedConnection, *, changes: bool) -> None:
    """Note on ``checkout``'s pool entry that it ran a statement, and one that ``changes``."""
    try:
        _ = checkout.info  # only to tell the first connect's ad hoc connection
    except NotImplementedError:  # the ad hoc connection of a first connect has no pool entry
        return
    mark_connection(checkout.driver_connection, changes=changes)


class FirstStatementReplay:
    """Sends a transaction's first statement again, on one engine, when its connection is lost."""

    def __init__(
        self, policy: PoolPolicy, hooks: tuple[Hook, ...], dialect: Dialect, state: EngineState
    ) -> None:
        # The driver must say, before the statement is sent, whether a transaction is open
        # on its connection, and after an error whether the connection is gone, and tell a
        # lost connection from a timed-out one (`Capabilities.replays_first_statement`).
        self._driver = driver_for(dialect) if is_supported(str(dialect.driver)) else None
        self._enabled = (
            policy.replay_first_statement
            and self._driver is not None
            and self._driver.capabilities.replays_first_statement
        )
        self._hooks = hooks
        self._dialect = dialect
        # The engine's checkouts whose first statement is not sent yet (no lock: a checkout is
        # used by one thread or task at a time, and a single insertion or removal is atomic).
        self._state = state
        self._policy = policy
        # Each SQLAlchemy root Transaction's record, for a replay past its first statement:
        # gone with the Transaction (its COMMIT or ROLLBACK ends it; the record holds no
        # reference to it, so that it can be collected).
        self._transcripts: weakref.WeakKeyDictionary[object, Transcript] = (
            weakref.WeakKeyDictionary()
        )
        self._records = self._enabled and policy.replay_transaction
        self._caps = (
            int(policy.replay_max_statements),
            int(policy.replay_max_rows),
            int(policy.replay_max_bytes),
        )

    @property
    def enabled(self) -> bool:
        """Whether this engine replays first statements (its policy and driver allow it)."""
        return self._enabled

    def on_checked(self, checkout: PoolProxiedConnection, native: NativeConnection) -> None:
        """Mark ``checkout``'s next statement as its first; called by the checkout check.

        Called last of dropsafe's checkout work (the liveness ping, if any, has been paid): what
        is sent from here to the first statement is the app's (see _driver_busy).
        """
        fd = None if native is None or self._driver is None else socket_fd_of(self._driver, native)
        unsent = Unsent(native, fd, None if fd is None else tcp_bytes_sent(fd))
        try:  # not contextlib.suppress: this runs at every checkout
            self._state.first_statements[checkout] = unsent
        except TypeError:  # not weakly referable
            return

    def wrap_execute(self) -> None:
        """Put replaying ``do_execute*`` methods on this engine's dialect instance (not its class).

        The dialect's methods, not SQLAlchemy's ``do_execute`` events: a listener of those that
        returns True stops the listeners after it, so dropsafe's (added first, at harden())
        would hide every first statement from the app's own listeners (SQLAlchemy's
        DialectEventTest shows it). The dialect's method runs after every listener, as the
        one that sends the statement; whatever method the instance has now runs inside.
        """
        if not self._enabled:
            return
        dialect = self._dialect
        execute, execute_no_params, executemany = (
            dialect.do_execute,
            dialect.do_execute_no_params,
            dialect.do_executemany,
        )

        def do_execute(
            cursor: DBAPICursor,
            statement: str,
            parameters: DBAPIParameters,
            context: ExecutionContext | None = None,
        ) -> None:
            self._send(
                cursor, statement, context, lambda on: execute(on, statement, parameters, context)
            )

        def do_execute_no_params(
            cursor: DBAPICursor,
            statement: str,
            context: ExecutionContext | None = None,
        ) -> None:
            self._send(
                cursor, statement, context, lambda on: execute_no_params(on, statement, context)
            )

        def do_executemany(
            cursor: DBAPICursor,
            statement: str,
            parameters: DBAPIParameters,
            context: ExecutionContext | None = None,
        ) -> None:
            self._send(
                cursor,
                statement,
                context,
                lambda on: executemany(on, statement, parameters, context),
            )

        # Documented Dialect methods, replaced on this instance only (as do_rollback is by
        # quiet_rollback): attributes of the instance shadow the class's methods, so other
        # engines and the dialect class are untouched.
        vars(dialect).update(
            do_execute=do_execute,
            do_execute_no_params=do_execute_no_params,
            do_executemany=do_executemany,
        )

    # -- sending, and sending again -------------------------------------------------------------

    def _send(
        self,
        cursor: DBAPICursor,
        statement: str,
        context: ExecutionContext | None,
        send: Callable[[Any], None],
    ) -> None:
        """Send the statement; if it may be replayed and its connection is lost, replay it."""
        if context is not None:
            _check_opt_out(context.execution_options)
        connection = None if context is None else context.root_connection
        if context is None or connection is None:
            send(cursor)
            return
        checkout = connection.connection
        changes = may_change_session(statement)
        try:
            pending = self._state.first_statement_sent(checkout)
            if pending is None:
                # Only a checkout's first transaction is recorded: it alone is proven to start
                # with nothing of the app's on the connection.
                transcript = self._transcript_of(connection) if self._records else None
                if transcript is None:
                    send(cursor)
                else:
                    self._send_later(connection, context, statement, send, cursor, transcript)
                return
            refusal = self._refusal(connection, context, statement, checkout, pending)
            if refusal is not None:
                logger.debug("dropsafe will not replay this first statement: %s", refusal)
                if self._records:  # kept to say why, should the transaction lose its connection
                    self._begin_transcript(
                        connection, context, statement, send, pending, refusal=refusal
                    )
                send(cursor)
                return
            self._send_first(connection, context, send, cursor, pending, changes=changes)
            if self._records:
                self._begin_transcript(connection, context, statement, send, pending)
        finally:
            # Whether it ran or failed: a session advisory lock outlives the failed transaction
            # that took it. (A replay marks its fresh connection itself.)
            _mark(checkout, changes=changes)

    def _send_first(
        self,
        connection: Connection,
        context: ExecutionContext,
        send: Callable[[Any], None],
        cursor: DBAPICursor,
        pending: Unsent,
        *,
        changes: bool,
    ) -> None:
        """Send a first statement that may be replayed; replay it if its connection is lost.

        ``changes``: whether the statement may change its connection's session state.
        """
        try:
            send(cursor)
        except Exception as exc:
            if not self._lost(exc, connection.connection):
                raise
            lost_state = self._session_of_lost(connection.connection, pending.native)
            if lost_state is None:
                raise
            text = describe_error(exc)
            try:
                fresh_cursor = self._reconnect(
                    connection, context, exc, lost_state, changes=changes
                )
                if fresh_cursor is not None:
                    send(fresh_cursor)
            except Exception as again:  # raised as usual; said, so that operators see it
                failed = describe_error(again)
                logger.debug("dropsafe's replay of a first statement failed: %s", failed)
                emit(self._hooks, FirstStatementReplayed(text, replay_error=failed))
                raise
            if fresh_cursor is None:  # not the same session: not replayed, nothing to say
                raise
            logger.debug("dropsafe replayed a first statement on a fresh connection: %s", text)
            emit(self._hooks, FirstStatementReplayed(text))

    def _session_of_lost(
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
        state = None if self._driver is None else snapshot(self._driver, native)
        if state is None:
            logger.debug(
                "dropsafe will not replay this first statement: its connection's "
                "transaction characteristics are unknown"
            )
        return state

    def _refusal(
        self,
        connection: Connection,
        context: ExecutionContext,
        statement: str,
        checkout: PoolProxiedConnection,
        pending: Unsent,
    ) -> str | None:
        """Why this first statement must not be replayed, or None.

        It runs at every first statement: no call here that the check does not need (the
        calls a healthy request pays are counted, tests/engine/test_checkout_scale.py).
        """
        style = getattr(context, "execute_style", None)
        if context.execution_options.get(OPT_OUT, True) is False:  # other values: _check_opt_out
            reason = f"{OPT_OUT}=False"
        elif style not in _REPLAYABLE_STYLES:
            reason = f"execute style {getattr(style, 'name', style)}"
        elif ";" in statement.strip().rstrip(";"):
            # Several statements in one string may hold a COMMIT of their own.
            reason = "the text may hold several statements"
        elif not connection.in_transaction():
            reason = "no transaction"
        elif checkout.dbapi_connection is None:
            reason = "no connection"
        else:
            try:
                autocommit = self._dialect.detect_autocommit_setting(checkout.dbapi_connection)
            except Exception:  # a connection we cannot read is not replayed
                logger.debug("dropsafe could not tell a connection's autocommit", exc_info=True)
                return "its autocommit setting is unknown"
            if autocommit:
                return "autocommit: the statement may have committed"
            return self._driver_busy(pending)
        return reason

    def _driver_busy(self, pending: Unsent) -> str | None:
        """Why the driver's connection already holds work of the app's, or None if idle.

        SQLAlchemy's first statement on a checkout is not the connection's first: the app may
        have written through the driver's own connection (a cursor of its own, a COPY, an
        ``after_begin`` or ``before_cursor_execute`` listener, SET TRANSACTION) before it. That
        work is in the transaction the driver opened, and a replay on a fresh connection would
        drop it while the commit succeeds. The driver's local transaction status tells, without
        a round trip; where it cannot be read, nothing is replayed.
        """
        native, driver = pending.native, self._driver
        if native is None or driver is None:
            return "the driver's connection is not one dropsafe can read"
        try:
            idle = driver.transaction_idle(native)
        except Exception:  # a state we cannot read is not replayed (no call more: see _refusal)
            logger.debug("dropsafe could not tell a transaction's status", exc_info=True)
            idle = None
        if idle is None:
            return "the driver's transaction status is unknown"
        if not idle:
            return "a transaction was already open on the driver's connection"
        # Work committed through the driver's connection (a session SET, then commit) leaves
        # it idle: only the bytes its socket sent since checkout tell. The same fd as at
        # checkout: a driver that closed it since is not idle (above).
        sent = None if pending.fd is None else tcp_bytes_sent(pending.fd)
        if sent is None or pending.sent is None:
            return "the bytes sent on its socket since checkout are unknown (not TCP?)"
        if sent != pending.sent:
            return f"the driver's connection sent {sent - pending.sent} bytes since checkout"
        return None

    def _lost(self, error: Exception, checkout: PoolProxiedConnection) -> bool:
        """Whether ``error`` says the connection was lost before the server replied.

        An error with a SQLSTATE is the server's reply, unless it is one of those a server sends
        as it ends the connection: an error the server answered is never replayed, whatever
        the dialect's ``is_disconnect`` (which a user may have widened) says of it. A connection
        that timed out (``tcp_user_timeout``, keepalives: the peer went silent) is not replayed
        either: the server may still hold the transaction, and the locks its first statement
        took, until it notices the client is gone (hours, with its default keepalives); a
        replay could wait on them that long, and a fresh connect on a path that is down would
        only add its own timeout to the app's wait.
        """
        if _timed_out(error) or not self._gone(checkout):
            return False
        state = sqlstate_of(error)
        if state is not None:
            return state in _CONNECTION_ENDED or state.startswith("08")
        if classify(error) is ErrorKind.DISCONNECT:
            return True
        dialect = self._dialect
        return ask(  # an unsure verdict is no lost connection
            lambda: (
                isinstance(error, dialect.loaded_dbapi.Error)
                and bool(dialect.is_disconnect(error, checkout, None))
            ),
            unknown=False,
            what="whether a statement's connection was lost",
        )

    def _gone(self, checkout: PoolProxiedConnection) -> bool:
        """Whether the driver found its connection lost: an error alone does not tell.

        A server answers SQLSTATE 08001 on a healthy connection when dblink or postgres_fdw
        cannot reach their remote; sent again, such a statement would run twice.
        """
        driver = self._driver
        native = None if driver is None else driver.native(checkout.dbapi_connection)
        if native is None or driver is None:
            return False
        # An unsure verdict is no lost connection.
        return ask(
            lambda: driver.gone(native) is True,
            unknown=False,
            what="whether a driver lost its connection",
        )

    def _reconnect(
        self,
        connection: Connection,
        context: ExecutionContext,
        error: Exception,
        lost_state: tuple[object, ...],
        *,
        changes: bool,
    ) -> DBAPICursor | None:
        """Put a fresh connection under ``connection``, keeping its Transaction; a new cursor.

        Raises ``error`` when that cannot be done, and returns None when the fresh connection,
        after its ``connect`` and ``checkout`` listeners, is not in ``lost_state`` (the lost
        one's session state): the Connection is then invalidated, as after any lost
        connection, and its Transaction must be rolled back.
        """
        if not hasattr(connection, "_dbapi_connection") or not hasattr(
            context, "_dbapi_connection"
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
            fresh.close()  # its characteristics are reset as it goes back to the pool
            raise error
        native = None if self._driver is None else self._driver.native(fresh.dbapi_connection)
        fresh_state = (
            None if native is None or self._driver is None else snapshot(self._driver, native)
        )
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
            fresh.close()
            return None
        if session_differs(lost_state, fresh_state):
            logger.debug(
                "dropsafe will not replay this first statement: a fresh connection would "
                "run it with other transaction characteristics or session parameters"
            )
            fresh.close()  # back to the pool, as any connection the app is done with
            return None
        if changes:
            mark_connection(fresh.driver_connection, changes=True)
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

    # -- the transaction past its first statement ---------------------------------------------

    def _transcript_of(self, connection: Connection) -> Transcript | None:
        """Return what ``connection``'s transaction recorded, if anything."""
        transaction = connection.get_transaction()
        return None if transaction is None else self._transcripts.get(transaction)

    def _begin_transcript(
        self,
        connection: Connection,
        context: ExecutionContext,
        statement: str,
        send: Callable[[Any], None],
        pending: Unsent,
        *,
        refusal: str | None = None,
    ) -> None:
        """Start recording the transaction whose first statement was just sent (or replayed).

        With a ``refusal``, before it is sent: nothing is recorded, the reason is kept.
        """
        policy, driver = self._state.policy, self._driver
        if driver is None or policy is None:
            return
        if policy.connection.pooler is not None and refusal is None:
            # A pooler's sessions are its own: what a fresh client connection lands on, and
            # whether the lost one's server transaction has ended, are not proven.
            refusal = f"behind a pooler (ConnectionPolicy.pooler={policy.connection.pooler!r})"
        checkout = connection.connection
        native, fd = pending.native, pending.fd  # read at checkout, unless since replayed
        if native is not driver.native(checkout.dbapi_connection):
            native = driver.native(checkout.dbapi_connection)
            fd = None if native is None else socket_fd_of(driver, native)
        transaction = connection.get_transaction()
        if transaction is None:  # autocommit: nothing to replay
            return
        transcript = Transcript(native, fd, self._caps)
        self._transcripts[transaction] = transcript
        if refusal is None:
            self._record(transcript, context, statement, send)
        else:
            transcript.refuse(refusal)

    def _record(
        self,
        transcript: Transcript,
        context: ExecutionContext,
        statement: str,
        send: Callable[[Any], None],
    ) -> None:
        """Record a statement just sent; the app reads its result through the recording."""
        reason = _statement_refusal(context, statement)
        if reason is not None:
            transcript.refuse(reason)
            return
        reader = transcript.record(send, context.cursor, _size(statement, context))
        if reader is not None:
            context.cursor = cast(
                "DBAPICursor", reader
            )  # documented; what SQLAlchemy reads the result from
            fd = transcript.fd
            transcript.sent_after = None if fd is None else tcp_bytes_sent(fd)

    def _send_later(  # noqa: PLR0917 # _send_first's arguments, and the transcript
        self,
        connection: Connection,
        context: ExecutionContext,
        statement: str,
        send: Callable[[Any], None],
        cursor: DBAPICursor,
        transcript: Transcript,
    ) -> None:
        """Send a statement past the transaction's first; if its connection is lost, replay."""
        if transcript.refused is None:
            reason = _statement_refusal(context, statement) or _sent_around(transcript)
            if reason is not None:
                logger.debug("dropsafe will not replay this transaction: %s", reason)
                transcript.refuse(reason)
        try:
            send(cursor)
        except Exception as exc:
            if not self._lost(exc, connection.connection):
                if transcript.refused is None and _timed_out(exc):
                    # The old backend may still hold the transaction and its locks: a replay
                    # would wait on them (fencing it is not built).
                    emit(self._hooks, _timed_out_event(exc, transcript))
                transcript.refuse("the statement failed on a connection that was not lost")
                raise
            self._replay_transaction(connection, context, send, exc, transcript)
        self._record(transcript, context, statement, send)

    def _replay_transaction(
        self,
        connection: Connection,
        context: ExecutionContext,
        send: Callable[[Any], None],
        error: Exception,
        transcript: Transcript,
    ) -> None:
        """Replay the transaction on a fresh connection and send the lost statement; else raise.

        Raises ``error`` (the original) when the replay is refused or anything in it differs or
        fails; the fresh connection is then invalidated, so nothing of the replay is kept.
        """
        text = describe_error(error)
        counts = (len(transcript.statements), transcript.rows, transcript.bytes)

        def refused(reason: str, outcome: Literal["refused", "failed"] = "refused") -> None:
            logger.debug("dropsafe did not replay a transaction (%s): %s", outcome, reason)
            emit(self._hooks, TransactionReplayed(text, outcome, *counts, reason=reason))

        if transcript.refused is not None:
            refused(transcript.refused)
            raise error
        lost = connection.connection
        lost_state = self._session_of_lost(lost, transcript.native)
        if lost_state is None:
            refused("the lost connection's session state is unknown")
            raise error
        try:
            fresh_cursor = self._reconnect(connection, context, error, lost_state, changes=False)
        except Exception:
            refused("no fresh connection could be set up for it", "failed")
            raise
        if fresh_cursor is None:
            refused("a fresh connection would not be in the same session state")
            raise error
        fresh = connection.connection
        try:
            difference = _replay_bounded(transcript, fresh)
            if difference is None:
                send(fresh_cursor)
        except Exception as again:  # the original error is the one to raise
            logger.debug("dropsafe's replay of a transaction failed", exc_info=True)
            difference = f"the replay failed: {describe_error(again)}"
        if difference is not None:
            connection.invalidate(error)  # the fresh connection, and the replay with it
            refused(difference, "failed")
            raise error
        mark_connection(fresh.driver_connection, changes=False)
        driver = self._driver
        transcript.native = None if driver is None else driver.native(fresh.dbapi_connection)
        transcript.fd = (
            None
            if transcript.native is None or driver is None
            else socket_fd_of(driver, transcript.native)
        )
        logger.debug("dropsafe replayed a transaction on a fresh connection: %s", text)
        emit(self._hooks, TransactionReplayed(text, "replayed", *counts))


# A replay waits this long at most for a lock (milliseconds): the old backend of a connection
# lost to a cut the server did not see may hold the transaction's locks until it notices.
REPLAY_LOCK_TIMEOUT_MS = 2000


def _replay_bounded(transcript: Transcript, fresh: PoolProxiedConnection) -> str | None:
    """Replay ``transcript`` on ``fresh``, its lock waits bounded; the difference, or None.

    Two round trips more, on the replay only: the transaction's lock_timeout is set for the
    replay, then put back to what it was, before the app's statement goes on.
    """
    cursor = fresh.cursor()
    cursor.execute(
        "SELECT current_setting('lock_timeout'), "
        f"set_config('lock_timeout', '{REPLAY_LOCK_TIMEOUT_MS}', true)"
    )
    (before, _), *_ = cursor.fetchall()
    difference = transcript.replay_onto(fresh.cursor)
    if difference is None:
        quoted = str(before).replace("'", "''")  # the server's own value
        cursor.execute(f"SELECT set_config('lock_timeout', '{quoted}', true)")
        cursor.fetchall()
    cursor.close()
    return difference


def _timed_out_event(error: Exception, transcript: Transcript) -> TransactionReplayed:
    return TransactionReplayed(
        describe_error(error),
        "refused",
        len(transcript.statements),
        transcript.rows,
        transcript.bytes,
        reason="the connection timed out: the old backend may still hold the transaction's locks",
    )


def _statement_refusal(context: ExecutionContext, statement: str) -> str | None:
    """Why a statement turns its transaction's replay off, or None."""
    options = context.execution_options
    if options.get(OPT_OUT, True) is False:
        return f"{OPT_OUT}=False"
    if options.get("stream_results") or options.get("yield_per"):
        return "a server-side cursor (stream_results): its rows are read as the app goes"
    style = getattr(context, "execute_style", None)
    if style not in _REPLAYABLE_STYLES:
        return f"execute style {getattr(style, 'name', style)}"
    return refusal_of_text(statement)


def _sent_around(transcript: Transcript) -> str | None:
    """Why the driver's connection sent bytes that are not in the transcript, or None."""
    fd, before = transcript.fd, transcript.sent_after
    now = None if fd is None else tcp_bytes_sent(fd)
    if now is None or before is None:
        return "the bytes sent on its socket are unknown (not TCP?)"
    if now != before:
        return f"the driver's connection sent {now - before} bytes around SQLAlchemy"
    return None


def _size(statement: str, context: ExecutionContext) -> int:
    """Estimate the bytes a recorded statement keeps: its text and its parameters."""
    size = len(statement)
    for parameters in getattr(context, "parameters", ()) or ():
        values = parameters.values() if isinstance(parameters, dict) else parameters
        for value in values:
            size += len(value) if isinstance(value, (str, bytes)) else 8
    return size
