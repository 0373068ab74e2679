"""Ask the server what became of a COMMIT whose reply was lost; never guess.

A *new* connection (never a pooled one: it may sit on the same dead path) asks the xid's status,
the server's life and whether it is a standby; `_Resolution.settle` says what the answer means
(``committed`` only on the same history, ``aborted`` anywhere, ``in progress``: fence the old
backend, unless it waits for a synchronous standby, and ask again), and anything that cannot be
proven raises `CommitOutcomeUnknown`. Each case, and why it holds: docs/guarantees.md, "How it
keeps it"; the statements are in `dropsafe._commit_truth.server_sql`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dropsafe._backoff import waits_elsewhere
from dropsafe._classify import classify, sqlstate_of
from dropsafe._commit_truth.pending_commit import lsn_number
from dropsafe._commit_truth.server_life import ServerLife
from dropsafe._commit_truth.server_sql import (
    SERVER_QUESTION,
    Row,
    fence_statement,
    one_row,
    status_statement,
)
from dropsafe._errors import CommitOutcomeUnknown
from dropsafe._hooks import emit
from dropsafe._redaction import describe_error
from dropsafe.events import CommitResolved

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.pool import Pool

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe.events import Hook

__all__ = ["APP_COMMITTED", "APP_ENDED_UNKNOWN", "Outcome", "resolve_commit"]

Outcome = Literal["committed", "aborted"]

_FIRST_POLL = 0.02
_MAX_POLL = 0.5
_FENCE_WAIT = 5.0  # at most this long for a fenced backend to exit
_LAST_QUESTION = 1.0  # the time a question asked after the deadline still gets
_CRASHED_SINCE = "the server crashed, restarted from a crash or failed over since"


@dataclass(frozen=True)
class _XidStatus:
    """What the server said about the pending xid (``pg_xact_status``), and about itself."""

    status: object
    server_life: ServerLife
    in_recovery: bool
    sync_waiting: bool = False  # its backend still waits for a synchronous standby
    #: The redo position of the server's last checkpoint, as a number (0: not read).
    checkpoint_redo: int = 0
    #: Whether the database's own code may notify or turn synchronous_commit off (read only
    #: where the server's history is not ours: a crash may have lost the commit record).
    server_code_may_notify: bool = False


_Decision = Literal["committed", "aborted", "fence", "again"]


class _Resolution:
    """The decision half of resolving: what an answer means, and how long to keep asking.

    ``hooks`` hear its outcome (`CommitResolved`); ``fences``: whether a backend that still
    holds the transaction is terminated for an answer, or 'in progress' is unknown at once
    (`_settled` says why each differs between a COMMIT and an earlier transaction).
    """

    def __init__(
        self,
        pending: PendingCommit,
        hooks: tuple[Hook, ...],
        error: BaseException,
        deadline: float,
        *,
        reach_until: float | None = None,
        fences: bool = True,
    ) -> None:
        self.pending = pending
        self.hooks = hooks
        self.error = error
        self.fences = fences
        self.started = time.monotonic()
        #: Until when answers that say nothing yet ("in progress", a standby) are waited on.
        self.deadline = deadline
        #: Until when a server that cannot be asked at all is waited for (never before
        #: ``deadline``): a restart outlasting the asking time is an outage, as for a connect.
        self.reach_until = max(deadline, reach_until or deadline)
        self._answering_time = max(0.0, deadline - self.started)
        self._answered = False
        self._unreached = False  # a question failed before the server's first answer
        self.pause = _FIRST_POLL
        self.budget = self._answering_time
        self.fenced_idle = False
        self.fenced_any = False
        self.fencing_refused = False
        self.standby_answered = False
        self.sync_waiting = False

    @property
    def xid(self) -> int:
        return self.pending.xid

    def earlier(self) -> Iterator[_Resolution]:
        """Yield the resolutions of the transactions the app ended before this one's.

        `PendingCommit.earlier`, each made as it is asked: within the same time, the server
        waited for as long; no events, never fenced (`_settled` says why).
        """
        for ended in self.pending.earlier:
            if ended.xid == self.xid:
                continue  # read twice in one transaction (a read dropped on an unknown byte count)
            yield _Resolution(
                ended, (), self.error, self.deadline, reach_until=self.reach_until, fences=False
            )

    def settle(self, answer: _XidStatus) -> _Decision:  # noqa: PLR0911 - one return per case
        """Say what ``answer`` means; raise `CommitOutcomeUnknown` when it cannot be known."""
        ours = self.pending.server_life
        theirs = answer.server_life
        if ours.system_identifier is not None and (
            theirs.system_identifier != ours.system_identifier
        ):
            return self._unknown("a server of another database cluster answered")
        self.standby_answered = answer.in_recovery
        if answer.in_recovery:
            return "again"  # a standby may lag its primary: only a primary can vouch
        same_history = ours.same_history(theirs)
        other_history = ours.provable and not same_history
        status = answer.status
        if (other_history or not ours.provable) and (
            self.pending.asynchronous or self.pending.unflushed
        ):
            since = (
                _CRASHED_SINCE
                if other_history
                else "the server's history could not be read (a crash since cannot be ruled out)"
            )
            return self._unknown(
                f"{since}, and xid {self.xid} committed without waiting for its WAL: a "
                f"notification it queued may have been heard before a crash lost its commit"
            )
        self.sync_waiting = answer.sync_waiting and not other_history
        if self.sync_waiting:
            return "again"  # committed locally, not yet confirmed by a synchronous standby
        if status == "aborted" or (other_history and status in ("in progress", "future")):
            # A committed xid is never handed out again: a newer transaction holds ours.
            return self._aborted(answer, same_history)
        if status == "committed" and same_history:
            return self._report("committed")
        if status == "committed" and self._commit_record_lost_in_a_crash(answer):
            return self._aborted(answer, same_history)  # the xid is a newer transaction's
        if status == "in progress" and not other_history:
            return self._in_progress()
        if status == "committed":
            return self._unknown(
                f"{_CRASHED_SINCE}, and 'committed' for xid {self.xid} may be a newer "
                "transaction that reused it"
                if ours.provable
                else f"the server's history could not be read, so 'committed' for xid "
                f"{self.xid} cannot be told from a reuse of it after a crash"
            )
        return self._unknown(f"the server reports status {status!r} for xid {self.xid}")

    def _in_progress(self) -> _Decision:
        """Fence the backend that holds the transaction, or ask again; never fenced: unknown."""
        if not self.fences:
            return self._unknown(f"xid {self.xid} is still in progress")
        return "fence" if self.should_fence() else "again"

    def _aborted(self, answer: _XidStatus, same_history: bool) -> _Decision:
        """Report ``aborted``, unless a crash may have lost a commit already heard of.

        A crash loses a commit record only before it was flushed: a COMMIT that waited for its
        WAL was not acknowledged, and its notification was not delivered (listeners see a
        commit once it is durable). One that waited for nothing (synchronous_commit off, or a
        transaction that wrote no WAL: one that only notifies) delivered its notification at
        once. The read says whether the app's statements did that, not whether the database's
        own code did (a trigger that turns synchronous_commit off, an INSTEAD OF trigger or a
        rule that only notifies): where it may have, the answer is unknown.
        """
        if not same_history and answer.server_code_may_notify:
            return self._unknown(
                "the server crashed or restarted from a crash since, and the database has "
                "functions or rules that notify or turn synchronous_commit off: this "
                f"transaction's COMMIT (xid {self.xid}) may have waited for no WAL, and a "
                "notification it queued may have been heard before the crash lost it"
            )
        return self._report("aborted")

    def _commit_record_lost_in_a_crash(self, answer: _XidStatus) -> bool:
        """Whether the server's WAL, as its crash recovery left it, ends before our COMMIT.

        Our COMMIT record lies after ``wal_lsn`` (the insert position read before it was
        sent). A crash recovery ends with a checkpoint whose redo position is where the
        recovered WAL ended (PostgreSQL waits for it before it takes connections); any later
        checkpoint's is further. So a last checkpoint redone at or before ``wal_lsn``, on the
        same timeline (no promotion: a standby's WAL may hold what the old primary lost), and
        on a connection made in the life before (no crash between it and the read), proves
        the record was not recovered: the xid, handed out again, is another transaction's.
        """
        ours, theirs = self.pending.server_life, answer.server_life
        return (
            self.pending.wal_lsn > 0
            and 0 < answer.checkpoint_redo <= self.pending.wal_lsn
            and ours.provable
            and theirs.provable
            and ours.system_identifier == theirs.system_identifier
            and ours.timeline is not None
            and ours.timeline == theirs.timeline
        )

    def answered(self) -> None:
        """Note that the server answered; the asking time starts at its first answer.

        Until then the server could not be asked (stopped, restarting, refusing): that was
        an outage, waited for until ``reach_until``, and the time to ask begins now, bounded by
        ``reach_until`` still.
        """
        if self._answered:
            return
        self._answered = True
        now = time.monotonic()
        if self._unreached:
            self.deadline = max(self.deadline, min(now + self._answering_time, self.reach_until))
            self.budget = max(0.0, self.deadline - now)

    def next_pause(self, failure: BaseException | None = None) -> float:
        """Return how long to wait before asking again, or raise when time is up."""
        if failure is not None and not classify(failure).retryable:
            self._unknown(f"asking the server failed: {describe_error(failure)}", failure)
        if failure is not None and not self._answered:
            self._unreached = True
        until = self.reach_until if failure is not None else self.deadline
        if time.monotonic() + self.pause > until:
            if failure is not None:
                why = f"the server could not be asked in time: {describe_error(failure)}"
            elif self.standby_answered:
                why = "only a standby answered in time, and a standby may lag its primary"
            elif self.sync_waiting:
                why = (
                    f"xid {self.xid} is committed on the primary but its backend still waits "
                    f"for a synchronous standby to confirm it: a standby promoted now may lack it"
                )
            else:
                why = f"xid {self.xid} was still in progress when the time was up" + (
                    " (terminating its backend was not allowed)" if self.fencing_refused else ""
                )
            self._unknown(why, failure)
        pause, self.pause = self.pause, min(self.pause * 2, _MAX_POLL)
        return pause

    def should_fence(self) -> bool:
        """Whether to terminate the backend that holds the transaction now.

        A backend idle in its transaction lost its COMMIT on the way and will never commit:
        it is fenced at once. One still running its COMMIT (a slow trigger) is given half the
        time, then fenced too, for an answer rather than none, except where a synchronous
        standby is configured; one waiting for a synchronous standby never is (the fence's
        statement checks both). Each once: a backend that did not exit when told (stopped,
        stuck) will not later.
        """
        if self.fencing_refused or self.fenced_any:
            return False
        return not self.fenced_idle or self.fence_any_state()

    def fence_any_state(self) -> bool:
        """Whether the time left is short enough to fence a backend that is still committing."""
        return self.deadline - time.monotonic() <= min(_FENCE_WAIT, self.budget / 2)

    def fence_timeout(self) -> float:
        """How long to wait for a fenced backend to exit: what is left, within a bound."""
        return max(0.1, min(_FENCE_WAIT, self.deadline - time.monotonic()))

    def _report(self, outcome: Outcome) -> Outcome:
        emit(self.hooks, CommitResolved(self.xid, outcome, self._elapsed()))
        return outcome

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _unknown(self, reason: str, failure: BaseException | None = None) -> _Decision:
        emit(self.hooks, CommitResolved(self.xid, "unknown", self._elapsed()))
        raise CommitOutcomeUnknown(
            f"the connection failed during COMMIT of transaction {self.xid} and its outcome "
            f"cannot be known: {reason}",
            xid=self.xid,
            reason=reason,
        ) from (failure or self.error)


def resolve_commit(
    engine: Engine,
    pending: PendingCommit,
    error: BaseException,
    *,
    timeout: float,
    deadline: float,
    hooks: tuple[Hook, ...],
    sleep: Callable[[float], None] = time.sleep,
    app_ended: bool = False,
) -> Outcome:
    """Ask the server (new connections) whether the pending commit's transaction committed.

    Keeps asking for ``timeout`` seconds (``UnitPolicy.commit_status_timeout``) from the
    server's first answer, and never past ``deadline``, but always asks at least once. A server
    that cannot be asked (stopped, restarting: connects refused) is waited for until
    ``deadline``: a lost COMMIT in a restart longer than ``timeout`` is still resolved.
    Async engines run this in SQLAlchemy's greenlet with an awaiting ``sleep``.

    Where it did not commit, the transactions the app ended itself before it, around
    SQLAlchemy (`PendingCommit.earlier`), are asked about too: one that committed raises
    `CommitOutcomeUnknown` (`_settle_app_ended`). ``app_ended``: ``pending`` is itself one (a
    unit's function whose own COMMIT through the DBAPI connection was lost): committed or
    unknown raises, never returns 'committed'.
    """
    resolution = _Resolution(
        pending, hooks, error, min(time.monotonic() + timeout, deadline), reach_until=deadline
    )
    pool = engine.pool.recreate()  # new connections, with the engine's creator and listeners
    try:
        if app_ended:
            _settle_app_ended(pool, engine.dialect, sleep, [resolution], commit_xid=None)
            outcome: Outcome = "aborted"
        else:
            try:
                outcome = _settled(pool, engine.dialect, resolution, sleep)
            except CommitOutcomeUnknown as unknown:
                _raise_if_app_ended_beside(pool, engine.dialect, sleep, resolution, unknown)
                raise
        if outcome == "aborted":
            commit_xid = None if app_ended else pending.xid
            _settle_app_ended(
                pool, engine.dialect, sleep, resolution.earlier(), commit_xid=commit_xid
            )
        return outcome
    finally:
        pool.dispose()


def _settled(
    pool: Pool, dialect: Dialect, resolution: _Resolution, sleep: Callable[[float], None]
) -> Outcome:
    """Ask until the server's answers settle ``resolution``; raise `CommitOutcomeUnknown`.

    Serves the unit's COMMIT (`resolve_commit`) and each transaction the app ended itself
    before it (`_settle_app_ended`: `_Resolution.earlier`). They differ in two ways, both
    held by the resolution:

    - fencing (``fences``): the COMMIT's backend may still hold its transaction (its COMMIT
      lost on the way, or still running) and is terminated, then asked again, for an answer
      rather than none; an earlier transaction's backend went on to send the COMMIT after it,
      so it had ended: 'in progress' there (a prepared transaction) is unknown at once;
    - events (``hooks``): `CommitResolved` reports the COMMIT the app sees resolved; an
      earlier transaction's xid is not that COMMIT's, so its resolution has none.
    """
    while True:
        try:
            answer = _ask(pool, dialect, resolution)
            resolution.answered()
            decision = resolution.settle(answer)
            if decision == "fence":
                _fence(pool, dialect, resolution)
                continue
        except CommitOutcomeUnknown:
            raise
        except Exception as exc:  # noqa: BLE001 - next_pause decides (retryable or not)
            sleep(resolution.next_pause(exc))
            continue
        if decision != "again":
            return decision
        sleep(resolution.next_pause())  # in progress, a standby, a synchronous standby's wait


#: `CommitOutcomeUnknown.reason` when the unit's COMMIT did not commit (or was never sent) but
#: a transaction of the same work, which the app ended itself around SQLAlchemy, did.
APP_COMMITTED = "the app committed an earlier transaction of the work itself"
#: ... and when whether it committed cannot be known.
APP_ENDED_UNKNOWN = "an earlier transaction the app ended itself may have committed"


def _settle_app_ended(
    pool: Pool,
    dialect: Dialect,
    sleep: Callable[[float], None],
    resolutions: Iterable[_Resolution],
    *,
    commit_xid: int | None,
) -> None:
    """Return if every transaction the app ended itself aborted; raise if one may have committed.

    The unit's COMMIT did not commit (or was never sent), but its work began in transactions
    the app ended itself around SQLAlchemy (`PendingCommit.earlier`: the DBAPI connection's
    ``commit()``, then a raw write; the read in flight dropped their xids). One that committed
    made part of the work durable: running it again would write that part twice,
    acknowledging it would hide the rest missing. Each is asked as the COMMIT's own xid is
    (the same rules: committed only on the same history); anything but 'aborted' raises
    `CommitOutcomeUnknown`. One that aborted (the DBAPI connection's ``rollback()``) leaves the
    work to run again whole. ``commit_xid``: the unit's COMMIT, which did not commit; None: it
    was never sent (``app_ended``: the app's own lost COMMIT is asked so too, with its fence
    and its events).
    """
    for resolution in resolutions:
        try:
            outcome = _settled(pool, dialect, resolution, sleep)
        except CommitOutcomeUnknown as unknown:
            raise _app_ended_unknown(
                commit_xid, resolution.xid, unknown.reason
            ) from resolution.error
        if outcome == "committed":
            raise _app_committed(commit_xid, resolution.xid) from resolution.error


def _raise_if_app_ended_beside(
    pool: Pool,
    dialect: Dialect,
    sleep: Callable[[float], None],
    resolution: _Resolution,
    unknown: CommitOutcomeUnknown,
) -> None:
    """Raise what the app's own earlier commits add to the COMMIT's ``unknown`` outcome.

    An earlier transaction the app ended itself around SQLAlchemy that committed made part of
    the work durable whatever became of the COMMIT: a plain "unknown" would read as all or
    nothing, and an app that runs the work again would write that part twice. Each is asked
    once more (the COMMIT's time is up: one answer, not a wait); committed raises
    `APP_COMMITTED`, unknown `APP_ENDED_UNKNOWN`, both saying the COMMIT's own reason; all
    aborted leaves ``unknown`` as it is.
    """
    for earlier in resolution.earlier():
        try:
            outcome = _settled(pool, dialect, earlier, sleep)
        except CommitOutcomeUnknown as also:
            raise CommitOutcomeUnknown(
                f"{unknown}; and the work had ended a transaction of its own around SQLAlchemy "
                f"(xid {earlier.xid}), and whether that one committed cannot be known either: "
                f"{also.reason}",
                xid=unknown.xid,
                reason=APP_ENDED_UNKNOWN,
            ) from resolution.error
        if outcome == "committed":
            raise CommitOutcomeUnknown(
                f"{unknown}; and the work had ended a transaction of its own around SQLAlchemy "
                f"(the DBAPI connection's commit(), or a COMMIT statement), and that one (xid "
                f"{earlier.xid}) committed: part of the work is durable, so it was neither run "
                "again nor acknowledged",
                xid=unknown.xid,
                reason=APP_COMMITTED,
            ) from resolution.error


def _app_ended(commit_xid: int | None) -> str:
    """Return the start of either error below: what became of the unit's COMMIT."""
    if commit_xid is None:
        lost = "the unit's own COMMIT was never sent"
    else:
        lost = f"the connection failed during COMMIT of transaction {commit_xid}, which did not"
    return f"{lost}; but the work had ended a transaction of its own around SQLAlchemy"


def _app_committed(commit_xid: int | None, xid: int) -> CommitOutcomeUnknown:
    """Return the error for a transaction the app ended itself that committed."""
    return CommitOutcomeUnknown(
        f"{_app_ended(commit_xid)} (the DBAPI connection's commit(), or a COMMIT statement), "
        f"and that one (xid {xid}) committed: part of the work is durable, so it was neither "
        "run again nor acknowledged. Leave the COMMIT to dropsafe (session.flush() sends "
        "statements early; two commits are two units of work)",
        xid=xid,
        reason=APP_COMMITTED,
    )


def _app_ended_unknown(commit_xid: int | None, xid: int, reason: str) -> CommitOutcomeUnknown:
    """Return the error for a transaction the app ended itself that may have committed."""
    return CommitOutcomeUnknown(
        f"{_app_ended(commit_xid)} (xid {xid}), and whether that one committed cannot be "
        f"known: {reason}",
        xid=xid,
        reason=APP_ENDED_UNKNOWN,
    )


def _ask(pool: Pool, dialect: Dialect, resolution: _Resolution) -> _XidStatus:
    pending = resolution.pending
    with _questioning(pool, resolution) as run:
        server = run(SERVER_QUESTION)
        server_life = ServerLife.read(server[0], server[1])
        if server[2]:
            return _XidStatus(None, server_life, in_recovery=True)  # a standby assigns no xid
        crash_possible = not pending.server_life.same_history(server_life)
        row = run(
            status_statement(
                dialect,
                xid=pending.xid,
                backend_pid=pending.backend_pid,
                asks_server_code=crash_possible,
            )
        )
        return _XidStatus(
            row[0],
            server_life,
            in_recovery=False,
            sync_waiting=bool(row[1]),
            checkpoint_redo=lsn_number(server[3]),
            server_code_may_notify=crash_possible and bool(row[2]),
        )


def _fence(pool: Pool, dialect: Dialect, resolution: _Resolution) -> None:
    """Terminate the backend that still holds the pending transaction (if it still does)."""
    pending = resolution.pending
    any_state = resolution.fence_any_state()
    statement = fence_statement(
        dialect,
        xid=pending.xid,
        backend_pid=pending.backend_pid,
        wait_ms=int(resolution.fence_timeout() * 1000),
        any_state=any_state,
    )
    resolution.fenced_idle = True
    resolution.fenced_any = any_state
    try:
        with _questioning(pool, resolution) as run:
            run(statement)
    except Exception as exc:
        if sqlstate_of(exc) != "42501":  # insufficient_privilege: not our backend to end
            raise
        resolution.fencing_refused = True


@contextlib.contextmanager
def _questioning(pool: Pool, resolution: _Resolution) -> Iterator[Callable[[str], Row]]:
    """Give a runner of statements, each in its own transaction, on a new connection.

    The connection is closed afterwards, never pooled: the next question must be free to
    reach another server (the primary, after a standby answered through a load balancer).
    A server that hangs (stopped, frozen) is left when the resolution's time is up, or after a
    second for the one question that is always asked.
    """
    with waits_elsewhere():  # the resolution's own loop waits, within its deadline
        connection = pool.connect()
    question_deadline = max(resolution.deadline, time.monotonic() + _LAST_QUESTION)

    def run(statement: str) -> Row:
        return one_row(connection, statement, rollback="after", deadline=question_deadline)

    try:
        yield run
    finally:
        connection.invalidate()
        connection.close()
