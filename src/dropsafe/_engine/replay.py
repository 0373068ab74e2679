"""A transaction's first statement, lost with its connection before any reply, is sent again.

Nothing of the app's was on that connection yet, so dropsafe puts a fresh connection in the
same session state under the SQLAlchemy Connection (its Transaction and the ORM's kept) and
sends the statement once more. Why that is safe, what is refused, the opt-outs and the two
private SQLAlchemy attributes it needs: docs/guarantees.md, "A transaction's first statement is
replayed, once". The session-state proof: `dropsafe._engine.session_state`.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine.interfaces import ExecuteStyle

from dropsafe._commit_truth.flight_xid import UNIT_READS_XID, FlightXid
from dropsafe._commit_truth.pending_commit import may_notify
from dropsafe._drivers import driver_for, is_supported, socket_fd_of, tcp_bytes_sent
from dropsafe._engine.fresh_connection import FreshConnections
from dropsafe._engine.pinned_insert import pinned_insert
from dropsafe._engine.replay_refusals import (
    OPT_OUT,
    ReplayRefusals,
    check_opt_out,
    sent_around,
    statement_refusal,
    timed_out,
)
from dropsafe._engine.server_facts import learn_session
from dropsafe._engine.session_state import VERDICTS, mark_connection, may_change_session
from dropsafe._engine.transcript import Transcript, recorded_size
from dropsafe._engine.unsent_commit import UnsentCommit
from dropsafe._engine.xid_in_flight import (
    XidInFlight,
    may_write,
    note_sent,
    sent_around_read,
    with_dropped,
)
from dropsafe._engine_state import UNSENT_KEY, Unsent
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe._sqlalchemy_private import POOL_CHECKOUT
from dropsafe.events import FirstStatementReplayed, TransactionReplayed

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Dialect, ExecutionContext
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._dbapi import DBAPICursor, DBAPIParameters
    from dropsafe._engine.connect_wait import ConnectWait
    from dropsafe._engine_state import EngineState
    from dropsafe._policy import PoolPolicy
    from dropsafe.events import Hook

__all__ = ["OPT_OUT", "FirstStatementReplay"]

logger = SafeLogger()

_INSERTMANYVALUES = ExecuteStyle.INSERTMANYVALUES


# Set in a pool checkout's own ``__dict__`` (`EngineState.first_statement_pending` says why
# there) once its connection is marked as having run a statement: the checkout's later
# statements that change no session state then mark nothing (a dictionary look-up, no call).
_MARKED = "_dropsafe_marked"


def _mark(checkout: PoolProxiedConnection, *, changes: bool) -> None:
    """Note on ``checkout``'s connection that it ran a statement, and one that ``changes``."""
    if checkout.__class__ is POOL_CHECKOUT:
        mark_connection(checkout.driver_connection, changes=changes)
        checkout.__dict__[_MARKED] = True
        return
    try:
        _ = checkout.info  # only to tell the first connect's ad hoc connection
    except NotImplementedError:  # the ad hoc connection of a first connect has no pool entry
        return
    mark_connection(checkout.driver_connection, changes=changes)


class FirstStatementReplay:
    """Sends a transaction's first statement again, on one engine, when its connection is lost."""

    def __init__(
        self,
        policy: PoolPolicy,
        hooks: tuple[Hook, ...],
        dialect: Dialect,
        state: EngineState,
        waits: ConnectWait,
        *,
        behind_pooler: bool = False,
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
        self._waits = waits  # a pooler with no server yet is waited out as a connect is
        # The engine's checkouts whose first statement is not sent yet (no lock: a checkout is
        # used by one thread or task at a time, and a single insertion or removal is atomic).
        self._state = state
        self._policy = policy
        self._refusals = ReplayRefusals(dialect, self._driver)
        self._records = self._enabled and policy.replay_transaction
        self._fresh = FreshConnections(dialect, self._driver, state, learns=self._records)
        # Each SQLAlchemy root Transaction's record, for a replay past its first statement:
        # gone with the Transaction (its COMMIT or ROLLBACK ends it; the record holds no
        # reference to it, so that it can be collected).
        self._transcripts: weakref.WeakKeyDictionary[object, Transcript] = (
            weakref.WeakKeyDictionary()
        )
        self._caps = (
            int(policy.replay_max_statements),
            int(policy.replay_max_rows),
            int(policy.replay_max_bytes),
        )
        # The xid read in a writing statement's flight, where the driver can (none: not read):
        # for every transaction with the transaction replay on (its lost COMMIT resolved), and
        # for a verifying unit's transactions (its mark, without a round trip of its own:
        # `dropsafe._commit_truth.flight_xid`). Not for a unit behind a pooler: the driver's
        # backend pid is the pooler's, and the resolver would fence another client's backend.
        reads = (
            XidInFlight(dialect, self._driver, state, hooks)
            if self._enabled
            and self._driver is not None
            and self._driver.capabilities.reads_xid_in_flight
            else None
        )
        self._xid = reads if self._records else None
        self._unit_xid = reads if policy.read_xid_in_flight and not behind_pooler else None
        # A unit's transactions that no transcript records: what their statements read.
        self._flight_xids: weakref.WeakKeyDictionary[object, FlightXid] = (
            weakref.WeakKeyDictionary()
        )
        if reads is not None:
            state.flight_xid = self._flight_xid_of
            state.flight_dropped = self._dropped_xids_of
        # A COMMIT about to go on a connection known gone, or lost and resolved by its xid as
        # aborted: the transaction is done elsewhere.
        self._commits = (
            None
            if not self._records or self._driver is None
            else UnsentCommit(
                dialect, self._driver, self._fresh, hooks, self._transcript_of, xid=self._xid
            )
        )

    @property
    def enabled(self) -> bool:
        """Whether this engine replays first statements (its policy and driver allow it)."""
        return self._enabled

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the pool events this replay listens to, by name.

        With the transaction replay on, each new connection's session start and server life are
        learned at connect (one query per connection made, none per checkout: `server_facts`);
        so they are on an engine that ran a verified unit, whose xid is read in flight: the
        read needs the server's life (and on psycopg2, leave to run a DO block).
        """
        if not self._records and self._unit_xid is None:
            return {}
        state, records = self._state, self._records

        def learn(dbapi_connection: Any, entry: Any) -> None:  # noqa: ANN401 - pool event's
            if records or state.recording:
                learn_session(dbapi_connection, entry, state)

        return {"connect": learn}

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
        execute_no_params = dialect.do_execute_no_params

        def with_parameters(method: Callable[..., None]) -> Callable[..., None]:
            """``do_execute`` or ``do_executemany``, sent through `_send`.

            A partial (C), not a closure: one Python call less at every statement.
            """
            return functools.partial(self._send, method=method)

        def without_parameters(
            cursor: DBAPICursor,
            statement: str,
            parameters: DBAPIParameters,
            context: ExecutionContext | None,
        ) -> None:
            """``do_execute_no_params`` in ``do_execute``'s shape (``parameters`` unused)."""
            del parameters
            execute_no_params(cursor, statement, context)

        def do_execute_no_params(
            cursor: DBAPICursor,
            statement: str,
            context: ExecutionContext | None = None,
        ) -> None:
            self._send(cursor, statement, (), context, method=without_parameters)

        # Documented Dialect methods, replaced on this instance only (as do_rollback is by
        # quiet_rollback): attributes of the instance shadow the class's methods, so other
        # engines and the dialect class are untouched.
        vars(dialect).update(
            do_execute=with_parameters(dialect.do_execute),
            do_execute_no_params=do_execute_no_params,
            do_executemany=with_parameters(dialect.do_executemany),
        )
        if self._commits is not None:
            self._commits.wrap_commit()

    # -- sending, and sending again -------------------------------------------------------------

    def _send(  # noqa: C901, PLR0912, PLR0915 - one function: a helper is a call per statement
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: DBAPIParameters,
        context: ExecutionContext | None = None,
        *,
        method: Callable[[DBAPICursor, str, DBAPIParameters, ExecutionContext | None], None],
    ) -> None:
        """Send the statement with ``method``; replay it if it may be and its connection is lost.

        How to send it again (`_sender`) is made only where it is kept or needed: a recorded
        statement, a lost first statement; the healthy first statement makes nothing.
        """
        if context is None:
            method(cursor, statement, parameters, context)
            return
        options = context.execution_options
        if OPT_OUT in options:  # an option not given needs no check (no call, at every statement)
            check_opt_out(options)
        connection = context.root_connection
        if connection is None:
            method(cursor, statement, parameters, context)
            return
        checkout = connection.connection
        # may_change_session's cache read here (a C call): its Python call only for a new text.
        changes = VERDICTS.get(statement)
        if changes is None:
            changes = may_change_session(statement)
        pending = None
        try:
            # EngineState.first_statement_sent, inlined: this runs at every statement.
            if checkout.__class__ is POOL_CHECKOUT:
                pending = checkout.__dict__.pop(UNSENT_KEY, None)
            if pending is None:
                # Only a checkout's first transaction is recorded: it alone is proven to start
                # with nothing of the app's on the connection.
                transcript = self._transcript_of(connection) if self._records else None
                if transcript is None:
                    # (No call for an engine that never ran a unit: attribute reads only.)
                    if (
                        self._unit_xid is None
                        or not self._state.recording
                        or not UNIT_READS_XID.get()
                    ):
                        method(cursor, statement, parameters, context)
                    else:
                        self._send_in_unit(
                            connection, cursor, statement, parameters, context, method
                        )
                else:
                    send = _sender(method, statement, parameters, context)
                    reading = None
                    if transcript.pending is not None and self._xid is not None:
                        self._xid.note_statement(transcript, statement)  # may drop it
                    if transcript.xid_wanted and may_write(context, statement):
                        reading = self._reading_xid(
                            transcript, statement, parameters, context, method
                        )
                    self._send_later(
                        connection, context, statement, send, cursor, transcript, reading
                    )
                return
            refusal = self._refusals.first_statement(
                connection, context, statement, checkout, pending
            )
            if refusal is not None:
                logger.debug("dropsafe will not replay this first statement: %s", refusal)
                xid = None
                reads = self._xid
                if reads is None and self._state.recording and UNIT_READS_XID.get():
                    reads = self._unit_xid
                if reads is None or not may_write(context, statement):
                    method(cursor, statement, parameters, context)
                else:
                    xid = self._send_first(
                        reads, pending, cursor, statement, parameters, context, method
                    )
                    self._keep_for_unit(connection, xid, pending)
                if self._records:  # kept to say why, should the transaction lose its connection
                    send = _sender(method, statement, parameters, context)
                    self._begin_transcript(
                        connection, context, statement, send, pending, refusal=refusal, xid=xid
                    )
                return
            xid = None
            try:
                # Inlined (no call at every first statement): for every transaction with the
                # transaction replay on, else for a verifying unit's.
                reads = self._xid
                if reads is None and self._state.recording and UNIT_READS_XID.get():
                    reads = self._unit_xid
                if reads is None or not may_write(context, statement):
                    method(cursor, statement, parameters, context)
                else:
                    xid = self._send_first(
                        reads, pending, cursor, statement, parameters, context, method
                    )
                    self._keep_for_unit(connection, xid, pending)
            except Exception as exc:  # noqa: BLE001 - raised again unless it is replayed
                send = _sender(method, statement, parameters, context)
                replayed = self._replay_first(connection, context, send, exc, pending, changes)
            else:
                replayed = False
            if self._records:
                send = _sender(method, statement, parameters, context)
                self._begin_transcript(
                    connection, context, statement, send, pending, replayed=replayed, xid=xid
                )
        finally:
            # Whether it ran or failed: a session advisory lock outlives the failed transaction
            # that took it. (A replay marks its fresh connection itself.) A statement that
            # changes nothing needs no mark on a connection marked already: at an earlier
            # checkout (the check's entry says so), or by this checkout's earlier statement.
            if changes:
                _mark(checkout, changes=True)
                if pending is not None:
                    pending.entry.used = True
            elif pending is not None:
                if not pending.entry.used:
                    _mark(checkout, changes=False)
                    pending.entry.used = True
                checkout.__dict__[_MARKED] = True  # a pool checkout: the check's
            elif checkout.__class__ is not POOL_CHECKOUT or _MARKED not in checkout.__dict__:
                _mark(checkout, changes=False)

    def _keep_for_unit(
        self, connection: Connection, xid: PendingCommit | None, pending: Unsent
    ) -> None:
        """Keep a unit's xid read by its transaction's first statement, where no transcript does.

        With the transaction replay on, the transcript keeps it (`_begin_transcript`). What the
        socket sent once the statement went is kept with it (`sent_around_read`).
        """
        if xid is None or self._records:
            return
        transaction = connection.get_transaction()
        if transaction is not None:
            record = self._flight_xids[transaction] = FlightXid()
            record.pending, record.xid_wanted, record.native = xid, False, pending.native
            record.fd, record.count_sent = pending.fd, pending.entry.sent_bytes
            note_sent(record)

    def _send_in_unit(  # noqa: PLR0917 - do_execute's arguments, and its Connection
        self,
        connection: Connection,
        cursor: DBAPICursor,
        statement: str,
        parameters: DBAPIParameters,
        context: ExecutionContext,
        method: Callable[[DBAPICursor, str, DBAPIParameters, ExecutionContext | None], None],
    ) -> None:
        """Send a unit's statement past its transaction's first; read the xid if it may write.

        Only where no transcript records the transaction (the transaction replay off, or not a
        checkout's first transaction). After the read, each statement may drop it
        (`XidInFlight.note_statement`: one that ends the server's transaction, or names
        ``synchronous_commit``), as a transcript's would.
        """
        reads, driver = self._unit_xid, self._driver
        transaction = connection.get_transaction()
        if reads is None or driver is None or transaction is None:  # autocommit: no COMMIT
            method(cursor, statement, parameters, context)
            return
        record = self._flight_xids.get(transaction)
        if record is None:
            record = self._flight_xids[transaction] = FlightXid()
        if record.pending is not None:
            reads.note_statement(record, statement)
        native = fd = None
        if record.xid_wanted and may_write(context, statement) and not _many(context):
            # Read from the checkout each time: a first-statement replay may have moved it.
            native = driver.native(connection.connection.dbapi_connection)
            # Its socket's bytes sent are what tells a statement sent around SQLAlchemy: none
            # to count (not TCP), no read (the mark reads).
            fd = None if native is None else socket_fd_of(driver, native)
        try:
            if native is None or fd is None:
                method(cursor, statement, parameters, context)
            else:
                read = reads.send(
                    native,
                    statement,
                    lambda text: method(cursor, text, parameters, context),
                    cursor,
                )
                if read is not None:
                    record.pending, record.xid_wanted, record.native = read, False, native
                    record.fd, record.count_sent = fd, tcp_bytes_sent
        finally:
            # Failed too (a duplicate key in a savepoint the app rolls back): its bytes are the
            # engine's, not sent around it.
            if record.pending is not None:
                note_sent(record)

    def _flight_xid_of(self, connection: Connection) -> PendingCommit | None:
        """Return the xid ``connection``'s open transaction read in a statement's flight, if any.

        For a unit's COMMIT listener (`EngineState.flight_xid`), right before the COMMIT: None
        if nothing was read, or if the server's transaction is no longer open on the
        connection it was read on (ended around SQLAlchemy: the read is another transaction's).
        """
        transaction = connection.get_transaction()
        if transaction is None or self._unit_xid is None:  # behind a pooler: no backend pid
            return None
        holder: Transcript | FlightXid | None = self._transcripts.get(transaction)
        if holder is None:
            holder = self._flight_xids.get(transaction)
        if holder is None or holder.pending is None or holder.native is None:
            return None
        driver = self._driver
        try:
            ended = driver is None or driver.transaction_idle(holder.native) is not False
        except Exception:  # noqa: BLE001 - a closed connection: the mark's statement fails too
            ended = True
        # In a transaction, but perhaps another one: bytes sent around SQLAlchemy since its
        # last statement (a DBAPI commit() or rollback(), then a raw cursor's write).
        if ended or sent_around_read(holder):
            return None
        # With the reads it dropped before (a call only where there are some).
        return with_dropped(holder.pending, holder) if holder.dropped else holder.pending

    def _dropped_xids_of(
        self, connection: Connection
    ) -> tuple[tuple[PendingCommit, ...], PendingCommit | None]:
        """Return the reads ``connection``'s transaction dropped, and the one it holds now.

        For a unit's COMMIT that the mark reads (`_flight_xid_of` gave nothing: the read held,
        if any, did not stand), and for a unit whose function raised around SQLAlchemy (the
        DBAPI connection's own ``commit()`` lost: the read held may have committed).
        """
        transaction = connection.get_transaction()
        if transaction is None or self._unit_xid is None:
            return (), None
        holder: Transcript | FlightXid | None = self._transcripts.get(transaction)
        if holder is None:
            holder = self._flight_xids.get(transaction)
        if holder is None:
            return (), None
        return holder.dropped, holder.pending

    def _send_first(  # noqa: PLR0917 - do_execute's arguments, and the checkout's first facts
        self,
        reads: XidInFlight,
        pending: Unsent,
        cursor: DBAPICursor,
        statement: str,
        parameters: DBAPIParameters,
        context: ExecutionContext,
        method: Callable[[DBAPICursor, str, DBAPIParameters, ExecutionContext | None], None],
    ) -> PendingCommit | None:
        """Send a transaction's first statement that may write, reading its xid in the flight."""
        xid_reads = reads
        # No socket to count the bytes sent on (not TCP): a read could not tell a statement
        # sent around SQLAlchemy after it (`sent_around_read`), so none is made.
        if pending.native is None or pending.fd is None or _many(context):
            method(cursor, statement, parameters, context)
            return None
        return xid_reads.send(
            pending.native,
            statement,
            lambda text: method(cursor, text, parameters, context),
            cursor,
        )

    def _reading_xid(
        self,
        transcript: Transcript,
        statement: str,
        parameters: DBAPIParameters,
        context: ExecutionContext,
        method: Callable[[DBAPICursor, str, DBAPIParameters, ExecutionContext | None], None],
    ) -> Callable[[Any], None] | None:
        """Return how to send a statement past the first, reading the xid in its flight.

        None where it is not read. Its first sending alone reads: a replay sends it plainly.
        """
        xid_reads, native = self._xid, transcript.native
        # No socket to count its bytes sent on: the read could not stand (`sent_around_read`).
        if xid_reads is None or native is None or transcript.fd is None or _many(context):
            return None

        def send_reading(on: DBAPICursor) -> None:
            xid = xid_reads.send(
                native, statement, lambda text: method(on, text, parameters, context), on
            )
            if xid is not None:
                transcript.pending, transcript.xid_wanted = xid, False

        return send_reading

    def _replay_first(  # noqa: PLR0917 - the lost statement's connection, sender and error
        self,
        connection: Connection,
        context: ExecutionContext,
        send: Callable[[Any], None],
        error: Exception,
        pending: Unsent,
        changes: bool,
    ) -> bool:
        """Replay a first statement that failed with ``error``; return True, or raise ``error``.

        ``changes``: whether the statement may change its connection's session state. Raises
        ``error`` unless its connection was lost and the statement was sent again on a fresh
        connection in the same session state.
        """
        if not self._refusals.lost(error, connection.connection):
            raise error
        lost_state = self._fresh.session_of_lost(connection.connection, pending.native)
        if lost_state is None:
            raise error
        text = describe_error(error)
        attempts = [0]
        try:
            replayed = self._fresh.send_again(
                connection,
                context,
                send,
                error,
                lost_state,
                changes=changes,
                waits=self._waits,
                attempts=attempts,
            )
        except Exception as again:  # raised as usual; said, so that operators see it
            failed = describe_error(again)
            logger.debug("dropsafe's replay of a first statement failed: %s", failed)
            emit(
                self._hooks,
                FirstStatementReplayed(text, replay_error=failed, attempts=max(attempts[0], 1)),
            )
            raise
        if not replayed:  # not the same session: not replayed, nothing to say
            raise error
        logger.debug("dropsafe replayed a first statement on a fresh connection: %s", text)
        emit(self._hooks, FirstStatementReplayed(text, attempts=attempts[0]))
        return True

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
        replayed: bool = False,
        refusal: str | None = None,
        xid: PendingCommit | None = None,
    ) -> None:
        """Start recording the transaction whose first statement was just sent (or ``replayed``).

        With a ``refusal``: nothing is recorded, the reason is kept. ``xid``: the transaction's,
        read in the first statement's flight.
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
        if replayed:
            native = driver.native(checkout.dbapi_connection)
            fd = None if native is None else socket_fd_of(driver, native)
        transaction = connection.get_transaction()
        if transaction is None:  # autocommit: nothing to replay
            return
        transcript = Transcript(native, fd, self._caps)
        if not replayed:  # on the checkout's own connection: its counter, socket object kept
            transcript.count_sent = pending.entry.sent_bytes
        self._transcripts[transaction] = transcript
        transcript.pending = xid
        transcript.xid_wanted = xid is None and self._xid is not None
        if self._commits is not None:  # a refused one too: its lost COMMIT may be resolved
            self._commits.note(checkout, connection)
        if refusal is None:
            self._record(transcript, context, statement, send)
        else:
            transcript.refuse(refusal)
        if xid is not None and transcript.refused is not None:  # else _record counted
            note_sent(transcript)

    def _record(
        self,
        transcript: Transcript,
        context: ExecutionContext,
        statement: str,
        send: Callable[[Any], None],
    ) -> None:
        """Record a statement just sent; the app reads its result through the recording."""
        if may_notify(statement):
            transcript.notifies = True  # its lost COMMIT may have waited for no WAL
        reason = statement_refusal(context, statement)
        if reason is not None:
            transcript.refuse(reason)
            return
        pin = pinned_insert(context, statement) if context.isinsert else None
        reader = transcript.record(send, context.cursor, recorded_size(statement, context), pin)
        if reader is not None:
            # Documented; what SQLAlchemy reads the result from (no cast(): a call per statement).
            context.cursor = reader  # type: ignore[assignment]
            fd = transcript.fd
            transcript.sent_after = None if fd is None else transcript.count_sent(fd)

    def _send_later(  # noqa: PLR0917 # _send_first's arguments, and the transcript
        self,
        connection: Connection,
        context: ExecutionContext,
        statement: str,
        send: Callable[[Any], None],
        cursor: DBAPICursor,
        transcript: Transcript,
        reading: Callable[[Any], None] | None = None,
    ) -> None:
        """Send a statement past the transaction's first; if its connection is lost, replay.

        ``reading``: how to send it this once, reading the xid in its flight (`_reading_xid`).
        """
        if transcript.refused is None:
            reason = statement_refusal(context, statement) or sent_around(transcript)
            if reason is not None:
                logger.debug("dropsafe will not replay this transaction: %s", reason)
                transcript.refuse(reason)
        try:
            (send if reading is None else reading)(cursor)
        except Exception as exc:
            if not self._refusals.lost(exc, connection.connection):
                if transcript.refused is None and timed_out(exc):
                    # The old backend may still hold the transaction and its locks: a replay
                    # would wait on them (fencing it is not built).
                    emit(self._hooks, _timed_out_event(exc, transcript))
                transcript.refuse("the statement failed on a connection that was not lost")
                if transcript.pending is not None:  # its bytes are the engine's
                    note_sent(transcript)
                raise
            self._replay_transaction(connection, context, send, exc, transcript)
        self._record(transcript, context, statement, send)
        if transcript.pending is not None and transcript.refused is not None:  # else _record's
            note_sent(transcript)  # what a COMMIT's resolution checks (`sent_around_read`)

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

        def refused(
            reason: str, outcome: Literal["refused", "failed"] = "refused", attempts: int = 1
        ) -> None:
            logger.debug("dropsafe did not replay a transaction (%s): %s", outcome, reason)
            event = TransactionReplayed(text, outcome, *counts, reason=reason, attempts=attempts)
            emit(self._hooks, event)

        if transcript.refused is not None:
            refused(transcript.refused)
            raise error
        lost = connection.connection
        lost_state = self._fresh.session_of_lost(lost, transcript.native)
        if lost_state is None:
            refused("the lost connection's session state is unknown")
            raise error
        fresh, difference, attempts = self._fresh.replay(
            connection,
            context,
            (send, error, lost_state, transcript),
            refused,
            self._refusals.lost,
            waits=self._waits,
        )
        if difference is not None:
            self._fresh.leave_dead(connection, context, fresh, error)  # the replay with it
            outcome, reason = difference
            refused(reason, outcome, attempts)
            raise error
        mark_connection(fresh.driver_connection, changes=False)
        if self._commits is not None:
            self._commits.note(fresh, connection)
        # The fresh connection's transaction has another xid, not read yet.
        transcript.pending, transcript.xid_wanted = None, self._xid is not None
        driver = self._driver
        transcript.native = None if driver is None else driver.native(fresh.dbapi_connection)
        transcript.count_sent = tcp_bytes_sent  # the fresh connection's entry is not at hand
        transcript.fd = (
            None
            if transcript.native is None or driver is None
            else socket_fd_of(driver, transcript.native)
        )
        logger.debug("dropsafe replayed a transaction on a fresh connection: %s", text)
        emit(self._hooks, TransactionReplayed(text, "replayed", *counts, attempts=attempts))


def _many(context: ExecutionContext) -> bool:
    """Whether the statement is sent by the driver's ``executemany`` (the xid is not read).

    SQLAlchemy's batched INSERT (insertmanyvalues: the ORM's flush of several objects) sends
    each batch as one ``execute``: its first batch reads.
    """
    return context.executemany and context.execute_style is not _INSERTMANYVALUES


def _sender(
    method: Callable[[DBAPICursor, str, DBAPIParameters, ExecutionContext | None], None],
    statement: str,
    parameters: DBAPIParameters,
    context: ExecutionContext | None,
) -> Callable[[Any], None]:
    """Return how to send the statement again on a given cursor (its arguments kept)."""
    return lambda on: method(on, statement, parameters, context)


def _timed_out_event(error: Exception, transcript: Transcript) -> TransactionReplayed:
    return TransactionReplayed(
        describe_error(error),
        "refused",
        len(transcript.statements),
        transcript.rows,
        transcript.bytes,
        reason="the connection timed out: the old backend may still hold the transaction's locks",
    )
