"""Units of work that survive: where the unit wing meets the engine wing.

The public faces (`run_transaction`, `run_transaction_async`, `transactional`) check their input
at the call, take the unit's settings from its engine's state (`dropsafe._engine_state`), and
hand the unit to its runner in `dropsafe._unit` (`run_sync`, `run_async`, which share
`dropsafe._unit.core`'s decisions). What a unit promises: docs/guarantees.md.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from dropsafe._engine.guard import loaded_asyncio, require_asyncio
from dropsafe._engine_state import peek_state
from dropsafe._errors import ConfigurationError
from dropsafe._unit.run_common import check_unit_function, function_name, watch_binds
from dropsafe._unit.run_sync import run_unit
from dropsafe._unit.settings import unit_settings
from dropsafe._unit.shapes import check_unit_shape

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from dropsafe._policy import Duration, UnitPolicy
    from dropsafe.events import Hook

__all__ = ["run_transaction", "run_transaction_async", "transactional"]

_T = TypeVar("_T")


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
    check_unit_function(fn, want_async=False)
    check_unit_shape(bind, engine)  # two-phase and AUTOCOMMIT are refused
    unit, hooks = _settings(engine, policy, deadline, max_attempts)
    watch_binds(bind, engine)
    return run_unit(bind, fn, engine=engine, unit=unit, hooks=hooks)


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
    from dropsafe._unit.run_async import run_unit_async

    engine = _async_engine_of(bind)
    check_unit_function(fn, want_async=True)
    check_unit_shape(bind, engine.sync_engine)  # two-phase and AUTOCOMMIT are refused
    unit, hooks = _settings(engine.sync_engine, policy, deadline, max_attempts)
    watch_binds(bind, engine.sync_engine)
    return await run_unit_async(bind, fn, engine=engine.sync_engine, unit=unit, hooks=hooks)


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
            async def run_async(*args: object, **kwargs: object) -> object:
                return await run_transaction_async(
                    cast("async_sessionmaker[AsyncSession] | AsyncEngine", bind),  # checked
                    _calling(fn, args, kwargs),
                    **settings,
                )

            return run_async
        _sync_engine_of(bind)

        @functools.wraps(fn)
        def run(*args: object, **kwargs: object) -> object:
            return run_transaction(
                cast("sessionmaker[Session] | sa.Engine", bind),  # checked above
                _calling(fn, args, kwargs),
                **settings,
            )

        return run

    return decorate


def _calling(
    fn: Callable[..., _T], args: tuple[object, ...], kwargs: dict[str, object]
) -> Callable[[object], _T]:
    """``fn`` with its arguments bound after the handle, named as ``fn`` (for the events)."""

    def call(handle: object) -> _T:
        return fn(handle, *args, **kwargs)

    call.__qualname__ = function_name(fn)
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


def _settings(
    engine: sa.Engine | None,
    policy: object,
    deadline: Duration | None,
    max_attempts: int | None,
) -> tuple[UnitPolicy, tuple[Hook, ...]]:
    """Return the unit's settings and hooks: its engine's (None: the defaults), overridden."""
    state = peek_state(engine) if engine is not None else None
    return unit_settings(
        state.policy if state is not None else None, policy, deadline, max_attempts
    )
