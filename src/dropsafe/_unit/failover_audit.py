"""Acknowledged commits that a failover lost: remembered, checked once, each one reported.

With asynchronous replication a promoted standby may lack the last commits its primary
acknowledged. Each verified unit's commit is kept, with the WAL position read in its mark, in
a fixed ring per engine (`AcknowledgedCommits`, in the engine's `EngineState`); after the first
commit on another history, the new server is asked once about the older ones (`judge`
decides, pure) and each lost or unknown one is reported
(`dropsafe.events.AcknowledgedCommitLost`). Why each rule holds, and what is not covered:
docs/guarantees.md, "Commits a failover lost, reported".
"""

from __future__ import annotations

import threading
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dropsafe._backoff import waits_elsewhere
from dropsafe._commit_truth.pending_commit import lsn_number
from dropsafe._commit_truth.server_life import ServerLife
from dropsafe._commit_truth.server_sql import audit_question, one_row
from dropsafe._engine_state import peek_state, state_of
from dropsafe._hooks import emit
from dropsafe._process import renew_lock_in_child
from dropsafe._redaction import describe_error
from dropsafe.events import AcknowledgedCommitLost

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.engine import Engine

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._engine_state import EngineState
    from dropsafe.events import Hook

__all__ = [
    "REMEMBERED_COMMITS",
    "AcknowledgedCommits",
    "SuccessorState",
    "audit_after_failover",
    "judge",
    "remember_commit",
]

#: How many acknowledged commits each engine remembers (the newest).
REMEMBERED_COMMITS = 10_000
_CHECK_TIMEOUT = 5.0  # the one question to the new server: at most this long
_TRIES = 3  # questions that could not be answered before the commits are reported unknown


@dataclass(frozen=True)
class SuccessorState:
    """What the server that took over says about the remembered commits."""

    server_life: ServerLife
    in_recovery: bool
    fork_lsn: int | None  # pg_last_wal_replay_lsn(); None: no recovery since it started
    statuses: Sequence[str]  # one per commit asked about, in order


@dataclass(frozen=True)
class _Commit:
    """One remembered commit, taken out of the ring to be checked."""

    server_life: ServerLife
    xid: int
    wal_lsn: int  # 0: not read
    unit: str
    committed_at: float


Verdict = tuple[Literal["lost", "unknown"], str]


def judge(commits: Sequence[_Commit], answer: SuccessorState) -> list[Verdict | None] | None:
    """Say, per commit, whether the server that answered lost it (None: it has it).

    Returns None when this answer cannot judge them (a standby answered, or a server of their
    own life: ask later). Pure: docs/guarantees.md says why each rule holds.
    """
    theirs = answer.server_life
    if answer.in_recovery or any(commit.server_life.same_history(theirs) for commit in commits):
        return None
    newest_old_life = commits[-1].server_life if commits else None
    verdicts: list[Verdict | None] = []
    for commit, status in zip(commits, answer.statuses, strict=True):
        verdicts.append(_verdict(commit, status, answer, newest_old_life))
    return verdicts


def _verdict(
    commit: _Commit, status: str, answer: SuccessorState, newest_old_life: ServerLife | None
) -> Verdict | None:
    doubt = _cannot_judge(commit, answer, newest_old_life)
    if doubt is not None:
        return ("unknown", doubt)
    fork = answer.fork_lsn or 0
    if commit.wal_lsn >= fork:
        why = (
            f"its commit record lies at or after {_lsn_text(commit.wal_lsn)}, past the WAL "
            f"the server that took over replayed (up to {_lsn_text(fork)}): asynchronous "
            f"replication or an unflushed commit lost it"
        )
        return ("lost", why)
    if status != "committed":
        why = (
            f"the server that took over reports it {status!r} "
            f"(its WAL replayed up to {_lsn_text(fork)})"
        )
        return ("lost", why)
    return None


def _cannot_judge(
    commit: _Commit, answer: SuccessorState, newest_old_life: ServerLife | None
) -> str | None:
    """Say why this answer proves nothing about this commit (None: it does)."""
    if commit.server_life.system_identifier != answer.server_life.system_identifier:
        return "a server of another database cluster took over"
    if not commit.server_life.same_history(newest_old_life):
        return "the server failed over (or crashed) more than once before it was asked"
    if answer.fork_lsn is None:
        return (
            "the server that took over has not recovered since it started, so where its "
            "history forked cannot be read"
        )
    if not commit.wal_lsn:
        return "the WAL position before its COMMIT was not read"
    return None


def _lsn_text(number: int) -> str:
    return f"{number >> 32:X}/{number & 0xFFFFFFFF:X}"


class AcknowledgedCommits:
    """One engine's acknowledged commits: a ring of fixed size, allocated once.

    Parallel arrays rather than an object per commit: the ring is written on every verified
    unit's commit and must not grow the process (tests/engine/test_checkout_scale.py).
    A slot whose life is None is empty, or was taken out to be checked.
    """

    def __init__(self, size: int = REMEMBERED_COMMITS) -> None:
        self.size = size
        self._xids = array("Q", bytes(8 * size))
        self._lsns = array("Q", bytes(8 * size))
        self._times = array("d", bytes(8 * size))
        self._units: list[str] = [""] * size
        self._lives: list[ServerLife | None] = [None] * size
        self._next = 0
        self._newest_life: ServerLife | None = None
        self._due = False  # commits of an older life wait for a check
        self._held: list[_Commit] = []  # taken out, not answered yet
        self._tries = 0
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork

    def add(self, pending: PendingCommit, unit: str, committed_at: float) -> bool:
        """Remember an acknowledged commit; return whether a check is due now."""
        life = pending.server_life
        with self._lock:
            newest = self._newest_life
            if newest is not None and (newest is life or newest.same_history(life)):
                # One object per history: a stats reset or a clean restart since the first
                # commit of it makes a life that differs but is the same history.
                life = newest
            else:
                if newest is not None:
                    self._due = True
                self._newest_life = life
            slot = self._next % self.size
            self._next += 1
            self._xids[slot] = pending.xid
            self._lsns[slot] = pending.wal_lsn
            self._times[slot] = committed_at
            self._units[slot] = unit
            self._lives[slot] = life
            return self._due

    def take_older(self) -> tuple[list[_Commit], ServerLife | None]:
        """Take out every commit of a life other than the newest, oldest first, to check.

        Taken once: a check that runs at the same time in another thread gets none.
        """
        with self._lock:
            newest = self._newest_life
            taken = self._held
            self._held = []
            first = max(0, self._next - self.size)
            for number in range(first, self._next):
                slot = number % self.size
                life = self._lives[slot]
                if life is None or life is newest:
                    continue
                taken.append(
                    _Commit(
                        life,
                        self._xids[slot],
                        self._lsns[slot],
                        self._units[slot],
                        self._times[slot],
                    )
                )
                self._lives[slot] = None
                self._units[slot] = ""
            self._due = False
            return taken, newest

    def failed_try(self) -> int:
        """Count a question that judged nothing; return how many so far."""
        with self._lock:
            self._tries += 1
            return self._tries

    def judged(self) -> None:
        """Start counting failed questions afresh: the last one was answered."""
        with self._lock:
            self._tries = 0

    def put_back(self, commits: list[_Commit]) -> None:
        """Keep commits that could not be judged for the next check."""
        with self._lock:
            self._held = commits + self._held
            self._due = True


def remember_commit(engine: Engine, pending: PendingCommit, unit: str) -> bool:
    """Remember an acknowledged commit of ``engine``; True: call `audit_after_failover` now."""
    if not pending.server_life.provable:
        return False  # no life to tell a failover by
    if pending.asynchronous:
        return False  # wrote nothing: the mark gave it an xid (for a NOTIFY it may have queued)
    state = state_of(engine)
    memory = _acknowledged_of(state)
    if memory is None:
        with state.lock:
            memory = _acknowledged_of(state)
            if memory is None:
                memory = state.acknowledged = AcknowledgedCommits()
    return memory.add(pending, unit, time.time())


def _acknowledged_of(state: EngineState | None) -> AcknowledgedCommits | None:
    """Return the ring in ``state``'s slot for it (its one reader), if made."""
    memory = None if state is None else state.acknowledged
    return memory if isinstance(memory, AcknowledgedCommits) else None


def audit_after_failover(engine: Engine, hooks: tuple[Hook, ...]) -> None:
    """Ask ``engine``'s server which remembered commits of older lives it lost; report them.

    Runs once per server change, right after a unit committed on the new server. Never
    raises: the unit it runs after has committed, and reporting must not undo that.
    """
    memory = _acknowledged_of(peek_state(engine))
    if memory is None:
        return
    commits, _ = memory.take_older()
    if not commits:
        return
    verdicts: list[Verdict | None] | None = None
    why = "the server that took over was not a primary of a new life when asked"
    try:
        verdicts = judge(commits, _ask(engine, commits))
    except Exception as exc:  # noqa: BLE001 - said in the events when out of tries
        why = f"the server that took over could not be asked: {describe_error(exc)}"
    except BaseException:  # a cancelled task: the next commit asks again
        memory.put_back(commits)
        raise
    if verdicts is None:
        if memory.failed_try() < _TRIES:
            memory.put_back(commits)  # asked again after the next commit
            return
        verdicts = [("unknown", why)] * len(commits)
    memory.judged()
    for commit, verdict in zip(commits, verdicts, strict=True):
        if verdict is not None:
            outcome, reason = verdict
            lost = AcknowledgedCommitLost(
                commit.xid, commit.unit, commit.committed_at, outcome, reason
            )
            emit(hooks, lost)


def _ask(engine: Engine, commits: Sequence[_Commit]) -> SuccessorState:
    """One statement on a pooled connection (the unit just committed on one: it works)."""
    statement = audit_question(engine.dialect, (commit.xid for commit in commits))
    with waits_elsewhere():  # bounded by _CHECK_TIMEOUT, not by the engine's connect_wait
        connection = engine.raw_connection()
    try:
        # One row, always: a SELECT without FROM.
        deadline = time.monotonic() + _CHECK_TIMEOUT
        row = one_row(connection, statement, rollback="after", deadline=deadline)
    except BaseException:
        connection.invalidate()
        raise
    finally:
        connection.close()
    statuses = str(row[4]).split(",") if row[4] else []
    return SuccessorState(
        ServerLife.read(row[0], row[1]),
        bool(row[2]),
        None if row[3] is None else lsn_number(row[3]),
        statuses,
    )
