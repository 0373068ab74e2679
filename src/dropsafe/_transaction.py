"""Units of work that survive: run the whole function again on a retryable error, never twice.

A unit of work is a function that receives a Session (from a ``sessionmaker``) or a
Connection (from an ``Engine``) inside an open transaction. dropsafe commits it. On a
disconnect, transient or failover error the whole function runs again, after a backoff,
within ``Policy.max_attempts`` runs that reached the server and an absolute
``Policy.deadline``; a statement is never replayed in the middle of a transaction. A COMMIT
whose reply was lost is resolved by asking the server (see `dropsafe._outcome`), so that a
committed unit is not run again and an acknowledged one is never lost. Errors that are not
the database's, and permanent ones, are raised unchanged after the rollback.

The sync and async faces share every decision (`_decide`, `Attempts`, the resolution, which
runs as sync code in SQLAlchemy's greenlet for async engines) and differ only where they await.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from dropsafe._backoff import Attempts
from dropsafe._classify import Kind, classify
from dropsafe._engine import guard_of, loaded_asyncio, require_asyncio
from dropsafe._errors import CommitOutcomeUnknown, ConfigurationError
from dropsafe._outcome import (
    CommitRecorder,
    TransactionMark,
    learn_incarnation,
    record_commits,
    recording,
    resolve_commit,
)
from dropsafe._policy import Policy
from dropsafe._watchdog import bounded

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )

__all__ = ["run_transaction", "run_transaction_async", "transactional"]

_T = TypeVar("_T")
_IN_UNIT: contextvars.ContextVar[bool] = contextvars.ContextVar("dropsafe_in_unit", default=False)


@dataclass
class _Committed(Generic[_T]):
    result: _T


@dataclass
class _Failed:
    """The run failed before its COMMIT was sent (``reached_server``: it got a connection)."""

    error: Exception
    reached_server: bool


@dataclass
class _CommitFailed(Generic[_T]):
    """COMMIT raised: what ``fn`` returned, the error, and what the recorder saw."""

    result: _T
    error: Exception
    mark: TransactionMark | None
    commits_sent: int


@dataclass(frozen=True)
class _Retry:
    kind: Kind
    error: Exception
    reached_server: bool = True


@dataclass(frozen=True)
class _Resolve:
    """Ask the server whether the transaction committed before deciding anything else."""

    mark: TransactionMark
    error: Exception
    result: Any  # what the unit returned, if the COMMIT turns out to have happened


def _decide(step: _Failed | _CommitFailed[Any], policy: Policy) -> _Retry | _Resolve:
    """Decide what follows a failed run; raise the error (or ours) when nothing may follow."""
    if isinstance(step, _Failed):
        return _Retry(_retry_kind(step.error), step.error, step.reached_server)
    error = step.error
    if classify(error, during_commit=True) is not Kind.COMMIT_UNKNOWN:
        # PostgreSQL refused the COMMIT (nothing committed), or the error is not the
        # database's at all (the app's own listener): retried or raised like any other.
        return _Retry(_retry_kind(error), error)
    if not policy.verify_commits:
        raise CommitOutcomeUnknown(
            "the connection failed during COMMIT and Policy.verify_commits is off, "
            "so its outcome was not recorded",
            xid=None,
            reason="verify_commits is off",
        ) from error
    if step.commits_sent > 1:
        raise CommitOutcomeUnknown(
            "the connection failed during a COMMIT of a unit of work that committed on more "
            "than one connection; a partial commit cannot be retried whole",
            xid=None if step.mark is None else step.mark.xid,
            reason="more than one connection committed",
        ) from error
    if step.mark is None:
        return _Retry(Kind.DISCONNECT, error)  # it wrote nothing: running it again is harmless
    return _Resolve(step.mark, error, step.result)


def _retry_kind(error: Exception) -> Kind:
    """Return the kind of a retryable error; raise ``error`` unchanged when it is not."""
    kind = classify(error)
    if not kind.retryable:
        raise error
    return kind


# -- sync ------------------------------------------------------------------------------------


@overload
def run_transaction(
    bind: sessionmaker[Session], fn: Callable[[Session], _T], *, policy: Policy | None = None
) -> _T: ...
@overload
def run_transaction(
    bind: sa.Engine, fn: Callable[[sa.Connection], _T], *, policy: Policy | None = None
) -> _T: ...
def run_transaction(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Any], _T],
    *,
    policy: Policy | None = None,
) -> _T:
    """Run ``fn`` in a transaction and commit it, retrying the whole unit on retryable errors.

    ``bind`` is a ``sessionmaker`` (``fn`` gets a Session) or an ``Engine`` (``fn`` gets a
    Connection). ``fn`` must not commit or roll back itself, and should return plain values
    (ids, not ORM objects: the session is closed when this returns).

    Example::

        post_id = dropsafe.run_transaction(Session, lambda s: create_post(s, "hello"))
    """
    engine = _sync_engine_of(bind)
    _check_unit(fn, want_async=False)
    policy = _policy_for(policy, engine)
    record_commits(engine)
    attempts = Attempts(policy)
    while True:
        with recording(take_marks=policy.verify_commits) as recorder:
            step = _attempt(bind, fn, recorder, attempts.deadline, learn=policy.verify_commits)
        if isinstance(step, _Committed):
            return step.result
        decision = _decide(step, policy)
        if isinstance(decision, _Resolve):
            outcome = resolve_commit(
                engine, decision.mark, policy, decision.error, deadline=attempts.deadline
            )
            if outcome == "committed":
                return decision.result  # type: ignore[no-any-return]
            decision = _Retry(Kind.DISCONNECT, decision.error)  # aborted: nothing was written
        time.sleep(
            attempts.next_delay(
                decision.kind, decision.error, reached_server=decision.reached_server
            )
        )


def _attempt(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Any], _T],
    recorder: CommitRecorder,
    deadline: float,
    *,
    learn: bool,
) -> _Committed[_T] | _CommitFailed[_T] | _Failed:
    token = _IN_UNIT.set(True)
    reached_server = False
    try:
        if isinstance(bind, sa.Engine):
            with bind.connect() as handle:
                if learn:
                    learn_incarnation(handle)
                reached_server = True
                handle.begin()
                with bounded(handle.connection.dbapi_connection, deadline):
                    return _run_and_commit(fn, handle, recorder)
        with bind() as session:
            session.begin()
            # Connect now: a failure here never reached the server.
            connection = session.connection()
            if learn:
                learn_incarnation(connection)
            reached_server = True
            with bounded(connection.connection.dbapi_connection, deadline):
                return _run_and_commit(fn, session, recorder)
    except Exception as exc:  # noqa: BLE001 - decided by _decide, which re-raises the rest
        return _Failed(exc, reached_server)
    finally:
        _IN_UNIT.reset(token)


def _run_and_commit(
    fn: Callable[[Any], _T], handle: Session | sa.Connection, recorder: CommitRecorder
) -> _Committed[_T] | _CommitFailed[_T]:
    result = _call_sync(fn, handle)
    _check_still_open(handle.in_transaction())
    try:
        with recorder.committing():
            handle.commit()
    except Exception as exc:
        if not recorder.commits_sent:
            raise  # failed before COMMIT was sent (a flush, a before_commit hook, the mark)
        return _CommitFailed(result, exc, recorder.mark, recorder.commits_sent)
    return _Committed(result)


def _call_sync(fn: Callable[[Any], _T], handle: object) -> _T:
    result = fn(handle)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise ConfigurationError(
            f"{_name(fn)} returned an awaitable: use run_transaction_async for async functions"
        )
    return result


# -- async -----------------------------------------------------------------------------------


async def run_transaction_async(
    bind: async_sessionmaker[AsyncSession] | AsyncEngine,
    fn: Callable[[Any], Awaitable[_T]],
    *,
    policy: Policy | None = None,
) -> _T:
    """`run_transaction` for an ``async_sessionmaker`` or ``AsyncEngine`` and an async ``fn``.

    Example::

        post_id = await dropsafe.run_transaction_async(AsyncSession, create_post_async)
    """
    require_asyncio()
    from sqlalchemy.util import greenlet_spawn  # noqa: PLC0415 - needs greenlet

    engine = _async_engine_of(bind)
    _check_unit(fn, want_async=True)
    policy = _policy_for(policy, engine.sync_engine)
    record_commits(engine.sync_engine)
    attempts = Attempts(policy)
    while True:
        with recording(take_marks=policy.verify_commits) as recorder:
            step = await _attempt_async(
                bind, fn, recorder, attempts.deadline, learn=policy.verify_commits
            )
        if isinstance(step, _Committed):
            return step.result
        decision = _decide(step, policy)
        if isinstance(decision, _Resolve):
            outcome = await greenlet_spawn(
                resolve_commit,
                engine.sync_engine,
                decision.mark,
                policy,
                decision.error,
                deadline=attempts.deadline,
                sleep=_sleep_in_greenlet,
            )
            if outcome == "committed":
                return decision.result  # type: ignore[no-any-return]
            decision = _Retry(Kind.DISCONNECT, decision.error)
        await asyncio.sleep(
            attempts.next_delay(
                decision.kind, decision.error, reached_server=decision.reached_server
            )
        )


def _sleep_in_greenlet(delay: float) -> None:
    """Sleep without blocking the event loop, from sync code in SQLAlchemy's greenlet."""
    from sqlalchemy.util import concurrency  # noqa: PLC0415 - needs greenlet

    # SQLAlchemy 2.1 renamed await_only to await_.
    await_ = getattr(concurrency, "await_", None) or concurrency.await_only
    await_(asyncio.sleep(delay))


async def _attempt_async(
    bind: async_sessionmaker[AsyncSession] | AsyncEngine,
    fn: Callable[[Any], Awaitable[_T]],
    recorder: CommitRecorder,
    deadline: float,
    *,
    learn: bool,
) -> _Committed[_T] | _CommitFailed[_T] | _Failed:
    from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: PLC0415 - imported on first use

    token = _IN_UNIT.set(True)
    reached_server = False
    try:
        if isinstance(bind, AsyncEngine):
            async with bind.connect() as connection:
                if learn:
                    await connection.run_sync(learn_incarnation)
                reached_server = True
                await connection.begin()
                with bounded(_dbapi_connection_of(connection), deadline):
                    return await _run_and_commit_async(fn, connection, recorder)
        async with bind() as session:
            await session.begin()
            connection = await session.connection()
            if learn:
                await connection.run_sync(learn_incarnation)
            reached_server = True
            with bounded(_dbapi_connection_of(connection), deadline):
                return await _run_and_commit_async(fn, session, recorder)
    except Exception as exc:  # noqa: BLE001 - decided by _decide, which re-raises the rest
        return _Failed(exc, reached_server)
    finally:
        _IN_UNIT.reset(token)


def _dbapi_connection_of(connection: AsyncConnection) -> object:
    return connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]


async def _run_and_commit_async(
    fn: Callable[[Any], Awaitable[_T]],
    handle: AsyncSession | AsyncConnection,
    recorder: CommitRecorder,
) -> _Committed[_T] | _CommitFailed[_T]:
    result = await _call_async(fn, handle)
    _check_still_open(handle.in_transaction())
    try:
        with recorder.committing():
            await handle.commit()
    except Exception as exc:
        if not recorder.commits_sent:
            raise
        return _CommitFailed(result, exc, recorder.mark, recorder.commits_sent)
    return _Committed(result)


async def _call_async(fn: Callable[[Any], Awaitable[_T]], handle: object) -> _T:
    result = fn(handle)
    if not inspect.isawaitable(result):
        raise ConfigurationError(
            f"{_name(fn)} is not async: use run_transaction for plain functions"
        )
    return await result


# -- the decorator ---------------------------------------------------------------------------


def transactional(
    bind: sessionmaker[Session] | sa.Engine | async_sessionmaker[AsyncSession] | AsyncEngine,
    *,
    policy: Policy | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a function a unit of work: it gets the Session (or Connection) as first argument.

    Works on plain and ``async`` functions, with the matching kind of ``bind``.

    Example::

        @dropsafe.transactional(Session)
        def publish(session, post_id):
            session.get(Post, post_id).published = True

        publish(42)
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise ConfigurationError(f"@transactional decorates functions, not {fn!r}")
        if inspect.iscoroutinefunction(fn):
            _async_engine_of(bind)  # refuse a wrong bind at decoration, not at the call

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
                return await run_transaction_async(
                    bind,  # type: ignore[arg-type]
                    lambda handle: fn(handle, *args, **kwargs),
                    policy=policy,
                )

            return run_async
        _sync_engine_of(bind)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            return run_transaction(
                bind,  # type: ignore[arg-type]
                lambda handle: fn(handle, *args, **kwargs),
                policy=policy,
            )

        return run

    return decorate


# -- checks ----------------------------------------------------------------------------------


def _sync_engine_of(bind: object) -> sa.Engine:
    if isinstance(bind, sa.Engine):
        return bind
    if isinstance(bind, sessionmaker):
        engine = bind.kw.get("bind")
        if isinstance(engine, sa.Engine):
            return engine
        raise ConfigurationError(
            "the sessionmaker must be bound to an Engine: sessionmaker(bind=engine)"
        )
    asyncio_extension = loaded_asyncio()
    if asyncio_extension is not None and isinstance(
        bind, (asyncio_extension.AsyncEngine, asyncio_extension.async_sessionmaker)
    ):
        raise ConfigurationError(
            f"{type(bind).__name__} is async: use await run_transaction_async(...)"
        )
    raise ConfigurationError(f"bind must be a sessionmaker or an Engine, not {type(bind).__name__}")


def _async_engine_of(bind: object) -> AsyncEngine:
    require_asyncio()
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker  # noqa: PLC0415

    if isinstance(bind, AsyncEngine):
        return bind
    if isinstance(bind, async_sessionmaker):
        engine = bind.kw.get("bind")
        if isinstance(engine, AsyncEngine):
            return engine
        raise ConfigurationError(
            "the async_sessionmaker must be bound to an AsyncEngine: async_sessionmaker(engine)"
        )
    if isinstance(bind, (sa.Engine, sessionmaker)):
        raise ConfigurationError(f"{type(bind).__name__} is not async: use run_transaction(...)")
    raise ConfigurationError(
        f"bind must be an async_sessionmaker or an AsyncEngine, not {type(bind).__name__}"
    )


def _check_unit(fn: object, *, want_async: bool) -> None:
    if not callable(fn):
        raise ConfigurationError(f"fn must be callable, not {type(fn).__name__}")
    if want_async is False and inspect.iscoroutinefunction(fn):
        raise ConfigurationError(f"{_name(fn)} is async: use await run_transaction_async(...)")
    if _IN_UNIT.get():
        raise ConfigurationError(
            "run_transaction was called inside a unit of work; the inner one could not be "
            "retried on its own. Do the work with the session you were given instead."
        )


def _check_still_open(in_transaction: bool) -> None:
    if not in_transaction:
        raise ConfigurationError(
            "the unit of work committed or rolled back its own transaction; "
            "leave that to run_transaction (it must read the xid before COMMIT)"
        )


def _policy_for(policy: Policy | None, engine: sa.Engine) -> Policy:
    if policy is not None:
        if not isinstance(policy, Policy):
            raise ConfigurationError(f"policy must be a dropsafe.Policy, not {policy!r}")
        return policy
    guard = guard_of(engine)
    return guard.policy if guard is not None else Policy()


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
