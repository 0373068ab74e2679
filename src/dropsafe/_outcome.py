"""Ambiguous COMMITs: the mark taken right before COMMIT, and the server asked what became of it.

**The mark.** SQLAlchemy's engine-level ``commit`` event fires after every flush and every
``before_commit`` listener, right before the DBAPI COMMIT. There, a unit of work reads its
transaction's xid and its backend's pid in one round trip. A transaction that wrote has an
xid; one that only read has none and may simply run again. ``NOTIFY`` is the exception: it
takes its xid only at COMMIT, so a transaction whose statements mention it is given one in
the mark (``pg_current_xact_id()``) and counts as having written.

**The incarnation.** An xid means something only on the WAL history that handed it out. After
a crash restart (any backend killed hard: the postmaster resets them all and replays WAL) the
WAL still in memory is gone, the postmaster start time does not move, and the lost xids are
handed out again: "committed" may then be a newer transaction's. So each connection reads once,
before the first unit of work it runs, what identifies its server's history:

- ``pg_control_system().system_identifier``: set by initdb, shared by a primary and its
  standbys, different on any other cluster;
- ``pg_stat_bgwriter.stats_reset``: PostgreSQL resets its shared statistics at the end of every
  crash recovery (and a new standby or restored backup starts with its own), but keeps them
  across a clean restart, after which no xid is reused (the shutdown checkpoint records the next
  one). Both are readable by any role. Verified on PostgreSQL 15 by SIGKILLing a backend: the
  value moves on a crash restart and an immediate stop, and stays on a fast restart. A reset by
  an administrator (``pg_stat_reset_shared``) also moves it: that only makes answers unknown.

**The resolution.** If the connection fails during COMMIT, a *new* connection (never a pooled
one: it may sit on the same dead path) asks the server, in one statement, the xid's status, the
server's incarnation and whether it is in recovery:

- another cluster answered: unknown;
- a standby answered (it may lag the primary): ask again, until the time is up;
- ``committed`` counts only on the same incarnation; after a crash or failover it is unknown;
- ``aborted`` is final anywhere: a committed xid is never handed out again;
- ``in progress`` on the same incarnation means the old backend still holds the transaction
  (its COMMIT was lost on the way, or it is still committing): that backend is terminated
  (fenced: a role may terminate its own backends; the pid and xid must still match, so no
  other session is touched) and the server asked again, which gives a definite answer at once.
  Where fencing is refused, the question is asked again until the time is up. On another
  incarnation a running or unassigned ("future") xid is a newer transaction's: ours did not
  commit there.

Anything that cannot be proven raises `CommitOutcomeUnknown`: never a guess.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import event

from dropsafe._classify import classify, sqlstate_of
from dropsafe._errors import CommitOutcomeUnknown
from dropsafe._policy import Policy, seconds
from dropsafe._redaction import describe_error
from dropsafe._watchdog import bounded
from dropsafe.events import CommitResolved, emit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Connection, Dialect, Engine
    from sqlalchemy.pool import Pool

__all__ = [
    "CommitRecorder",
    "Incarnation",
    "Outcome",
    "TransactionMark",
    "learn_incarnation",
    "record_commits",
    "recording",
    "resolve_commit",
]

Outcome = Literal["committed", "aborted"]

_FIRST_POLL = 0.02
_MAX_POLL = 0.5
_FENCE_WAIT = 5.0  # at most this long for a fenced backend to exit
_LAST_QUESTION = 1.0  # the time a question asked after the deadline still gets
# A statement that may queue a notification: NOTIFY or pg_notify().
_NOTIFY = re.compile(r"notify", re.IGNORECASE)


@dataclass(frozen=True)
class Incarnation:
    """One WAL history of one cluster, between two crashes (see the module's docstring)."""

    system_identifier: str | None
    stats_reset: str | None

    @property
    def provable(self) -> bool:
        """Whether equal incarnations prove the same WAL history (both values were read)."""
        return self.system_identifier is not None and self.stats_reset is not None


_UNREADABLE = Incarnation(None, None)


@dataclass(frozen=True)
class TransactionMark:
    """What identifies a transaction for resolution: its xid, backend and server history."""

    xid: int
    backend_pid: int
    incarnation: Incarnation


@dataclass(frozen=True)
class _Sql:
    """The statements for one PostgreSQL generation (xid8 functions arrived in 13)."""

    mark: str
    mark_assigning: str
    status: str
    fence: str


_INCARNATION = (
    "(SELECT system_identifier::text FROM pg_control_system()), "
    "(SELECT stats_reset::text FROM pg_stat_bgwriter)"
)
_SQL_13 = _Sql(
    mark="SELECT pg_current_xact_id_if_assigned()::text, pg_backend_pid()",
    mark_assigning="SELECT pg_current_xact_id()::text, pg_backend_pid()",
    # Our own new xid is beyond every xid handed out so far: ours is "future" if not below it.
    status=(
        "SELECT CASE WHEN '{xid}'::xid8 < pg_current_xact_id() "
        "THEN pg_xact_status('{xid}'::xid8) ELSE 'future' END"
    ),
    fence=(
        "SELECT pg_terminate_backend(pid{wait}) FROM pg_stat_activity "
        "WHERE pid = {pid} AND backend_xid::text::bigint = {xid32}{only_idle}"
    ),
)
_SQL_10 = _Sql(
    mark="SELECT txid_current_if_assigned()::text, pg_backend_pid()",
    mark_assigning="SELECT txid_current()::text, pg_backend_pid()",
    status=("SELECT CASE WHEN {xid} < txid_current() THEN txid_status({xid}) ELSE 'future' END"),
    fence=_SQL_13.fence,
)


def _sql_for(dialect: Dialect) -> _Sql:
    version = getattr(dialect, "server_version_info", None) or (13,)
    return _SQL_13 if version[0] >= 13 else _SQL_10  # noqa: PLR2004 - pg_xact_status: 13+


def _terminate_waits(dialect: Dialect) -> bool:
    version = getattr(dialect, "server_version_info", None) or (14,)
    return bool(version[0] >= 14)  # noqa: PLR2004 - pg_terminate_backend(pid, timeout): 14+


# -- recording the mark ------------------------------------------------------------------------


class CommitRecorder:
    """What one attempt of a unit of work learned about its COMMIT, filled in by listeners."""

    def __init__(self) -> None:
        #: The last COMMIT's mark; None when that transaction wrote nothing.
        self.mark: TransactionMark | None = None
        #: COMMITs sent (or about to be) while armed: more than one cannot be retried whole.
        self.commits_sent = 0
        #: A statement may have queued a NOTIFY, which takes its xid only at COMMIT.
        self.needs_xid = False
        #: Whether to read the mark (``Policy.verify_commits``); COMMITs are counted anyway.
        self.take_marks = True
        self.armed = False

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Record the COMMITs sent inside this block (the unit's own, not the user's)."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


_RECORDER: contextvars.ContextVar[CommitRecorder | None] = contextvars.ContextVar(
    "dropsafe_commit_recorder", default=None
)


@contextlib.contextmanager
def recording(*, take_marks: bool = True) -> Iterator[CommitRecorder]:
    """Give the engines' listeners a recorder for the attempt that runs inside this block.

    A context variable reaches the listeners in threads and in SQLAlchemy's asyncio greenlets
    alike (SQLAlchemy hands its context to the greenlets it spawns).
    """
    recorder = CommitRecorder()
    recorder.take_marks = take_marks
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


class _Incarnations:
    """Each connection's server incarnation, read once when it opens.

    Held weakly by the driver's own connection object (SQLAlchemy's asyncio adapters cannot be
    weakly referenced, the connections they adapt can), so nothing outlives the pool.
    """

    def __init__(self) -> None:
        self._by_connection: weakref.WeakKeyDictionary[Any, Incarnation] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def learn(self, connection: Connection) -> None:
        """Read the incarnation of ``connection``'s server, once per DBAPI connection.

        Called before a unit of work's first statement, so outside any transaction of the
        app (the read is rolled back at the DBAPI level; SQLAlchemy has sent nothing yet).
        A connection that fails here (a pooler that accepted it but cannot reach the server)
        raises: the unit waits and connects again, as for a refused connect. Any other failure
        (a fork or proxy that hides these functions) makes the connection unprovable.
        """
        fairy = connection.connection
        driver_connection = fairy.driver_connection
        with contextlib.suppress(TypeError), self._lock:  # TypeError: not weakly referable
            if driver_connection in self._by_connection:
                return
        dbapi_connection: Any = fairy.dbapi_connection
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SELECT {_INCARNATION}")
                row = cursor.fetchone()
            finally:
                cursor.close()
            dbapi_connection.rollback()
            incarnation = Incarnation(_text(row[0]), _text(row[1]))
        except Exception as exc:
            if classify(exc).retryable:
                connection.invalidate(exc)  # never back to the pool: it is dead
                raise
            with contextlib.suppress(Exception):
                dbapi_connection.rollback()
            incarnation = _UNREADABLE
        with contextlib.suppress(TypeError), self._lock:
            self._by_connection[driver_connection] = incarnation

    def of(self, driver_connection: object) -> Incarnation:
        with contextlib.suppress(TypeError), self._lock:
            return self._by_connection.get(driver_connection, _UNREADABLE)
        return _UNREADABLE


_INCARNATIONS = _Incarnations()


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def learn_incarnation(connection: Connection) -> None:
    """Read the incarnation of ``connection``'s server if it is not known yet (see above)."""
    _INCARNATIONS.learn(connection)


def record_commits(engine: Engine) -> None:
    """Install the listeners that take the mark before each COMMIT of a unit of work.

    Idempotent; installed by the first unit of work on an engine, never by `harden` (an engine
    that runs none keeps SQLAlchemy's event-free fast path). Outside a unit of work they cost
    one context-variable read per statement.
    """
    if event.contains(engine, "commit", _take_mark):
        return
    event.listen(engine, "before_cursor_execute", _notice_notify)
    event.listen(engine, "commit", _take_mark)


def _notice_notify(  # noqa: PLR0917 - SQLAlchemy's before_cursor_execute signature
    conn: Connection,
    cursor: object,
    statement: str,
    parameters: object,
    context: object,
    executemany: bool,
) -> None:
    del conn, cursor, parameters, context, executemany
    recorder = _RECORDER.get()
    if recorder is not None and not recorder.needs_xid and _NOTIFY.search(statement):
        recorder.needs_xid = True


def _take_mark(conn: Connection) -> None:
    """Engine ``commit`` listener: the last moment before COMMIT, after every flush and hook."""
    recorder = _RECORDER.get()
    if recorder is None or not recorder.armed:
        return
    if not recorder.take_marks:
        recorder.commits_sent += 1
        return
    sql = _sql_for(conn.dialect)
    row = conn.exec_driver_sql(sql.mark_assigning if recorder.needs_xid else sql.mark).first()
    recorder.mark = (
        None
        if row is None or row[0] is None
        else TransactionMark(
            int(row[0]), int(row[1]), _INCARNATIONS.of(conn.connection.driver_connection)
        )
    )
    recorder.commits_sent += 1  # from here on, the COMMIT may reach the server


# -- resolution --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: object
    incarnation: Incarnation
    in_recovery: bool


_Decision = Literal["committed", "aborted", "fence", "again"]


class _Resolution:
    """The decision half of resolving: what an answer means, and how long to keep asking."""

    def __init__(
        self, mark: TransactionMark, policy: Policy, error: BaseException, deadline: float
    ) -> None:
        self.mark = mark
        self.policy = policy
        self.error = error
        self.started = time.monotonic()
        self.deadline = deadline
        self.pause = _FIRST_POLL
        self.budget = max(0.0, deadline - self.started)
        self.fenced_idle = False
        self.fenced_any = False
        self.fencing_refused = False
        self.standby_answered = False

    @property
    def xid(self) -> int:
        return self.mark.xid

    def settle(self, answer: _Answer) -> _Decision:  # noqa: PLR0911 - one return per case
        """Say what ``answer`` means; raise `CommitOutcomeUnknown` when it cannot be known."""
        ours = self.mark.incarnation
        theirs = answer.incarnation
        if ours.system_identifier is not None and (
            theirs.system_identifier != ours.system_identifier
        ):
            return self._unknown("a server of another database cluster answered")
        self.standby_answered = answer.in_recovery
        if answer.in_recovery:
            return "again"  # a standby may lag its primary: only a primary can vouch
        same_history = ours.provable and theirs == ours
        other_history = ours.provable and theirs != ours
        status = answer.status
        if status == "aborted" or (other_history and status in ("in progress", "future")):
            # A committed xid is never handed out again: a newer transaction holds ours.
            return self._report("aborted")
        if status == "committed" and same_history:
            return self._report("committed")
        if status == "in progress" and not other_history:
            return "fence" if self.should_fence() else "again"
        if status == "committed":
            return self._unknown(
                f"the server crashed, restarted from a crash or failed over since, and "
                f"'committed' for xid {self.xid} may be a newer transaction that reused it"
                if ours.provable
                else f"the server's history could not be read, so 'committed' for xid "
                f"{self.xid} cannot be told from a reuse of it after a crash"
            )
        return self._unknown(f"the server reports status {status!r} for xid {self.xid}")

    def next_pause(self, failure: BaseException | None = None) -> float:
        """Return how long to wait before asking again, or raise when time is up."""
        if failure is not None and not classify(failure).retryable:
            self._unknown(f"asking the server failed: {describe_error(failure)}", failure)
        if time.monotonic() + self.pause > self.deadline:
            if failure is not None:
                why = f"the server could not be asked in time: {describe_error(failure)}"
            elif self.standby_answered:
                why = "only a standby answered in time, and a standby may lag its primary"
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
        it is fenced at once. One still running its COMMIT (a slow trigger, a synchronous
        standby) is given half the time, then fenced too, for an answer rather than none. Each
        once: a backend that did not exit when told (stopped, stuck) will not later.
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
        emit(self.policy.hooks, CommitResolved(self.xid, outcome, self._elapsed()))
        return outcome

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _unknown(self, reason: str, failure: BaseException | None = None) -> _Decision:
        emit(self.policy.hooks, CommitResolved(self.xid, "unknown", self._elapsed()))
        raise CommitOutcomeUnknown(
            f"the connection failed during COMMIT of transaction {self.xid} and its outcome "
            f"cannot be known: {reason}",
            xid=self.xid,
            reason=reason,
        ) from (failure or self.error)


def resolve_commit(
    engine: Engine,
    mark: TransactionMark,
    policy: Policy,
    error: BaseException,
    *,
    deadline: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Ask the server (new connections) whether the marked transaction committed.

    Keeps asking until ``min(commit_status_timeout, deadline)``, but always asks at least once.
    Async engines run this in SQLAlchemy's greenlet with an awaiting ``sleep``.
    """
    bound = time.monotonic() + seconds(policy.commit_status_timeout)
    resolution = _Resolution(mark, policy, error, min(bound, deadline))
    pool = engine.pool.recreate()  # new connections, with the engine's creator and listeners
    sql = _sql_for(engine.dialect)
    try:
        while True:
            try:
                decision = resolution.settle(_ask(pool, sql, mark, resolution))
                if decision == "fence":
                    _fence(pool, sql, mark, resolution, engine.dialect)
                    continue
            except CommitOutcomeUnknown:
                raise
            except Exception as exc:  # noqa: BLE001 - next_pause decides (retryable or not)
                sleep(resolution.next_pause(exc))
                continue
            if decision != "again":
                return decision
            sleep(resolution.next_pause())
    finally:
        pool.dispose()


def _ask(pool: Pool, sql: _Sql, mark: TransactionMark, resolution: _Resolution) -> _Answer:
    with _questioning(pool, resolution) as run:
        server = run(f"SELECT {_INCARNATION}, pg_is_in_recovery()")
        incarnation = Incarnation(_text(server[0]), _text(server[1]))
        if server[2]:
            return _Answer(None, incarnation, in_recovery=True)  # a standby assigns no xid
        return _Answer(run(sql.status.format(xid=mark.xid))[0], incarnation, in_recovery=False)


def _fence(
    pool: Pool, sql: _Sql, mark: TransactionMark, resolution: _Resolution, dialect: Dialect
) -> None:
    """Terminate the backend that still holds the marked transaction (if it still does)."""
    wait = f", {int(resolution.fence_timeout() * 1000)}" if _terminate_waits(dialect) else ""
    any_state = resolution.fence_any_state()
    statement = sql.fence.format(
        pid=mark.backend_pid,
        xid32=mark.xid % 2**32,
        wait=wait,
        only_idle="" if any_state else " AND state <> 'active'",
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
def _questioning(pool: Pool, resolution: _Resolution) -> Iterator[Callable[[str], tuple[Any, ...]]]:
    """Give a runner of statements, each in its own transaction, on a new connection.

    The connection is closed afterwards, never pooled: the next question must be free to
    reach another server (the primary, after a standby answered through a load balancer).
    A server that hangs (stopped, frozen) is left when the resolution's time is up, or after a
    second for the one question that is always asked.
    """
    connection = pool.connect()
    question_deadline = max(resolution.deadline, time.monotonic() + _LAST_QUESTION)

    def run(statement: str) -> tuple[Any, ...]:
        cursor = connection.cursor()
        try:
            cursor.execute(statement)
            row = cursor.fetchone()
        finally:
            cursor.close()
        connection.rollback()
        return tuple(row) if row is not None else (None, None, False)

    try:
        with bounded(connection.dbapi_connection, question_deadline):
            yield run
    finally:
        connection.invalidate()
        connection.close()
