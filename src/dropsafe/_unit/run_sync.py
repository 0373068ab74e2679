"""The sync runner of a unit of work: performs the core's steps, and nothing else decides.

`dropsafe._unit.core` makes every decision; this module runs the function, commits, resolves
and sleeps when the core says so (its async twin: `dropsafe._unit.run_async`). What an attempt
does and why: docs/guarantees.md, "How it keeps it".
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TypeVar, cast, final

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from dropsafe._backoff import waits_elsewhere
from dropsafe._commit_truth.server_life import learn_server_life
from dropsafe._drivers.deadline import bounded_checkout
from dropsafe._unit.core import Resolve, Run, unit_of_work
from dropsafe._unit.failover_audit import audit_after_failover
from dropsafe._unit.run_common import (
    Attempt,
    Done,
    acknowledged,
    next_step,
    not_awaitable,
    resolution,
    unit_name,
)
from dropsafe._unit.tracker import AttemptTracker

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._policy import UnitPolicy
    from dropsafe._unit.core import Reply, Report
    from dropsafe.events import Hook

__all__ = ["run_unit"]

_T = TypeVar("_T")


def run_unit(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Session | sa.Connection], _T],
    *,
    engine: sa.Engine,
    unit: UnitPolicy,
    hooks: tuple[Hook, ...],
) -> _T:
    """Run ``fn`` as a unit of work on ``bind``."""
    core = unit_of_work(unit, hooks)
    name = unit_name(fn)  # once per unit: each attempt's events and the commit's audit say it
    reply: Reply = None
    while not isinstance(step := next_step(core, reply), Done):
        if isinstance(step, Run):
            reply = _attempt(bind, fn, step, hooks, name)
        elif isinstance(step, Resolve):
            reply = resolution(step, engine, hooks)()
        else:
            time.sleep(step.seconds)
            reply = None
            continue
        audited = acknowledged(engine, reply, step, name)
        if audited is not None:
            audit_after_failover(audited, hooks)
    return cast("_T", step.value)


def _attempt(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Session | sa.Connection], _T],
    step: Run,
    hooks: tuple[Hook, ...],
    name: str,
) -> Report:
    """Run ``fn`` once in a new transaction and commit it; report what happened."""
    with AttemptTracker(name, hooks, read_xid=step.verify_commits) as tracker:
        attempt = Attempt(tracker)
        try:
            with (
                waits_elsewhere(),  # the unit waits for an unreachable server: not its connects
                _Begun(bind) as (handle, connection),
            ):
                attempt.connected(connection)
                # The server-life read is bounded too: on a connection that a middlebox forgot,
                # it is the first thing to hang.
                with bounded_checkout(connection.connection, step.deadline):
                    if step.verify_commits:
                        learn_server_life(connection)
                    attempt.reached_server(handle if isinstance(handle, Session) else None)
                    try:
                        result = not_awaitable(fn(handle), fn)
                    except Exception as exc:
                        attempt.function_raised(connection, exc)
                        raise
                    attempt.ran(handle.in_transaction())
                    tracker.armed = True  # the unit's own COMMIT, not the function's
                    try:
                        handle.commit()
                    except Exception as exc:  # noqa: BLE001 - reported to the core, which decides
                        tracker.armed = False
                        return attempt.commit_raised(result, exc, handle)
                    finally:
                        tracker.armed = False
                    return attempt.committed(result)
        except Exception as exc:  # noqa: BLE001 - reported to the core, which re-raises the rest
            return attempt.failed(exc)


@final
class _Begun:
    """``with _Begun(bind) as (what fn gets, its connection):`` inside a begun transaction.

    A class, not a generator (entered at every attempt): the Session (or Connection) is closed
    on the way out, as its own ``with`` block would, also when BEGIN or connecting raised.
    """

    __slots__ = ("_bind", "_opened")

    def __init__(self, bind: sessionmaker[Session] | sa.Engine) -> None:
        self._bind = bind

    def __enter__(self) -> tuple[Session | sa.Connection, sa.Connection]:
        bind = self._bind
        opened = self._opened = bind.connect() if isinstance(bind, sa.Engine) else bind()
        try:
            opened.begin()
            return opened, opened if isinstance(opened, sa.Connection) else opened.connection()
        except BaseException:
            opened.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self._opened.close()
