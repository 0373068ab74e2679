"""One engine, one state: an ``execution_options()`` copy is its engine's, and state goes with it.

``Engine.execution_options()`` returns a copy that shares its parent's pool, dialect and events.
Faults and shapes: a copy hardened again (before: a second guard on the shared pool, two
checkout checks per checkout), a unit on a copy whose connection is terminated by the server
(before: retried with the default policy, the engine's hooks never heard of it), units on the
engine and on its copy (before: the copy's COMMITs were marked twice). And the state lives on
the engine: dropped with it, with nothing left in any process-wide map.
"""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

import pytest
import sqlalchemy as sa
from forking import held_by_another_thread, in_child
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe import Policy, UnitPolicy
from dropsafe._engine_state import state_of
from dropsafe._unit import dialect_hooks
from dropsafe.events import RetryScheduled

FACES = [("psycopg2", "sync"), ("psycopg", "sync"), ("psycopg", "async"), ("asyncpg", "async")]
FACE_IDS = [f"{driver}-{face}" for driver, face in FACES]
TERMINATE_OWN = "SELECT pg_terminate_backend(pg_backend_pid())"


def _guard_listeners(engine: sa.Engine) -> int:
    """How many of dropsafe's checkout checks the engine's pool runs per checkout."""
    checks = engine.pool.dispatch.checkout
    return sum(1 for listener in checks if "CheckoutCheck" in getattr(listener, "__qualname__", ""))


def test_an_execution_options_copy_is_hardened_with_its_engine():
    policy = Policy(unit=UnitPolicy(max_attempts=2))
    engine = dropsafe.create_engine("postgresql+psycopg2://app@127.0.0.1:9/app", policy=policy)
    try:
        copy = engine.execution_options(tag="copy")
        assert dropsafe.policy_of(copy) is policy
        assert _guard_listeners(engine) == 1
        assert dropsafe.harden(copy) is copy
        assert _guard_listeners(engine) == 1, "the shared pool got a second guard"
        with pytest.raises(dropsafe.ConfigurationError, match="another policy"):
            dropsafe.harden(copy, Policy())
    finally:
        engine.dispose()


def _hooked(shared_server, driver, face, events):
    policy = Policy(hooks=(events.append,))
    url = shared_server.url(driver)
    if face == "async":
        return dropsafe.create_async_engine(url, policy=policy)
    return dropsafe.create_engine(url, policy=policy)


@pytest.mark.fault
@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_a_unit_on_a_copy_reports_to_its_engines_hooks(shared_server, driver, face):
    """Fault: the server terminates the unit's backend in its first run; the engine's hook
    must hear the retry (before: the copy's unit ran with the default policy, no hooks)."""
    events: list[object] = []
    engine = _hooked(shared_server, driver, face, events)
    runs: list[int] = []
    try:
        copy = engine.execution_options(tag="copy")
        if face == "async":

            async def unit(session):
                runs.append(1)
                if len(runs) == 1:
                    await session.execute(sa.text(TERMINATE_OWN))
                return (await session.execute(sa.text("SELECT 1"))).scalar()

            async def run():
                try:
                    return await dropsafe.run_transaction_async(async_sessionmaker(copy), unit)
                finally:
                    await engine.dispose()

            assert asyncio.run(asyncio.wait_for(run(), 30)) == 1
        else:

            def sync_unit(session):
                runs.append(1)
                if len(runs) == 1:
                    session.execute(sa.text(TERMINATE_OWN))
                return session.execute(sa.text("SELECT 1")).scalar()

            assert dropsafe.run_transaction(sessionmaker(copy), sync_unit, deadline=30) == 1
    finally:
        if face == "sync":
            engine.dispose()
    assert len(runs) == 2
    assert [type(event) for event in events if isinstance(event, RetryScheduled)] == [
        RetryScheduled
    ]


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_units_on_an_engine_and_its_copy_mark_each_commit_once(shared_server, driver):
    engine = dropsafe.create_engine(shared_server.url(driver))
    try:
        copy = engine.execution_options(tag="copy")
        for bind in (engine, copy, engine):
            dropsafe.run_transaction(sessionmaker(bind), lambda s: s.execute(sa.text("SELECT 1")))
        assert copy.dialect is engine.dialect
        assert dialect_hooks.hooked(copy.dialect)
        assert _hooked_commits(copy.dialect.do_commit) == 1, "a COMMIT would be marked twice"
        assert not copy._has_events, "a unit's hooks must keep SQLAlchemy's event-free path"
    finally:
        engine.dispose()


def _hooked_commits(method):
    """How many of the unit's ``do_commit`` hooks ``method`` is made of, each around the next."""
    count = 0
    while method is not None:
        code = getattr(method, "__code__", None)
        if code is None or code.co_name != "do_commit":
            return count
        if code.co_filename == dialect_hooks.__file__:
            count += 1
        cells = dict(zip(code.co_freevars, method.__closure__ or (), strict=True))
        inner = cells.get("commit")
        method = None if inner is None else inner.cell_contents
    return count


def test_an_engines_state_goes_with_the_engine(shared_server):
    """A verified unit fills every slot (policy, guard, server lives, recording, the ring of
    acknowledged commits): nothing keeps the engine, or its state, once the app drops it."""
    engine = dropsafe.create_engine(shared_server.url("psycopg2"))
    dropsafe.run_transaction(
        sessionmaker(engine), lambda s: s.execute(sa.text("CREATE TEMP TABLE t (v int)"))
    )
    state = state_of(engine)
    assert state.guard is not None
    assert state.recording
    assert state.lives_answered
    assert state.acknowledged is not None
    engine.dispose()
    gone_engine, gone_state = weakref.ref(engine), weakref.ref(state)
    del engine, state
    gc.collect()
    assert gone_engine() is None
    assert gone_state() is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_the_engine_state_lock_another_thread_held():
    engine = sa.create_engine("postgresql+psycopg2://app@127.0.0.1:9/app")
    with held_by_another_thread(state_of(engine).lock):
        # In the child the holding thread does not exist; a child stuck on the lock is killed.
        assert in_child(lambda: state_of(engine).lock.acquire(timeout=2)) == 0
