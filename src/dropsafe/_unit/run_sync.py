"""The sync runner of a unit of work: performs the core's steps, and nothing else decides.

`dropsafe._unit.core` makes every decision; this module runs the function, commits, resolves
and sleeps when the core says so (its async twin: `dropsafe._unit.run_async`). What an attempt
does and why: docs/guarantees.md, "How it keeps it".
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from dropsafe._backoff import waits_elsewhere
from dropsafe._commit_truth.server_life import learn_server_life
from dropsafe._drivers.deadline import bounded
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
    from collections.abc import Callable, Iterator

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
    reply: Reply = None
    while not isinstance(step := next_step(core, reply), Done):
        if isinstance(step, Run):
            reply = _attempt(bind, fn, step, hooks)
        elif isinstance(step, Resolve):
            reply = resolution(step, engine, hooks)()
        else:
            time.sleep(step.seconds)
            reply = None
            continue
        audited = acknowledged(engine, reply, step, fn)
        if audited is not None:
            audit_after_failover(audited, hooks)
    return cast("_T", step.value)


def _attempt(
    bind: sessionmaker[Session] | sa.Engine,
    fn: Callable[[Session | sa.Connection], _T],
    step: Run,
    hooks: tuple[Hook, ...],
) -> Report:
    """Run ``fn`` once in a new transaction and commit it; report what happened."""
    with AttemptTracker(unit_name(fn), hooks, read_xid=step.verify_commits) as tracker:
        attempt = Attempt(tracker)
        try:
            with (
                waits_elsewhere(),  # the unit waits for an unreachable server: not its connects
                _begun(bind) as (handle, connection),
            ):
                attempt.connected(connection)
                # The server-life read is bounded too: on a connection that a middlebox forgot,
                # it is the first thing to hang.
                with bounded(connection.connection.dbapi_connection, step.deadline):
                    if step.verify_commits:
                        learn_server_life(connection)
                    attempt.reached_server(handle if isinstance(handle, Session) else None)
                    try:
                        result = not_awaitable(fn(handle), fn)
                    except Exception as exc:
                        attempt.function_raised(connection, exc)
                        raise
                    attempt.ran(handle.in_transaction())
                    try:
                        with tracker.committing():
                            handle.commit()
                    except Exception as exc:  # noqa: BLE001 - reported to the core, which decides
                        return attempt.commit_raised(result, exc, handle)
                    return attempt.committed(result)
        except Exception as exc:  # noqa: BLE001 - reported to the core, which re-raises the rest
            return attempt.failed(exc)


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
