"""What one attempt of a unit of work learns from the engines' listeners, in one place.

One context variable reaches the listeners (`dropsafe._unit.recording` reads the xid before
COMMIT, `dropsafe._unit.shapes` refuses the shapes a unit cannot guard) in threads and in
SQLAlchemy's asyncio greenlets alike (SQLAlchemy hands its context to the greenlets it spawns).
Set only while an attempt runs: outside a unit each listener costs one read of it.
See docs/guarantees.md ("Verified commits", "Shapes a unit of work may take").
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, final

from sqlalchemy.orm import Session

from dropsafe._commit_truth.flight_xid import UNIT_READS_XID
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._redaction import describe_error
from dropsafe.events import HookFailedAfterCommit, LoggingHook, format_event

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._commit_truth.server_life import ServerLife
    from dropsafe._errors import ConfigurationError
    from dropsafe.events import Hook

__all__ = ["AttemptTracker", "current_attempt"]

logger = SafeLogger()  # a handler that raises never changes an outcome (issue 31)


@final
class AttemptTracker:
    """One attempt of a unit of work, as the engines' listeners see it; ``with`` it around one.

    Its own context manager (a class: a generator-based one costs a few microseconds per
    attempt). A runner sets ``armed`` around the unit's own COMMIT (and clears it in a
    ``finally``): a flag, not a context manager, as it is set at every attempt.
    """

    __slots__ = (
        "_reads_token",
        "_reported",
        "_token",
        "armed",
        "commits_sent",
        "committing_connections",
        "connection",
        "earlier",
        "hooks",
        "marks",
        "notifies",
        "pending",
        "read_xid",
        "refusal",
        "sent",
        "server_life",
        "session",
        "unit",
        "writer",
    )

    def __init__(
        self, unit: str = "", hooks: tuple[Hook, ...] = (), *, read_xid: bool = True
    ) -> None:
        self.unit = unit  # the unit's qualified name, for the events
        self.hooks = hooks  # the engine's, given by the unit's runner
        #: Whether to read the xid (``UnitPolicy.verify_commits``); COMMITs are counted anyway.
        self.read_xid = read_xid
        #: The last COMMIT's xid and backend; None when that transaction wrote nothing.
        self.pending: PendingCommit | None = None
        #: Xids read in flight in the attempt's transaction whose server transaction the
        #: function ended itself, around SQLAlchemy: it may have committed part of the unit, so
        #: they are asked about before any rerun (`dropsafe._unit.core`).
        self.earlier: tuple[PendingCommit, ...] = ()
        #: COMMITs sent (or about to be) while armed: more than one cannot be retried whole.
        self.commits_sent = 0
        #: The life of the server the last COMMIT went to (None: not read).
        self.server_life: ServerLife | None = None
        #: Set around the unit's own COMMIT: any other COMMIT on its connections is refused.
        self.armed = False
        #: The unit's first connection, and its Session (None: a Connection unit).
        self.connection: Connection | None = None
        self.session: Session | None = None
        #: A unit over several connections (None: one): every connection's mark, read before
        #: the first COMMIT; at most one of them wrote (``writer``).
        self.marks: dict[Connection, PendingCommit | None] | None = None
        self.writer: Connection | None = None
        #: The connections whose COMMIT was sent, in order (only for several connections).
        self.sent: list[Connection] = []
        #: The unit's own COMMIT, refused by the listener: raised again after the function
        #: returns, in case it caught the error.
        self.refusal: ConfigurationError | None = None
        #: Connections whose COMMIT began during the attempt (the unit's own among them).
        self.committing_connections: list[Connection] = []
        #: A statement of the attempt may notify (NOTIFY, pg_notify): its COMMIT, if it wrote no
        #: WAL, delivers the notification before its commit record is flushed
        #: (`dropsafe._unit.shapes` notes it, `dropsafe._unit.recording` reads it).
        self.notifies = False
        self._reported: list[BaseException] = []
        self._token: contextvars.Token[AttemptTracker | None] | None = None
        self._reads_token: contextvars.Token[bool] | None = None

    def __enter__(self) -> AttemptTracker:
        self._token = _CURRENT.set(self)
        # Its engines read the xid in its first writing statement's flight, in place of a mark.
        self._reads_token = UNIT_READS_XID.set(self.read_xid)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        if self._reads_token is not None:
            UNIT_READS_XID.reset(self._reads_token)
            self._reads_token = None

    def writer_committed(self) -> bool:
        """Whether the writing connection's COMMIT succeeded: another was sent after it.

        SQLAlchemy commits a Session's connections one after another, so a COMMIT sent after
        the writer's means that the writer's returned.
        """
        writer = self.writer
        return writer is not None and writer in self.sent and self.sent[-1] is not writer

    def commit_completed(self, handle: object) -> bool:
        """Whether the unit's commit raised after its COMMIT completed, not in it.

        SQLAlchemy leaves a root transaction on its connection when its COMMIT fails (so that
        a rollback must follow), and removes it once the COMMIT succeeded; an invalidated
        connection lost its COMMIT's reply, whatever its transaction says. A Session
        (``handle``) also says whether all its connections committed (one per engine): its
        transaction is COMMITTED then, or already gone (a hook raised as it closed).
        """
        connections = self.committing_connections
        if not connections or any(
            connection.get_transaction() is not None or connection.invalidated
            for connection in connections
        ):
            return False
        session = getattr(handle, "sync_session", handle)  # an AsyncSession's own Session
        if not isinstance(session, Session):
            return True  # a Connection: the one above
        transaction = session.get_transaction()
        # SQLAlchemy's SessionTransaction state, named the same from 1.4 to 2.1.
        state = getattr(getattr(transaction, "_state", None), "name", None)
        return transaction is None or state == "COMMITTED"

    def hook_failed(self, error: BaseException) -> None:
        """Report ``error``, raised by a hook after the unit committed: once, never silently."""
        if any(error is seen for seen in self._reported):
            return
        self._reported.append(error)
        occurred = HookFailedAfterCommit(self.unit, describe_error(error))
        emit(self.hooks, occurred)
        if not any(isinstance(hook, LoggingHook) for hook in self.hooks):
            logger.error("%s", format_event(occurred))


_CURRENT: contextvars.ContextVar[AttemptTracker | None] = contextvars.ContextVar(
    "dropsafe_attempt", default=None
)


#: The attempt of a unit of work running in this context, or None outside one (bound, not
#: wrapped: every listener calls it, inside units of work and outside).
current_attempt = _CURRENT.get
