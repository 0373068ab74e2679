"""What the sync and the async runner of a unit share: everything around an attempt but its I/O.

The checks of the unit's function, the loop over the core's steps, an attempt's report (the
engines to watch, a COMMIT that raised), and the acknowledgement of a commit (remembered for
the failover audit). The runners (`dropsafe._unit.run_sync`, `dropsafe._unit.run_async`) only
perform the steps, each with its own awaits. See docs/guarantees.md ("How it keeps it",
"Units over several engines").
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dropsafe._commit_truth.resolution import resolve_commit
from dropsafe._engine_state import state_of
from dropsafe._errors import ConfigurationError
from dropsafe._unit.core import CommitFailed, Committed, Failed, Resolve, Run
from dropsafe._unit.failover_audit import remember_commit
from dropsafe._unit.recording import (
    ended_around,
    on_its_engine,
    other_connections,
    watch_engine,
    watch_engines_of_routing,
)
from dropsafe._unit.shapes import check_engine_shape
from dropsafe._unit.tracker import current_attempt

if TYPE_CHECKING:
    from collections.abc import Generator

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._commit_truth.resolution import Outcome
    from dropsafe._unit.core import Reply, Report, Step
    from dropsafe._unit.tracker import AttemptTracker
    from dropsafe.events import Hook

__all__ = [
    "Attempt",
    "Done",
    "acknowledged",
    "check_still_open",
    "check_unit_function",
    "commit_failed",
    "engine_of",
    "function_name",
    "next_step",
    "not_awaitable",
    "note_cancelled_commit",
    "refusal_or",
    "resolution",
    "unit_name",
    "watch_binds",
    "watch_engines_reached",
    "watch_session",
]

_T = TypeVar("_T")

_FunctionType = types.FunctionType
#: The flag of an ``async def`` function's code, which `inspect.iscoroutinefunction` reads.
_ASYNC_CODE = inspect.CO_COROUTINE


# -- before the unit runs ----------------------------------------------------------------------


def check_unit_function(fn: object, *, want_async: bool) -> None:
    """Refuse what cannot be a unit's function here: not callable, the wrong face, nested.

    A plain function (the usual ``fn``) is known sync by its code's flags alone, as
    `inspect.iscoroutinefunction` reads them (with its marker, Python 3.12+): one call where
    the full checks make seven, at every unit. Read at every call, never cached: a function's
    ``__code__`` may be replaced.
    """
    if type(fn) is _FunctionType and not (
        fn.__code__.co_flags & _ASYNC_CODE or "_is_coroutine_marker" in fn.__dict__
    ):
        pass  # callable, and not async
    elif not callable(fn):
        raise ConfigurationError(f"fn must be callable, not {type(fn).__name__}")
    elif want_async is False and inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"{function_name(fn)} is async: use await run_transaction_async(...)"
        )
    if current_attempt() is not None:
        raise ConfigurationError(
            "run_transaction was called inside a unit of work; the inner one could not be "
            "retried on its own. Do the work with the session you were given instead."
        )


def watch_binds(bind: object, engine: sa.Engine) -> None:
    """Install the unit's listeners on its engine and on its sessionmaker's other binds."""
    watch_engine(engine)
    kw = getattr(bind, "kw", None)  # a sessionmaker's (sync or async); an engine has none
    binds = kw.get("binds") if kw is not None else None
    if not binds:
        return
    seen = (id(binds), len(binds))  # a sessionmaker's binds, as last watched
    if _WATCHED_BINDS.get(bind) == seen:
        return  # many binds (one per model) would otherwise cost a loop per unit
    for target in binds.values():
        # An Engine, an AsyncEngine (its sync_engine) or a Connection (its engine).
        other = getattr(target, "sync_engine", None) or getattr(target, "engine", None)
        if isinstance(other, sa.Engine):
            check_engine_shape(other)  # an AUTOCOMMIT bind is refused as the main one is
            watch_engine(other)
    _WATCHED_BINDS[bind] = seen


_WATCHED_BINDS: weakref.WeakKeyDictionary[object, tuple[int, int]] = weakref.WeakKeyDictionary()


# -- the loop over the core's steps ------------------------------------------------------------


@final
@dataclass(frozen=True)
class Done:
    """The core has returned: ``value`` is the unit's result."""

    value: Any


def next_step(core: Generator[Step, Reply, Any], reply: Reply) -> Step | Done:
    """Send ``reply`` to the core; its next step, or `Done`: a face's loop has a single exit."""
    try:
        return core.send(reply)
    except StopIteration as done:
        return Done(done.value)


def resolution(
    step: Resolve, engine: sa.Engine, hooks: tuple[Hook, ...]
) -> functools.partial[Outcome]:
    """`resolve_commit` with what ``step`` asks: the sync face calls it, the async one spawns it."""
    return functools.partial(
        resolve_commit,
        engine_of(step.pending, engine),
        step.pending,
        step.error,
        timeout=step.timeout,
        deadline=step.deadline,
        hooks=hooks,
        app_ended=step.app_ended,
    )


# -- one attempt -------------------------------------------------------------------------------


@final
class Attempt:
    """An attempt's report to the core, built alike by both faces around their own I/O.

    A face connects, runs the function and commits (awaiting where it must), and tells this
    object each stage it reached; what each stage means for the report is decided here once.
    """

    __slots__ = ("_committed", "_reached_server", "tracker")

    def __init__(self, tracker: AttemptTracker) -> None:
        self.tracker = tracker
        self._reached_server = False  # a failure before the server answered is not an attempt
        self._committed: Committed[Any] | None = None

    def function_raised(self, connection: sa.Connection, error: Exception) -> None:
        """Note what the function may have committed itself before it raised ``error``.

        Read while its transaction is still open (`ended_around`): a rerun asks about it first.
        """
        tracker = self.tracker
        if not tracker.read_xid:
            return
        earlier = ended_around(connection, error)
        if tracker.session is not None:  # a unit over several engines: each one's, on its own
            for other in other_connections(tracker.session, connection):
                earlier += on_its_engine(ended_around(other, error), other)
        tracker.earlier = earlier

    def connected(self, connection: sa.Connection) -> None:
        """Note the attempt's connection; keep the engine's replay out: the unit reruns whole."""
        self.tracker.connection = connection
        state_of(connection.engine).first_statement_sent(connection.connection)

    def reached_server(self, session: Session | None) -> None:
        """Count the attempt from here: the server answered (``session``: None on a Connection)."""
        self._reached_server = True
        if session is not None:
            watch_session(session, self.tracker)

    def ran(self, in_transaction: bool) -> None:
        """Check that the function left its transaction to us; watch the engines it reached."""
        check_still_open(in_transaction, self.tracker)
        if self.tracker.session is not None:
            watch_engines_reached(self.tracker.session)

    def commit_raised(self, result: _T, error: Exception, handle: object) -> Report:
        """Report the unit's commit that raised: in its COMMIT, or in a hook after it."""
        if not self.tracker.commit_completed(handle):
            return commit_failed(result, error, self.tracker)
        self.tracker.hook_failed(error)  # a hook raised after the COMMIT: it committed
        return self.committed(result)

    def committed(self, result: _T) -> Committed[_T]:
        """Report a commit; kept, should closing the session raise after it."""
        self._committed = Committed(result, self.tracker.pending)
        return self._committed

    def failed(self, error: Exception) -> Report:
        """Report what the attempt raised; after its commit, only a hook's error (reported)."""
        if self._committed is not None:  # a hook raised as the session closed, after the COMMIT
            self.tracker.hook_failed(error)
            return self._committed
        tracker = self.tracker
        return Failed(refusal_or(error, tracker), self._reached_server, tracker.earlier)


# -- while it runs -----------------------------------------------------------------------------


def watch_session(session: Session, attempt: AttemptTracker) -> None:
    """Let the listeners see ``session``'s connections, and a routing session's new engines."""
    attempt.session = session
    if type(session).get_bind is not Session.get_bind:
        watch_engines_of_routing(type(session))


def watch_engines_reached(session: Session) -> None:
    """Watch the engines the function reached beyond the sessionmaker's binds; before COMMIT.

    SQLAlchemy sends the COMMITs in no set order, and the first one sent must already be seen.
    One ``len`` for a unit on one engine.
    """
    for connection in other_connections(session):
        watch_engine(connection.engine)


def check_still_open(in_transaction: bool, attempt: AttemptTracker) -> None:
    """Refuse a function that ended its unit's transaction itself (its COMMIT is ours)."""
    if attempt.refusal is not None:
        raise attempt.refusal  # its own COMMIT was refused, and the function went on
    if not in_transaction:
        raise ConfigurationError(
            "the unit of work committed or rolled back its own transaction; "
            "leave that to run_transaction (it must read the xid before COMMIT)"
        )


def refusal_or(error: Exception, attempt: AttemptTracker) -> Exception:
    """Return the refusal of the unit's shape, if any, rather than what followed from it.

    A function that caught the refusal of its own COMMIT fails next on the transaction that
    SQLAlchemy left to be rolled back: the refusal says why.
    """
    return attempt.refusal if attempt.refusal is not None else error


def not_awaitable(result: _T, fn: object) -> _T:
    """Return a sync function's result; refuse an awaitable (an async function's)."""
    if result is not None and inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise ConfigurationError(
            f"{function_name(fn)} returned an awaitable: use run_transaction_async for async "
            "functions"
        )
    return result


# -- after its COMMIT --------------------------------------------------------------------------


def commit_failed(
    result: _T, error: Exception, attempt: AttemptTracker
) -> Committed[_T] | CommitFailed[_T]:
    """Report a COMMIT that raised; one that was never sent is an ordinary failure."""
    if not attempt.commits_sent:
        raise error  # before COMMIT was sent: a flush, a before_commit hook, the xid read
    if attempt.marks is not None:  # several connections, at most one of which wrote
        if attempt.writer_committed():
            return Committed(result, attempt.pending)  # this one wrote nothing: no effect
        # A connection committed before this one had an xid (every one on a primary does):
        # perhaps only for a NOTIFY, delivered now; the unit must not run again.
        committed_before = any(attempt.marks.get(c) is not None for c in attempt.sent[:-1])
        if attempt.sent[-1] is not attempt.writer:
            # The writer's COMMIT was never sent (or none wrote): no row committed.
            return CommitFailed(result, error, None, 1, committed_before, attempt.earlier)
        return CommitFailed(result, error, attempt.pending, 1, committed_before, attempt.earlier)
    earlier = attempt.earlier
    return CommitFailed(result, error, attempt.pending, attempt.commits_sent, earlier=earlier)


def note_cancelled_commit(cancel: BaseException, attempt: AttemptTracker) -> None:
    """Say on a cancellation that the COMMIT was in flight: nothing else tells the caller.

    A cancelled task must end with ``CancelledError`` (asyncio and anyio depend on it), so the
    unit cannot end as `CommitOutcomeUnknown`; the caller's ``TimeoutError`` carries this note
    in its cause. The xid, when recorded, lets an operator ask ``pg_xact_status``.
    """
    if not hasattr(cancel, "add_note"):  # Python 3.10
        return
    pending = attempt.pending
    xid = "" if pending is None else f" (xid {pending.xid})"
    cancel.add_note(
        f"dropsafe: cancelled while its COMMIT was in flight{xid}: the transaction may or may "
        "not have committed; check before running it again"
    )


def acknowledged(
    engine: sa.Engine, reply: Reply, step: Run | Resolve, name: str
) -> sa.Engine | None:
    """Remember a commit acknowledged to the app; return the engine to audit for a failover now.

    The healthy path's whole cost of `dropsafe._unit.failover_audit`: a few stores in a ring. In a
    unit over several engines, the commit is remembered (and audited) on the engine that wrote.
    ``name`` is the unit's (`unit_name`).
    """
    if isinstance(step, Resolve):
        pending = step.pending if reply == "committed" and not step.app_ended else None
    else:
        pending = reply.pending if isinstance(reply, Committed) else None
    if pending is None:
        return None
    if pending.engine_ref is not None:
        engine = engine_of(pending, engine)
    return engine if remember_commit(engine, pending, name) else None


def engine_of(pending: PendingCommit, engine: sa.Engine) -> sa.Engine:
    """Return the engine ``pending`` went through: the unit's own, or the one that wrote."""
    if pending.engine_ref is None:
        return engine
    return pending.engine_ref() or engine  # alive: the unit's session holds it


# -- names -------------------------------------------------------------------------------------


def unit_name(fn: object) -> str:
    """Return the unit's qualified name for the events; never a repr (it may show arguments)."""
    name = getattr(fn, "__qualname__", None)
    if name is None:  # a functools.partial: its function's name
        name = getattr(getattr(fn, "func", None), "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def function_name(fn: object) -> str:
    """Return ``fn``'s name for a refusal raised to the caller (its repr when it has none)."""
    return getattr(fn, "__qualname__", None) or repr(fn)
