"""The async runner of a unit of work: `dropsafe._unit.run_sync`'s steps, awaited.

The same core decides; only performing a step differs. The resolution and the failover audit run
as sync code in SQLAlchemy's greenlet. Needs SQLAlchemy's asyncio extension (greenlet), which
the caller has checked for. Why it begins the asyncpg adapter's transaction early and notes a
cancelled COMMIT: docs/guarantees.md.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, TypeVar, cast, final

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from dropsafe._backoff import sleep_in_greenlet, waits_elsewhere
from dropsafe._commit_truth.server_life import learn_server_life, must_learn_server_life
from dropsafe._drivers.deadline import bounded_checkout
from dropsafe._errors import ConfigurationError
from dropsafe._unit.core import Resolve, Run, unit_of_work
from dropsafe._unit.failover_audit import audit_after_failover
from dropsafe._unit.run_common import (
    Attempt,
    Done,
    acknowledged,
    function_name,
    next_step,
    note_cancelled_commit,
    resolution,
    unit_name,
)
from dropsafe._unit.shapes import begin_driver_transaction
from dropsafe._unit.tracker import AttemptTracker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from dropsafe._policy import UnitPolicy
    from dropsafe._unit.core import Reply, Report
    from dropsafe.events import Hook

__all__ = ["run_unit_async"]

_T = TypeVar("_T")


async def run_unit_async(
    bind: async_sessionmaker[AsyncSession] | AsyncEngine,
    fn: Callable[[AsyncSession | AsyncConnection], Awaitable[_T]],
    *,
    engine: sa.Engine,
    unit: UnitPolicy,
    hooks: tuple[Hook, ...],
) -> _T:
    """`dropsafe._unit.run_sync.run_unit` for async binds; ``engine`` is the sync engine."""
    core = unit_of_work(unit, hooks)
    name = unit_name(fn)  # once per unit, as in the sync runner
    reply: Reply = None
    while not isinstance(step := next_step(core, reply), Done):
        if isinstance(step, Run):
            reply = await _attempt(bind, fn, step, hooks, name)
        elif isinstance(step, Resolve):
            reply = await greenlet_spawn(resolution(step, engine, hooks), sleep=sleep_in_greenlet)
        else:
            await asyncio.sleep(step.seconds)
            reply = None
            continue
        audited = acknowledged(engine, reply, step, name)
        if audited is not None:
            await greenlet_spawn(audit_after_failover, audited, hooks)
    return cast("_T", step.value)


async def _attempt(
    bind: async_sessionmaker[AsyncSession] | AsyncEngine,
    fn: Callable[[AsyncSession | AsyncConnection], Awaitable[_T]],
    step: Run,
    hooks: tuple[Hook, ...],
    name: str,
) -> Report:
    """`dropsafe._unit.run_sync._attempt` for async binds: the same steps, awaited."""
    with AttemptTracker(name, hooks, read_xid=step.verify_commits) as tracker:
        attempt = Attempt(tracker)
        try:
            with waits_elsewhere():  # as in the sync runner
                async with _Begun(bind) as (handle, connection):
                    sync_connection = cast("sa.Connection", connection.sync_connection)
                    attempt.connected(sync_connection)
                    # Bounded from the server-life read on, as in the sync runner.
                    with bounded_checkout(sync_connection.connection, step.deadline):
                        # run_sync spawns a greenlet: only when there is something to read.
                        if step.verify_commits and must_learn_server_life(sync_connection):
                            await connection.run_sync(learn_server_life)
                        # An AsyncSession's Session; an AsyncConnection has none.
                        attempt.reached_server(getattr(handle, "sync_session", None))
                        await begin_driver_transaction(connection)
                        try:
                            result = await _call(fn, handle)
                        except Exception as exc:
                            attempt.function_raised(sync_connection, exc)
                            raise
                        attempt.ran(handle.in_transaction())
                        tracker.armed = True  # as in the sync runner
                        try:
                            await handle.commit()
                        except asyncio.CancelledError as cancel:
                            tracker.armed = False
                            note_cancelled_commit(cancel, tracker)
                            raise
                        except Exception as exc:  # noqa: BLE001 - reported to the core
                            tracker.armed = False
                            return attempt.commit_raised(result, exc, handle)
                        finally:
                            tracker.armed = False
                        return attempt.committed(result)
        except Exception as exc:  # noqa: BLE001 - reported to the core, which re-raises the rest
            return attempt.failed(exc)


@final
class _Begun:
    """``async with _Begun(bind) as (what fn gets, its connection):`` in a begun transaction.

    A class, not an async generator (entered at every attempt), around the AsyncSession's (or
    AsyncConnection's) own ``async with``, whose exit it awaits also when BEGIN raised.
    """

    __slots__ = ("_bind", "_opened")

    def __init__(self, bind: async_sessionmaker[AsyncSession] | AsyncEngine) -> None:
        self._bind = bind

    async def __aenter__(self) -> tuple[AsyncSession | AsyncConnection, AsyncConnection]:
        bind = self._bind
        opened: AsyncSession | AsyncConnection
        opened = self._opened = bind.connect() if isinstance(bind, AsyncEngine) else bind()
        await opened.__aenter__()
        try:
            await opened.begin()
            if isinstance(opened, AsyncConnection):
                return opened, opened
            return opened, await opened.connection()
        except BaseException as exc:
            await opened.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(self, type_: object, value: object, traceback: object) -> None:
        await self._opened.__aexit__(type_, value, traceback)


async def _call(
    fn: Callable[[AsyncSession | AsyncConnection], Awaitable[_T]],
    handle: AsyncSession | AsyncConnection,
) -> _T:
    result = fn(handle)
    if not inspect.isawaitable(result):
        raise ConfigurationError(
            f"{function_name(fn)} is not async: use run_transaction for plain functions"
        )
    return await result
