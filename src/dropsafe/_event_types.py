"""The events: one frozen dataclass per thing dropsafe did (users import them from events).

They live below `dropsafe.events` so that the hooks there and in `dropsafe._metrics` read them
without an import circle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from dropsafe._classify import ErrorKind


@dataclass(frozen=True)
class DeadConnectionReplaced:
    """A pooled connection was found dead at checkout and replaced before the app saw it."""

    reason: str
    pool_wide: bool  # every older pooled connection was recycled too


@dataclass(frozen=True)
class ConnectWaited:
    """A checkout could not connect at first because the server was not there; it waited.

    Also when a pooler (PgBouncer) turned a checkout's first statement away for want of a
    server and the statement was sent again on fresh connections. One event per wait, when it
    ends: ``connected`` (the app never saw the outage) or
    ``gave_up`` (``ConnectionPolicy.connect_wait`` ran out, or an error came that waiting
    cannot fix; the last error is raised). Logged at INFO, ``gave_up`` at WARNING.
    """

    url: str  # the engine's URL, password masked
    outcome: Literal["connected", "gave_up"]
    attempts: int  # connects made, the first one included
    waited: float  # seconds from the first failed connect to the outcome
    started_at: float  # when the first connect failed (``time.time()``)
    error: str  # the first failed connect's error, passwords redacted


@dataclass(frozen=True)
class ConnectionInvalidated:
    """A statement met a lost connection (or a failover); it is replaced, maybe the pool too."""

    kind: ErrorKind
    pool_wide: bool
    error: str


@dataclass(frozen=True)
class RollbackConnectionLost:
    """A ROLLBACK met a lost connection: the server had aborted that transaction already.

    The connection was invalidated and nothing was raised: the application goes on as after a
    successful rollback. ``during`` says which ROLLBACK: a Connection's or Session's
    (``rollback``), or the pool's reset of a connection checked in (``reset``). Logged at DEBUG.
    """

    during: Literal["rollback", "reset"]
    error: str


@dataclass(frozen=True)
class FirstStatementReplayed:
    """A transaction's first statement lost its connection before any reply; sent again.

    On a fresh connection, once, and the app never knew: the transaction cannot have
    committed, and nothing else had run in it (docs/guarantees.md). When the replay itself
    failed (no fresh connection, or that one lost too), ``replay_error`` says why, and the
    app got that error: operators see replays that did not save the request.
    """

    error: str  # the lost connection's error, passwords redacted
    replay_error: str | None = None  # None: the replay succeeded
    # Fresh connections it was sent on: more than 1 when the server ended one while the
    # statement ran (57P01: a restart, pg_terminate_backend), at most 3.
    attempts: int = 1


@dataclass(frozen=True)
class PingSucceeded:
    """A checkout paid a round trip (idle too long, or something arrived while idle)."""

    latency: float  # seconds
    why: Literal["idle", "data_waiting"]  # idle too long, or bytes arrived while idle


@dataclass(frozen=True)
class RetryScheduled:
    """A unit of work failed with a retryable error and will run again after ``delay``."""

    attempt: int  # the attempt that failed, from 1
    delay: float  # seconds
    kind: ErrorKind
    error: str  # the error's type and message, passwords redacted


@dataclass(frozen=True)
class RetriesGaveUp:
    """A unit of work ran out of attempts or of time; its last error is raised next."""

    attempts: int
    elapsed: float
    reason: Literal["attempts", "deadline"]
    error: str


@dataclass(frozen=True)
class CommitResolved:
    """A COMMIT whose reply was lost was resolved by asking the server."""

    xid: int
    outcome: Literal["committed", "aborted", "unknown"]
    elapsed: float  # seconds spent asking


@dataclass(frozen=True)
class AcknowledgedCommitLost:
    """A unit of work's COMMIT was acknowledged, then its server failed over without it.

    With asynchronous replication a promoted standby may lack commits the old primary
    acknowledged; no client can prevent that. dropsafe remembers a unit's acknowledged commits
    and, when a unit commits on the server that took over, asks it which of them it has
    (docs/guarantees.md, "Commits a failover lost"). Each missing commit is reported once,
    logged at WARNING: re-check or redo what ``unit`` did, or alert.

    ``outcome`` is ``"lost"`` when the new server proves the commit is not in its history, and
    ``"unknown"`` when dropsafe could not tell (the reason says why): treat it as lost until
    checked. ``committed_at`` is when the COMMIT was acknowledged (``time.time()``).
    """

    xid: int
    unit: str  # the unit of work's function (its qualified name)
    committed_at: float
    outcome: Literal["lost", "unknown"]
    reason: str


@dataclass(frozen=True)
class HookFailedAfterCommit:
    """A Session hook raised after a unit of work's COMMIT had succeeded.

    The hook: ``after_commit`` or ``after_transaction_end`` (or anything else that raises
    between the COMMIT and the end of the unit's session). The unit committed:
    `run_transaction` returns its result, since an error from it means "no effect". The
    hook's error is reported here instead, logged at ERROR, once. Work that must happen with
    the commit belongs inside the unit (an outbox row), not in such a hook.
    """

    unit: str  # the unit of work's function (its qualified name)
    error: str  # the hook's error, passwords redacted


@dataclass(frozen=True)
class TransactionReplayed:
    """A transaction lost its connection before its COMMIT was sent, past its first statement.

    ``replayed``: its statements were sent again on a fresh connection, every result the same
    as what the app had received, and the lost statement then ran there: the app never knew.
    ``refused``: the transaction did something a replay cannot repeat (``reason``, one line).
    ``failed``: the replay ran and something differed or failed (``reason``). In both the app
    got the original error, and nothing of the replay was kept (docs/mid-transaction.md).
    """

    error: str  # the lost connection's error, passwords redacted
    outcome: Literal["replayed", "refused", "failed"]
    statements: int  # statements sent again (before the lost one)
    rows: int  # rows compared
    bytes: int  # statement and parameter bytes recorded
    reason: str | None = None  # why refused or failed
    # Fresh connections used: more than 1 when one was lost before the replay sent anything,
    # or the server ended it during the replay (57P01: a restart, pg_terminate_backend).
    attempts: int = 1


@dataclass(frozen=True)
class HostSkipped:
    """A host of a multi-host URL stopped answering: connects leave it out for a while.

    ``cause``: a connect timed out there (``connect_timed_out``), or TCP gave up on an open
    connection to it (``connection_timed_out``). For ``seconds`` the engine's connects try the
    other hosts only, so a vanished primary costs no connect its ``connect_timeout`` while a
    standby is promoted; then `HostRetried`. Never every host at once: when all of them time
    out, connects try them in order. Logged at INFO.
    """

    url: str  # the engine's URL, password masked
    host: str
    port: int
    cause: Literal["connect_timed_out", "connection_timed_out"]
    seconds: float  # how long connects leave it out


@dataclass(frozen=True)
class HostRetried:
    """A host that `HostSkipped` left out is tried again by connects (its time out is over)."""

    url: str  # the engine's URL, password masked
    host: str
    port: int
    skipped_for: float  # seconds it was left out


Event = (
    DeadConnectionReplaced
    | ConnectWaited
    | ConnectionInvalidated
    | RollbackConnectionLost
    | FirstStatementReplayed
    | PingSucceeded
    | RetryScheduled
    | RetriesGaveUp
    | CommitResolved
    | AcknowledgedCommitLost
    | HookFailedAfterCommit
    | TransactionReplayed
    | HostSkipped
    | HostRetried
)

for _event_type in get_args(Event):
    _event_type.__module__ = "dropsafe.events"  # where users import it: reprs and pickles say so


def event_name(event: Event) -> str:
    """Return the name the log and the metrics give ``event``: ``dropsafe.retry_scheduled``."""
    return "dropsafe." + re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
