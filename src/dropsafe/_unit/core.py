"""What a unit of work does next: every decision of `run_transaction`, with no I/O.

A generator, driven by two thin runners (`dropsafe._unit.run_sync`, `dropsafe._unit.run_async`)
as h11 is driven by httpx: it yields a step (`Run`, `Resolve`, `Sleep`), the runner performs it
and sends back what happened; it returns the unit's result or raises what the caller must see.
Because both faces drive the same generator, they cannot disagree on what an error means or when
to give up. The rules: docs/guarantees.md, "How it keeps it".
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from dropsafe._backoff import backoff
from dropsafe._classify import ErrorKind, classify
from dropsafe._errors import CommitOutcomeUnknown
from dropsafe._hooks import emit
from dropsafe._policy import UnitPolicy, seconds
from dropsafe._process import reseed_in_child
from dropsafe._redaction import describe_error
from dropsafe.events import RetriesGaveUp, RetryScheduled

if TYPE_CHECKING:
    from collections.abc import Generator

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe.events import Hook

__all__ = [
    "CommitFailed",
    "Committed",
    "Failed",
    "Resolve",
    "RetryBudget",
    "Run",
    "Sleep",
    "unit_of_work",
]

_T = TypeVar("_T")


# -- the steps the core asks for ---------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run the function once and commit; nothing may wait past ``deadline`` (monotonic)."""

    deadline: float
    verify_commits: bool  # read the server's life and the xid before COMMIT


@dataclass(frozen=True)
class Resolve:
    """Ask the server whether ``pending`` committed: for ``timeout`` s, never past ``deadline``."""

    pending: PendingCommit
    error: Exception
    timeout: float
    deadline: float
    #: ``pending`` is a transaction the function ended itself around SQLAlchemy (its own
    #: COMMIT through the DBAPI connection, lost): committed or unknown raises
    #: `CommitOutcomeUnknown`, never 'committed' (the unit's own COMMIT was never sent).
    app_ended: bool = False


@dataclass(frozen=True)
class Sleep:
    """Wait before the next run."""

    seconds: float


Step = Run | Resolve | Sleep


# -- what a run reports back -------------------------------------------------------------------


@dataclass(frozen=True)
class Committed(Generic[_T]):
    """The COMMIT succeeded (``pending``: what its mark read; None: it wrote nothing)."""

    result: _T
    pending: PendingCommit | None = None


@dataclass(frozen=True)
class Failed:
    """The run failed before its COMMIT was sent (``reached_server``: it got a connection)."""

    error: Exception
    reached_server: bool
    #: Xids read in the attempt's transaction that the function may have committed itself,
    #: around SQLAlchemy (`dropsafe._unit.recording`: ``ended_around`` when the function
    #: raised, the reads dropped before the mark when it or the COMMIT failed): asked about
    #: before a rerun.
    earlier: tuple[PendingCommit, ...] = ()


@dataclass(frozen=True)
class CommitFailed(Generic[_T]):
    """COMMIT raised after it was sent: what the function returned, and what was recorded."""

    result: _T
    error: Exception
    pending: PendingCommit | None  # None: the transaction wrote nothing
    commits_sent: int
    #: Another connection of the unit committed before (a unit over several engines): a
    #: ``NOTIFY`` it queued was delivered, so the unit cannot run again
    #: (`dropsafe._unit.recording`).
    committed_before: bool = False
    #: As `Failed.earlier`: the transactions the function ended itself before this COMMIT
    #: (``pending`` carries them too, and its resolution asks about them).
    earlier: tuple[PendingCommit, ...] = ()


Report = Committed[Any] | Failed | CommitFailed[Any]
Reply = Report | Literal["committed", "aborted"] | None


# -- the core ----------------------------------------------------------------------------------


def unit_of_work(policy: UnitPolicy, hooks: tuple[Hook, ...]) -> Generator[Step, Reply, Any]:
    """Yield the steps of one unit of work; return its result (see the module's docstring)."""
    budget = RetryBudget(policy, hooks)
    while True:
        report = yield Run(budget.deadline, policy.verify_commits)
        if isinstance(report, Committed):
            return report.result
        if isinstance(report, CommitFailed) and _may_have_committed(report, policy):
            asked: tuple[PendingCommit, ...] = ()
            if report.pending is not None:
                timeout = seconds(policy.commit_status_timeout)
                outcome = yield Resolve(report.pending, report.error, timeout, budget.deadline)
                if outcome == "committed":
                    return report.result
                asked = report.pending.earlier  # its resolution asked about them
            # First: a transaction the app committed itself says more than "another
            # connection committed" (which may have been only a NOTIFY).
            yield from _ask_about_earlier(report, policy, budget, asked)
            if report.committed_before:
                raise CommitOutcomeUnknown(
                    "the connection failed during a COMMIT of a unit of work over several "
                    "connections after another of them had committed (a NOTIFY it queued was "
                    "delivered); running the unit again could deliver it twice",
                    xid=None if report.pending is None else report.pending.xid,
                    reason="another connection committed before",
                ) from report.error
            # Aborted, or it wrote nothing: running it again is harmless.
            yield Sleep(budget.next_delay(ErrorKind.DISCONNECT, report.error))
            continue
        if not isinstance(report, (Failed, CommitFailed)):  # pragma: no cover - a driver's bug
            raise TypeError(f"a Run is answered with a report, not {report!r}")
        reached_server = report.reached_server if isinstance(report, Failed) else True
        kind = _retryable_kind(report.error)
        yield from _ask_about_earlier(report, policy, budget)
        yield Sleep(budget.next_delay(kind, report.error, reached_server=reached_server))


def _ask_about_earlier(
    report: Failed | CommitFailed[Any],
    policy: UnitPolicy,
    budget: RetryBudget,
    asked: tuple[PendingCommit, ...] = (),
) -> Generator[Step, Reply, None]:
    """Before a rerun, ask about the transactions the function ended itself (``earlier``).

    The function ended them around SQLAlchemy (the DBAPI connection's ``commit()``), and one
    may have committed part of the unit: running it again would write that part twice,
    whatever became of the rest (the function raised, the mark was lost before the COMMIT was
    sent, the COMMIT was refused or carried no xid). Committed or unknown raises
    `CommitOutcomeUnknown` (`Resolve.app_ended`); all aborted, the unit runs again. Those
    ``asked`` already (with the COMMIT that carried them) are not asked twice. Each engine's
    are asked on its own server (a unit over several: `PendingCommit.engine_ref`), in one
    resolution per engine.
    """
    earlier = [ended for ended in report.earlier if ended not in asked]
    timeout = seconds(policy.commit_status_timeout)
    while earlier:
        first = earlier[0]
        ref = first.engine_ref
        same = [ended for ended in earlier if ended.engine_ref is ref]
        earlier = [ended for ended in earlier if ended.engine_ref is not ref]
        pending = dataclasses.replace(first, earlier=tuple(same[1:]))
        yield Resolve(pending, report.error, timeout, budget.deadline, app_ended=True)


def _may_have_committed(report: CommitFailed[Any], policy: UnitPolicy) -> bool:
    """Whether the COMMIT may have happened, so that the server must be asked before a rerun.

    Raises `CommitOutcomeUnknown` when it may have happened and cannot be asked about.
    """
    error = report.error
    if classify(error, during_commit=True) is not ErrorKind.COMMIT_UNKNOWN:
        # PostgreSQL refused the COMMIT (nothing committed), or the error is not the
        # database's at all (the app's own listener): retried or raised like any other.
        return False
    if not policy.verify_commits:
        raise CommitOutcomeUnknown(
            "the connection failed during COMMIT and UnitPolicy.verify_commits is off, "
            "so its outcome was not recorded",
            xid=None,
            reason="verify_commits is off",
        ) from error
    if report.commits_sent > 1:
        raise CommitOutcomeUnknown(
            "the connection failed during a COMMIT of a unit of work that committed on more "
            "than one connection; a partial commit cannot be retried whole",
            xid=None if report.pending is None else report.pending.xid,
            reason="more than one connection committed",
        ) from error
    return True


def _retryable_kind(error: Exception) -> ErrorKind:
    """Return the kind of a retryable error; raise ``error`` unchanged when it is not."""
    kind = classify(error)
    if not kind.retryable:
        raise error
    return kind


# One generator for the process: seeding one per unit of work (from os.urandom) cost more than
# the rest of the budget. Its methods are safe to share between threads. Reseeded in a forked
# child: workers forked from one parent would otherwise all retry at the same instants.
_JITTER = reseed_in_child(random.Random())  # jitter, not cryptography


class RetryBudget:
    """Counts the runs of one unit of work and decides how long to wait before the next.

    Only runs that reached the server count against ``UnitPolicy.max_attempts``: while the
    server cannot be reached at all (a restart, a failover), connecting is retried with the same
    backoff until the deadline, as psycopg_pool's ``reconnect_timeout`` does. The deadline is
    absolute: no run starts once it has passed.

    When the budget runs out, the last error itself is raised, not a wrapper: an app's
    ``except OperationalError:`` keeps catching what it caught before dropsafe (stamina's
    choice, not tenacity's). A note on the error (Python 3.11+) and a `RetriesGaveUp` event
    say how many runs were made and why they stopped.
    """

    def __init__(
        self, policy: UnitPolicy, hooks: tuple[Hook, ...], *, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self.hooks = hooks
        self.number = 1
        self.failed_connects = 0
        self.started = time.monotonic()
        self.deadline = self.started + seconds(policy.deadline)
        self._rng = rng or _JITTER

    def next_delay(
        self, kind: ErrorKind, error: Exception, *, reached_server: bool = True
    ) -> float:
        """Return the backoff before the next run, or raise ``error`` when none may follow.

        ``reached_server`` is False when the run failed to get a connection at all: that
        does not use up an attempt, only time.
        """
        text = describe_error(error)
        if reached_server and self.number >= self.policy.max_attempts:
            self._give_up("attempts", text, error)
        delay = backoff(self.policy, self.number + self.failed_connects, self._rng)
        if time.monotonic() + delay >= self.deadline:
            self._give_up("deadline", text, error)
        emit(self.hooks, RetryScheduled(self.number, delay, kind, text))
        if reached_server:
            self.number += 1
        else:
            self.failed_connects += 1
        return delay

    def _give_up(
        self, reason: Literal["attempts", "deadline"], text: str, error: Exception
    ) -> None:
        elapsed = time.monotonic() - self.started
        emit(self.hooks, RetriesGaveUp(self.number, elapsed, reason, text))
        runs = f"{self.number} attempt(s)"
        if self.failed_connects:
            runs += f" and {self.failed_connects} failed connect(s)"
        if reason == "attempts":
            why = f"after {runs}"
        else:
            why = f"at the {seconds(self.policy.deadline):g}s deadline after {runs}"
        note = f"dropsafe: the unit of work gave up {why} in {elapsed:.2f}s"
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(note)
        raise error
