"""Units of work that survive: run the whole function again on a retryable error, never twice.

A unit of work is a function that receives a Session (from a ``sessionmaker``) or a
Connection (from an ``Engine``) inside an open transaction. dropsafe commits it. On a
disconnect, transient or failover error the whole function runs again, after a backoff,
within ``UnitPolicy.max_attempts`` runs that reached the server and an absolute
``UnitPolicy.deadline``; a statement is never replayed in the middle of a transaction. A COMMIT
whose reply was lost is resolved by asking the server (see `dropsafe._unit.resolution`), so that a
committed unit is not run again and an acknowledged one is never lost. Errors that are not
the database's, and permanent ones, are raised unchanged after the rollback.

Every decision is made once, in `dropsafe._unit.core`; this module only performs its steps: the
sync face and the async face below differ only where they await. The resolution runs as sync
code for both (in SQLAlchemy's greenlet for async engines).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import time
import weakref
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from dropsafe._backoff import waits_elsewhere
from dropsafe._drivers.deadline import bounded
from dropsafe._engine.guard import loaded_asyncio, require_asyncio
from dropsafe._engine_state import peek_state, state_of
from dropsafe._errors import ConfigurationError
from dropsafe._policy import Duration, Policy, UnitPolicy
from dropsafe._unit.core import (
    CommitFailed,
    Committed,
    Failed,
    Reply,
    Report,
    Resolve,
    Run,
    unit_of_work,
)
from dropsafe._unit.failover_audit import audit_after_failover, remember_commit
from dropsafe._unit.recording import (
    CommitRecorder,
    PendingCommit,
    other_connections,
    record_commits,
    record_commits_of_routing,
    recording,
)
from dropsafe._unit.resolution import resolve_commit
from dropsafe._unit.server_life import learn_server_life, must_learn_server_life
from dropsafe._unit.shapes import (
    begin_driver_transaction,
    check_engine_shape,
    check_unit_shape,
    watching,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )

    from dropsafe.events import Hook

__all__ = ["run_transaction", "run_transaction_async", "transactional"]

_T = TypeVar("_T")
_IN_UNIT: contextvars.ContextVar[bool] = contextvars.ContextVar("dropsafe_in_unit", default=False)


# -- sync ------------------------------------------------------------------------------------


@overload
def run_transaction(
    bind: sessionmaker[Session],
    fn: Callable[[Session], _T],
    *,
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> _T: ...
@overload
def run_transaction(
    bind: sa.Engine,
    fn: Callable[[sa.Connection], _T],
    *,
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> _T: ...
def run_transaction(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Any], _T],
    *,
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> _T:
    """Run ``fn`` in a transaction and commit it, retrying the whole unit on retryable errors.

    ``bind`` is a ``sessionmaker`` (``fn`` gets a Session) or an ``Engine`` (``fn`` gets a
    Connection). ``fn`` must not commit or roll back itself, and should return plain values
    (ids, not ORM objects: the session is closed when this returns).

    The unit follows its engine's ``Policy.unit``; ``deadline`` and ``max_attempts`` override
    those two knobs for this call, ``policy`` replaces the whole `UnitPolicy`. When the
    attempts or the deadline run out, the last error itself is raised.

    Example::

        post_id = dropsafe.run_transaction(Session, lambda s: create_post(s, "hello"))
    """
    engine = _sync_engine_of(bind)
    _check_unit(fn, want_async=False)
    check_unit_shape(bind, engine)  # two-phase and AUTOCOMMIT are refused
    unit, hooks = _settings(engine, policy, deadline, max_attempts)
    _record_commits_of(bind, engine)
    core = unit_of_work(unit, hooks)
    reply: Reply = None
    while True:
        try:
            step = core.send(reply)
        except StopIteration as done:
            return cast("_T", done.value)
        if isinstance(step, Run):
            reply = _run_once(bind, fn, step, hooks)
            audited = _acknowledged(engine, reply, step, fn)
            if audited is not None:
                audit_after_failover(audited, hooks)
        elif isinstance(step, Resolve):
            reply = resolve_commit(
                _engine_of(step.pending, engine),
                step.pending,
                step.error,
                timeout=step.timeout,
                deadline=step.deadline,
                hooks=hooks,
            )
            audited = _acknowledged(engine, reply, step, fn)
            if audited is not None:
                audit_after_failover(audited, hooks)
        else:
            time.sleep(step.seconds)
            reply = None


def _run_once(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Any], _T],
    step: Run,
    hooks: tuple[Hook, ...],
) -> Report:
    """Run ``fn`` once in a new transaction and commit it; report what happened."""
    token = _IN_UNIT.set(True)
    reached_server = False
    committed: Committed[_T] | None = None
    recorder: CommitRecorder | None = None
    try:
        with (
            waits_elsewhere(),  # the unit waits for an unreachable server: not its connects
            recording(read_xid=step.verify_commits) as recorder,
            watching(_unit_name(fn), hooks) as shapes,
            _begun(bind) as begun,
        ):
            handle, connection = begun  # connected: a failure before here never reached it
            recorder.connection = connection
            # The unit runs again whole; its deadline and server life hold this connection.
            state_of(connection.engine).first_statement_sent(connection.connection)
            # The server-life read is bounded too: on a connection that a middlebox forgot,
            # it is the first thing to hang.
            with bounded(connection.connection.dbapi_connection, step.deadline):
                if step.verify_commits:
                    learn_server_life(connection)
                reached_server = True
                if isinstance(handle, Session):
                    _watch_session(handle, recorder)
                result = _call_sync(fn, handle)
                _check_still_open(handle.in_transaction(), recorder)
                if recorder.session is not None:
                    _record_commits_of_session(recorder.session)
                try:
                    with recorder.committing():
                        handle.commit()
                except Exception as exc:  # noqa: BLE001 - reported to the core, which decides
                    if not shapes.commit_completed(handle):
                        return _commit_failed(result, exc, recorder)
                    shapes.hook_failed(exc)  # a hook raised after the COMMIT: it committed
                committed = Committed(result, recorder.pending)
                return committed  # noqa: RET504 - the except below reads it
    except Exception as exc:  # noqa: BLE001 - reported to the core, which re-raises the rest
        if committed is not None:  # a hook raised as the session closed, after the COMMIT
            shapes.hook_failed(exc)
            return committed
        return Failed(_refusal_or(exc, recorder), reached_server)
    finally:
        _IN_UNIT.reset(token)


@contextlib.contextmanager
def _begun(
    bind: sessionmaker[Session] | sa.Engine,
) -> Iterator[tuple[Session | sa.Connection, sa.Connection]]:
    """Give ``(what fn gets, its connection)`` inside a begun transaction, connected."""
    if isinstance(bind, sa.Engine):
        with bind.connect() as connection:
            connection.begin()
            yield connection, connection
    else:
        with bind() as session:
            session.begin()
            yield session, session.connection()


def _call_sync(fn: Callable[[Any], _T], handle: object) -> _T:
    result = fn(handle)
    if result is not None and inspect.isawaitable(result):
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
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> _T:
    """`run_transaction` for an ``async_sessionmaker`` or ``AsyncEngine`` and an async ``fn``.

    Example::

        Sessions = async_sessionmaker(engine)  # not the AsyncSession class: it has no engine
        post_id = await dropsafe.run_transaction_async(Sessions, create_post_async)
    """
    require_asyncio()
    from sqlalchemy.util import greenlet_spawn  # needs greenlet

    engine = _async_engine_of(bind)
    _check_unit(fn, want_async=True)
    check_unit_shape(bind, engine.sync_engine)  # two-phase and AUTOCOMMIT are refused
    unit, hooks = _settings(engine.sync_engine, policy, deadline, max_attempts)
    _record_commits_of(bind, engine.sync_engine)
    core = unit_of_work(unit, hooks)
    reply: Reply = None
    while True:
        try:
            step = core.send(reply)
        except StopIteration as done:
            return cast("_T", done.value)
        if isinstance(step, Run):
            reply = await _run_once_async(bind, fn, step, hooks)
        elif isinstance(step, Resolve):
            reply = await greenlet_spawn(
                resolve_commit,
                _engine_of(step.pending, engine.sync_engine),
                step.pending,
                step.error,
                timeout=step.timeout,
                deadline=step.deadline,
                hooks=hooks,
                sleep=_sleep_in_greenlet,
            )
        else:
            await asyncio.sleep(step.seconds)
            reply = None
            continue
        audited = _acknowledged(engine.sync_engine, reply, step, fn)
        if audited is not None:
            await greenlet_spawn(audit_after_failover, audited, hooks)


def _sleep_in_greenlet(delay: float) -> None:
    """Sleep without blocking the event loop, from sync code in SQLAlchemy's greenlet."""
    from sqlalchemy.util import concurrency  # needs greenlet

    # SQLAlchemy 2.1 renamed await_only to await_.
    await_ = getattr(concurrency, "await_", None) or concurrency.await_only
    await_(asyncio.sleep(delay))


async def _run_once_async(
    bind: async_sessionmaker[AsyncSession] | AsyncEngine,
    fn: Callable[[Any], Awaitable[_T]],
    step: Run,
    hooks: tuple[Hook, ...],
) -> Report:
    """`_run_once` for async binds: the same steps, awaited."""
    token = _IN_UNIT.set(True)
    reached_server = False
    committed: Committed[_T] | None = None
    recorder: CommitRecorder | None = None
    try:
        with (
            waits_elsewhere(),  # as in `_run_once`
            recording(read_xid=step.verify_commits) as recorder,
            watching(_unit_name(fn), hooks) as shapes,
        ):
            async with _begun_async(bind) as begun:
                handle, connection = begun
                recorder.connection = connection.sync_connection
                sync_connection = cast("sa.Connection", connection.sync_connection)
                state_of(sync_connection.engine).first_statement_sent(sync_connection.connection)
                # Bounded from the server-life read on, as in `_run_once`.
                with bounded(_dbapi_connection_of(connection), step.deadline):
                    # run_sync spawns a greenlet: only when there is something to read.
                    if step.verify_commits and must_learn_server_life(sync_connection):
                        await connection.run_sync(learn_server_life)
                    reached_server = True
                    sync_session = getattr(handle, "sync_session", None)  # an AsyncSession
                    if sync_session is not None:
                        _watch_session(sync_session, recorder)
                    await begin_driver_transaction(_dbapi_connection_of(connection))
                    result = await _call_async(fn, handle)
                    _check_still_open(handle.in_transaction(), recorder)
                    if recorder.session is not None:
                        _record_commits_of_session(recorder.session)
                    try:
                        with recorder.committing():
                            await handle.commit()
                    except asyncio.CancelledError as cancel:
                        _note_cancelled_commit(cancel, recorder)
                        raise
                    except Exception as exc:  # noqa: BLE001 - reported to the core
                        if not shapes.commit_completed(handle):
                            return _commit_failed(result, exc, recorder)
                        shapes.hook_failed(exc)  # a hook raised after the COMMIT
                    committed = Committed(result, recorder.pending)
                    return committed  # noqa: RET504 - the except below reads it
    except Exception as exc:  # noqa: BLE001 - reported to the core, which re-raises the rest
        if committed is not None:  # a hook raised as the session closed, after the COMMIT
            shapes.hook_failed(exc)
            return committed
        return Failed(_refusal_or(exc, recorder), reached_server)
    finally:
        _IN_UNIT.reset(token)


def _note_cancelled_commit(cancel: BaseException, recorder: CommitRecorder) -> None:
    """Say on a cancellation that the COMMIT was in flight: nothing else tells the caller.

    A cancelled task must end with ``CancelledError`` (asyncio and anyio depend on it), so the
    unit cannot end as `CommitOutcomeUnknown`; the caller's ``TimeoutError`` carries this note
    in its cause. The xid, when recorded, lets an operator ask ``pg_xact_status``.
    """
    if not hasattr(cancel, "add_note"):  # Python 3.10
        return
    pending = recorder.pending
    xid = "" if pending is None else f" (xid {pending.xid})"
    cancel.add_note(
        f"dropsafe: cancelled while its COMMIT was in flight{xid}: the transaction may or may "
        "not have committed; check before running it again"
    )


@contextlib.asynccontextmanager
async def _begun_async(
    bind: async_sessionmaker[AsyncSession] | AsyncEngine,
) -> AsyncIterator[tuple[AsyncSession | AsyncConnection, AsyncConnection]]:
    from sqlalchemy.ext.asyncio import AsyncEngine  # imported on first use

    if isinstance(bind, AsyncEngine):
        async with bind.connect() as connection:
            await connection.begin()
            yield connection, connection
    else:
        async with bind() as session:
            await session.begin()
            yield session, await session.connection()


def _dbapi_connection_of(connection: AsyncConnection) -> object:
    return connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]


async def _call_async(fn: Callable[[Any], Awaitable[_T]], handle: object) -> _T:
    result = fn(handle)
    if not inspect.isawaitable(result):
        raise ConfigurationError(
            f"{_name(fn)} is not async: use run_transaction for plain functions"
        )
    return await result


# -- shared by both faces --------------------------------------------------------------------


def _acknowledged(
    engine: sa.Engine, reply: Reply, step: Run | Resolve, fn: object
) -> sa.Engine | None:
    """Remember a commit acknowledged to the app; return the engine to audit for a failover now.

    The healthy path's whole cost of `dropsafe._unit.failover_audit`: a few stores in a ring. In a
    unit over several engines, the commit is remembered (and audited) on the engine that wrote.
    """
    if isinstance(step, Resolve):
        pending = step.pending if reply == "committed" else None
    else:
        pending = reply.pending if isinstance(reply, Committed) else None
    if pending is None:
        return None
    if pending.engine_ref is not None:
        engine = _engine_of(pending, engine)
    return engine if remember_commit(engine, pending, _unit_name(fn)) else None


def _engine_of(pending: PendingCommit, engine: sa.Engine) -> sa.Engine:
    """Return the engine ``pending`` went through: the unit's own, or the one that wrote."""
    if pending.engine_ref is None:
        return engine
    return pending.engine_ref() or engine  # alive: the unit's session holds it


def _unit_name(fn: object) -> str:
    """Return the unit's qualified name for the events; never a repr (it may show arguments)."""
    name = getattr(fn, "__qualname__", None)
    if name is None:  # a functools.partial: its function's name
        name = getattr(getattr(fn, "func", None), "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _commit_failed(
    result: _T, error: Exception, recorder: CommitRecorder
) -> Committed[_T] | CommitFailed[_T]:
    """Report a COMMIT that raised; one that was never sent is an ordinary failure."""
    if not recorder.commits_sent:
        raise error  # before COMMIT was sent: a flush, a before_commit hook, the xid read
    if recorder.marks is not None:  # several connections, at most one of which wrote
        if recorder.writer_committed():
            return Committed(result, recorder.pending)  # this one wrote nothing: no effect
        # A connection committed before this one had an xid (every one on a primary does):
        # perhaps only for a NOTIFY, delivered now; the unit must not run again.
        committed_before = any(recorder.marks.get(c) is not None for c in recorder.sent[:-1])
        if recorder.sent[-1] is not recorder.writer:
            # The writer's COMMIT was never sent (or none wrote): no row committed.
            return CommitFailed(result, error, None, 1, committed_before)
        return CommitFailed(result, error, recorder.pending, 1, committed_before)
    return CommitFailed(result, error, recorder.pending, recorder.commits_sent)


# -- the decorator ---------------------------------------------------------------------------


def transactional(
    bind: sessionmaker[Session] | sa.Engine | async_sessionmaker[AsyncSession] | AsyncEngine,
    *,
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a function a unit of work: it gets the Session (or Connection) as first argument.

    Works on plain and ``async`` functions, with the matching kind of ``bind``. The keyword
    arguments are those of `run_transaction`, checked here, at decoration.

    Example::

        @dropsafe.transactional(Session)
        def publish(session, post_id):
            session.get(Post, post_id).published = True

        publish(42)
    """
    _settings(None, policy, deadline, max_attempts)  # refuse bad settings at decoration
    settings: dict[str, Any] = {
        "policy": policy,
        "deadline": deadline,
        "max_attempts": max_attempts,
    }

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise ConfigurationError(f"@transactional decorates functions, not {fn!r}")
        if inspect.iscoroutinefunction(fn):
            _async_engine_of(bind)  # refuse a wrong bind at decoration, not at the call

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
                return await run_transaction_async(
                    bind,  # type: ignore[arg-type]
                    _calling(fn, args, kwargs),
                    **settings,
                )

            return run_async
        _sync_engine_of(bind)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            return run_transaction(
                bind,  # type: ignore[arg-type]
                _calling(fn, args, kwargs),
                **settings,
            )

        return run

    return decorate


def _calling(
    fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[Any], _T]:
    """``fn`` with its arguments bound after the handle, named as ``fn`` (for the events)."""

    def call(handle: object) -> _T:
        return fn(handle, *args, **kwargs)

    call.__qualname__ = _name(fn)
    return call


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
    # A scoped_session hands out the same session on every call within its scope (a thread,
    # a request): a retried unit would reuse what its failed attempt left behind.
    if isinstance(bind, scoped_session):
        raise ConfigurationError(
            "a scoped_session (such as Flask-SQLAlchemy's db.session) gives every attempt the "
            "same shared session; pass a sessionmaker bound to one engine instead: "
            "sessionmaker(db.engine), or sessionmaker(db.engines[bind_key]) for a bind "
            "(see docs/frameworks.md)"
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
    from sqlalchemy.ext.asyncio import (
        AsyncEngine,
        async_scoped_session,
        async_sessionmaker,
    )

    if isinstance(bind, async_scoped_session):
        raise ConfigurationError(
            "an async_scoped_session gives every attempt the same shared session; pass an "
            "async_sessionmaker bound to one engine instead: async_sessionmaker(engine)"
        )
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


def _refusal_or(error: Exception, recorder: CommitRecorder | None) -> Exception:
    """Return the refusal of the unit's shape, if any, rather than what followed from it.

    A function that caught the refusal of its own COMMIT fails next on the transaction that
    SQLAlchemy left to be rolled back: the refusal says why.
    """
    if recorder is not None and recorder.refusal is not None:
        return recorder.refusal
    return error


def _record_commits_of(bind: object, engine: sa.Engine) -> None:
    """Install the recording listeners on the unit's engine and on its sessionmaker's binds."""
    record_commits(engine)
    kw = getattr(bind, "kw", None)  # a sessionmaker's (sync or async); an engine has none
    binds = kw.get("binds") if kw is not None else None
    if not binds:
        return
    seen = (id(binds), len(binds))  # a sessionmaker's binds, as last recorded
    if _RECORDED_BINDS.get(bind) == seen:
        return  # many binds (one per model) would otherwise cost a loop per unit
    for target in binds.values():
        # An Engine, an AsyncEngine (its sync_engine) or a Connection (its engine).
        other = getattr(target, "sync_engine", None) or getattr(target, "engine", None)
        if isinstance(other, sa.Engine):
            check_engine_shape(other)  # an AUTOCOMMIT bind is refused as the main one is
            record_commits(other)
    _RECORDED_BINDS[bind] = seen


_RECORDED_BINDS: weakref.WeakKeyDictionary[object, tuple[int, int]] = weakref.WeakKeyDictionary()


def _watch_session(session: Session, recorder: CommitRecorder) -> None:
    """Let the recorder see ``session``'s connections, and a routing session's new engines."""
    recorder.session = session
    if type(session).get_bind is not Session.get_bind:
        record_commits_of_routing(type(session))


def _record_commits_of_session(session: Session) -> None:
    """Install the listeners on engines the function reached beyond the sessionmaker's binds.

    Before COMMIT: SQLAlchemy sends the COMMITs in no set order, and the first one sent must
    already be seen. One ``len`` for a unit on one engine.
    """
    for connection in other_connections(session):
        record_commits(connection.engine)


def _check_still_open(in_transaction: bool, recorder: CommitRecorder) -> None:
    if recorder.refusal is not None:
        raise recorder.refusal  # its own COMMIT was refused, and the function went on
    if not in_transaction:
        raise ConfigurationError(
            "the unit of work committed or rolled back its own transaction; "
            "leave that to run_transaction (it must read the xid before COMMIT)"
        )


def _settings(
    engine: sa.Engine | None,
    policy: object,
    deadline: Duration | None,
    max_attempts: int | None,
) -> tuple[UnitPolicy, tuple[Hook, ...]]:
    """Return the unit's settings and hooks: the engine's, with this call's overrides."""
    if isinstance(policy, Policy):
        raise ConfigurationError(
            "a unit of work takes a UnitPolicy (policy=your_policy.unit): the connection and "
            "pool settings of a Policy belong to its engine, dropsafe.create_engine(url, "
            "policy=...)"
        )
    if policy is not None and not isinstance(policy, UnitPolicy):
        raise ConfigurationError(f"policy must be a dropsafe.UnitPolicy, not {policy!r}")
    state = peek_state(engine) if engine is not None else None
    engine_policy = (state.policy if state is not None else None) or _default_policy()
    unit = policy or engine_policy.unit
    if deadline is not None or max_attempts is not None:
        try:
            unit = _overridden(unit, deadline, max_attempts)
        except TypeError:  # an unhashable value: validated below, which names the knob
            unit = _overridden.__wrapped__(unit, deadline, max_attempts)
    return unit, engine_policy.hooks


# Making a policy validates every knob: tens of microseconds, more than the rest of a unit's
# own work. Policies are frozen, so the same settings give the same policy: made once.
@functools.cache
def _default_policy() -> Policy:
    return Policy()


@functools.lru_cache(maxsize=128, typed=True)  # typed: True is not 1 here (it is refused)
def _overridden(
    unit: UnitPolicy, deadline: Duration | None, max_attempts: int | None
) -> UnitPolicy:
    overrides: dict[str, Any] = {}
    if deadline is not None:
        overrides["deadline"] = deadline
    if max_attempts is not None:
        overrides["max_attempts"] = max_attempts
    return dataclasses.replace(unit, **overrides)  # validated again, naming the knob


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
