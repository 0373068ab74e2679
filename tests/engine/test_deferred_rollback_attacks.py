"""Attacks on psycopg2's deferred checkin ROLLBACK (session 18), after its three fixes.

`dropsafe._drivers.psycopg2_rollback` runs psycopg2's own ``rollback()`` in a worker thread and
settles it before the connection's next use. Each test here attacks one promise of
docs/guarantees.md ("The ROLLBACK that ends a request is not awaited") with a real server and
real faults (backends terminated, a link slowed or cut through a `ChaosProxy`): an app's pool
listeners added in every way (awaited where the app listens to ``checkin``, or to ``checkout``
before dropsafe's check; deferred again once it stops; one that raises ``DisconnectionError``
as SQLAlchemy's recipes do, session 19: held), a ROLLBACK failed before the pool's reset,
threads meeting terminated backends and cuts mid-ROLLBACK, and gevent and eventlet without a
wait callback. Two failed before their fix: the app's ``checkout`` listeners added before
harden() or on the Pool class met the ROLLBACK under way (psycopg2 refused their setters) or,
failed, its closed connection (the request failed); eventlet without its psycopg2 patch hung
(the worker's queue was eventlet's green one).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa
from deferred_rollback_parts import (
    BACKEND_PID,
    DEADLINE_S,
    IDLE,
    handed_off,
    until,
    was_handed_off,
)
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._drivers import psycopg2_rollback
from dropsafe.events import DeadConnectionReplaced, RollbackConnectionLost

pytestmark = [
    pytest.mark.fault,
    pytest.mark.shares_server,
    pytest.mark.usefixtures("every_rollback_deferred"),
]

psycopg2 = pytest.importorskip("psycopg2")


def _deferred(engine) -> bool:
    """Run a request; whether its ROLLBACK at checkin was left to the worker (then settled)."""
    with handed_off() as handed, engine.connect() as connection:
        native = connection.connection.dbapi_connection
        connection.execute(BACKEND_PID)
    found = was_handed_off(native, handed)
    psycopg2_rollback.settle(native)  # as the next checkout does
    assert native.get_transaction_status() == IDLE
    return found


def _noop(*args) -> None:
    del args


# -- the app's listeners of the next checkout -------------------------------------------------


def _hardened_after(url, listen, events, **kwargs):
    """An engine made by SQLAlchemy, ``listen(engine)`` called, then hardened."""
    engine = sa.create_engine(url, pool_size=1, max_overflow=0, **kwargs)
    listen(engine)
    return dropsafe.harden(engine, dropsafe.Policy(hooks=(events.append,)))


@pytest.mark.parametrize("where", ["engine", "pool_class"])
def test_an_app_checkout_listener_before_harden_sets_a_characteristic(
    shared_server, shared_server_proxy, disposing, where
) -> None:
    """The app's ``checkout`` listener, registered before harden() (so it runs before the
    checkout check that settles the ROLLBACK) or on the Pool class (always first), sets
    ``readonly`` on the next checkout while the last request's ROLLBACK is still under way
    (its reply 200 ms late): psycopg2 refuses a setter while its ROLLBACK runs in the worker."""
    events: list[object] = []
    refused: list[str] = []
    calls: list[bool] = []

    def set_readonly(dbapi_connection, record, proxied) -> None:
        del record, proxied
        if not hasattr(dbapi_connection, "get_transaction_status"):
            return  # another test's engine, on the Pool class
        calls.append(dbapi_connection in psycopg2_rollback._PENDING)
        try:
            dbapi_connection.readonly = False
        except psycopg2.ProgrammingError as exc:
            refused.append(str(exc))

    target = sa.pool.Pool if where == "pool_class" else None
    engine = disposing(
        _hardened_after(
            shared_server_proxy.route(shared_server.url("psycopg2")),
            lambda engine: sa.event.listen(target or engine, "checkout", set_readonly),
            events,
        )
    )
    try:
        with engine.connect() as connection:
            pid = connection.execute(BACKEND_PID).scalar()
        for _ in range(3):
            shared_server_proxy.latency(200)
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            shared_server_proxy.latency(0)
            with engine.connect() as connection:
                assert connection.execute(BACKEND_PID).scalar() == pid
    finally:
        if target is not None:
            sa.event.remove(target, "checkout", set_readonly)
    # Its listener never met a ROLLBACK under way (awaited at checkin: it runs first).
    assert len(calls) == 7
    assert not any(calls), calls
    assert refused == []
    assert events == []


def test_an_app_checkout_listener_before_harden_after_a_failed_rollback(
    shared_server, disposing
) -> None:
    """The last request's ROLLBACK failed (its backend terminated while the request ran): the
    next checkout's listener of the app's, registered before harden(), runs before the
    checkout check; it must meet a working connection (awaited, the failed ROLLBACK's
    connection was replaced at checkin, as without dropsafe), never 'connection already
    closed'."""
    events: list[object] = []
    errors: list[str] = []

    def set_name(dbapi_connection, record, proxied) -> None:
        del record, proxied
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET application_name = 'app'")
        except psycopg2.Error as exc:
            errors.append(str(exc))
            raise

    engine = disposing(
        _hardened_after(
            shared_server.url("psycopg2"),
            lambda engine: sa.event.listen(engine, "checkout", set_name),
            events,
        )
    )
    for _ in range(2):
        with Session(engine) as session:
            pid = session.execute(BACKEND_PID).scalar()
            assert shared_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)") == [("t",)]
        with Session(engine) as session:
            assert session.execute(BACKEND_PID).scalar() != pid
    assert errors == []
    lost = [event for event in events if isinstance(event, RollbackConnectionLost)]
    assert len(lost) == 2, events
    assert "already closed" not in str(lost)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_app_checkout_listener_that_raises_disconnection_error(
    shared_server, shared_server_proxy, disposing, when
) -> None:
    """SQLAlchemy's documented recipes raise ``DisconnectionError`` from a ``checkout`` listener
    (a ping that failed; a connection made in another process): the pool invalidates that
    connection and checks out a new one. Here it is raised on a connection whose last
    ROLLBACK is under way (its reply 200 ms late), by a listener registered before harden()
    (the ROLLBACK awaited at checkin) or after (deferred, settled by dropsafe's check first).
    The request gets a new backend; the old connection is closed, nothing left under way, no
    error said; and the app's ping, where it runs, never meets a ROLLBACK under way."""
    events: list[object] = []
    verdicts: list[str] = []
    met_pending: list[bool] = []

    def stale_or_dead(dbapi_connection, record, proxied) -> None:
        del proxied
        met_pending.append(dbapi_connection in psycopg2_rollback._PENDING)
        if record.info.pop("stale", False):
            verdicts.append("stale")
            raise sa.exc.DisconnectionError("the app says: stale")
        try:  # the pessimistic ping of SQLAlchemy's old recipe
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except psycopg2.Error as exc:
            verdicts.append("dead")
            raise sa.exc.DisconnectionError("the app's ping failed") from exc
        verdicts.append("alive")

    engine = disposing(
        _hardened_after(
            shared_server_proxy.route(shared_server.url("psycopg2")),
            (lambda engine: sa.event.listen(engine, "checkout", stale_or_dead))
            if when == "before"
            else _noop,
            events,
        )
    )
    if when == "after":
        sa.event.listen(engine, "checkout", stale_or_dead)
    pids = []
    for _ in range(3):
        with handed_off() as handed, engine.connect() as connection:
            pids.append(connection.execute(BACKEND_PID).scalar())
            native = connection.connection.dbapi_connection
            connection.connection._connection_record.info["stale"] = True
            shared_server_proxy.latency(200)
        assert was_handed_off(native, handed) == (when == "after")
        shared_server_proxy.latency(0)
        with engine.connect() as connection:
            pids.append(connection.execute(BACKEND_PID).scalar())
        until(lambda native=native: native.closed, "the stale connection was never closed")
        assert native not in psycopg2_rollback._PENDING
    # Each stale connection gave way to a new backend, which the next request kept.
    assert len(set(pids[0::2])) == 3, pids
    assert pids[0::2][1:] == pids[1::2][:-1], pids
    assert verdicts.count("stale") == 3, verdicts
    assert "dead" not in verdicts, verdicts
    assert not any(met_pending), met_pending
    assert events == []
    with engine.connect() as connection:
        assert connection.execute(BACKEND_PID).scalar() == pids[-1]


# -- deferred, or awaited where the app listens: every way a listener gets there ---------------

#: How an app's listener gets onto an engine's pool, by name: (when: "before" or "after"
#: harden(); on what; which event) or None, and whether the ROLLBACK at checkin is deferred.
WAYS = {
    "none": (None, True),
    "checkin-before-harden": (("before", "engine", "checkin"), False),
    "checkin-after-harden": (("after", "engine", "checkin"), False),
    "checkin-on-the-pool": (("after", "pool", "checkin"), False),
    "checkin-on-the-pool-class": (("after", "pool_class", "checkin"), False),
    "checkin-on-an-options-engine": (("after", "options", "checkin"), False),
    "checkin-before-dispose": (("after", "engine-then-dispose", "checkin"), False),
    "checkin-through-pool-events": (("before", "pool_events", "checkin"), False),
    "checkout-after-harden": (("after", "engine", "checkout"), True),
    "checkout-on-the-pool-after-harden": (("after", "pool", "checkout"), True),
    "checkout-before-harden": (("before", "engine", "checkout"), False),
    "checkout-on-the-pool-class": (("after", "pool_class", "checkout"), False),
    "reset-before-harden": (("before", "engine", "reset"), True),
    "close-before-harden": (("before", "engine", "close"), True),
    "invalidate-before-harden": (("before", "engine", "invalidate"), True),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_deferred_unless_the_app_listens_before_the_rollback_is_read(
    shared_server, disposing, monkeypatch, way
) -> None:
    """Each way an app's listener reaches the pool: ``checkin`` ones, and ``checkout`` ones
    that run before dropsafe's checkout check, have the ROLLBACK awaited; the others leave it
    deferred. Removed again (event.remove), it is deferred again."""
    monkeypatch.setattr(psycopg2_rollback, "DEFERRED_BEFORE_TIMING", 1000)
    how, deferred = WAYS[way]
    listened: list[str] = []

    def listener(*args) -> None:
        del args
        listened.append(way)

    url = shared_server.url("psycopg2")
    kwargs = {}
    if how is not None and how[1] == "pool_events":
        kwargs["pool_events"] = [(listener, how[2])]
    engine = sa.create_engine(url, pool_size=1, max_overflow=0, **kwargs)
    removed: list[tuple[object, str]] = []

    def listen() -> None:
        assert how is not None
        _, on, name = how
        target: object = {
            "engine": engine,
            "engine-then-dispose": engine,
            "pool": engine.pool,
            "pool_class": sa.pool.Pool,
            "options": engine.execution_options(app_option=True),
        }.get(on)
        if target is not None:
            sa.event.listen(target, name, listener)
            if on != "engine-then-dispose":
                removed.append((target, name))

    try:
        if how is not None and how[0] == "before":
            listen()
        engine = disposing(dropsafe.harden(engine))
        if how is not None and how[0] == "after":
            listen()
        if how is not None and how[1] == "engine-then-dispose":
            engine.dispose()  # a new pool, with the old one's listeners
        assert [_deferred(engine) for _ in range(3)] == [deferred] * 3
        if how is not None and how[2] in ("checkin", "checkout"):
            assert listened, "the app's listener never ran"
        if how is None or how[1] in ("pool_events", "engine-then-dispose"):
            # SQLAlchemy cannot remove these (a pool's own, or one copied to the new pool).
            return
        for target, name in removed:
            sa.event.remove(target, name, listener)
        removed.clear()
        assert [_deferred(engine) for _ in range(3)] == [True] * 3
    finally:
        for target, name in removed:
            sa.event.remove(target, name, listener)


def test_the_plugins_engine(shared_server, disposing, monkeypatch) -> None:
    """``?plugin=dropsafe``: hardened as SQLAlchemy makes the engine; deferred, awaited while the
    app listens to checkin, deferred again once it stops."""
    monkeypatch.setattr(psycopg2_rollback, "DEFERRED_BEFORE_TIMING", 1000)
    url = f"{shared_server.url('psycopg2')}&plugin=dropsafe"
    engine = disposing(sa.create_engine(url, pool_size=1, max_overflow=0))
    assert [_deferred(engine) for _ in range(2)] == [True, True]
    sa.event.listen(engine, "checkin", _noop)
    assert [_deferred(engine) for _ in range(2)] == [False, False]
    sa.event.remove(engine, "checkin", _noop)
    sa.event.listen(engine, "checkout", _noop)  # after dropsafe's check: still deferred
    assert [_deferred(engine) for _ in range(2)] == [True, True]


def test_a_checkin_listener_that_raises(shared_server, disposing) -> None:
    """The app's checkin listener raises: as without dropsafe (the ROLLBACK awaited, the error
    the app's), and the next request finds the connection idle, its transaction rolled back."""
    engine = disposing(
        dropsafe.create_engine(shared_server.url("psycopg2"), pool_size=1, max_overflow=0)
    )
    plain = disposing(sa.create_engine(shared_server.url("psycopg2"), pool_size=1, max_overflow=0))

    def fails(dbapi_connection, record) -> None:
        del dbapi_connection, record
        raise RuntimeError("the app's checkin listener")

    outcomes = []
    for each in (engine, plain):
        sa.event.listen(each, "checkin", fails)
        session = Session(each)
        session.execute(sa.text("SELECT 1"))
        native = session.connection().connection.dbapi_connection
        try:
            session.close()
            outcomes.append("closed")
        except RuntimeError as exc:  # SQLAlchemy's: the connection is not returned to the pool
            outcomes.append(str(exc))
        # Its ROLLBACK was awaited before the listener ran: nothing left under way or open.
        assert native not in psycopg2_rollback._PENDING
        assert native.get_transaction_status() == IDLE
        native.close()
    assert outcomes[0] == outcomes[1]


# -- threads: backends terminated before the deferred ROLLBACK --------------------------------


def test_many_threads_each_rollback_failed_said_once_with_its_own_error(
    shared_server, disposing, monkeypatch
) -> None:
    """6 threads, 8 requests each, on a pool of 3: every request's backend is terminated
    before its Session closes, so every deferred ROLLBACK fails in the worker. Each failure is
    said exactly once, as the Session's ('rollback'), with its real error (never "connection
    already closed"); no request sees an error; the pool ends with working connections."""
    monkeypatch.setattr(psycopg2_rollback, "DEFERRED_BEFORE_TIMING", 1000)
    events: list[object] = []
    size, threads_n, requests_n = 3, 6, 8
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url("psycopg2"),
            policy=dropsafe.Policy(hooks=(events.append,)),
            pool_size=size,
            max_overflow=0,
            pool_timeout=DEADLINE_S,
        )
    )
    admin = disposing(sa.create_engine(shared_server.url("psycopg2"), poolclass=sa.pool.NullPool))
    errors: list[BaseException] = []
    requests: list[object] = []
    handed: list[object] = []
    hand_over = psycopg2_rollback._Workers.run

    def counted(workers, pending) -> None:
        handed.append(pending._connection)
        hand_over(workers, pending)

    monkeypatch.setattr(psycopg2_rollback._Workers, "run", counted)

    def client() -> None:
        try:
            with admin.connect() as killer:
                for _ in range(requests_n):
                    session = Session(engine)
                    pid = session.execute(BACKEND_PID).scalar()
                    native = session.connection().connection.dbapi_connection
                    ended = killer.execute(sa.text(f"SELECT pg_terminate_backend({pid}, 5000)"))
                    assert ended.scalar() is True
                    session.close()
                    requests.append(native)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S * 3)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    handed_by_requests = list(handed)
    # Every connection checked out at once: each ROLLBACK still unread is read (and said).
    held = [engine.connect() for _ in range(size)]
    try:
        for connection in held:
            assert connection.execute(sa.text("SELECT 41 + 1")).scalar() == 42
    finally:
        for connection in held:
            connection.close()
    total = threads_n * requests_n
    # Every request's ROLLBACK handed to a worker, once (the pool's reset found it under way).
    assert len(requests) == total
    assert sorted(map(id, handed_by_requests)) == sorted(map(id, requests))
    lost = [event for event in events if isinstance(event, RollbackConnectionLost)]
    # Each failed ROLLBACK said once, as its own, where the next checkout read it; one that the
    # pool closed first (every idle connection found dead by a checkout: replaced pool-wide, the
    # pool recycles them, and a close reads a ROLLBACK quietly) is said by that replacement.
    pool_wide = [e for e in events if isinstance(e, DeadConnectionReplaced) and e.pool_wide]
    assert total - size * len(pool_wide) <= len(lost) <= total, events
    assert {event.during for event in lost} == {"rollback"}
    assert "already closed" not in str(lost)
    replaced = [e for e in events if isinstance(e, DeadConnectionReplaced)]
    assert len(replaced) == len(lost), events


# -- gevent and eventlet, monkey patched, no wait callback --------------------------------------

#: A green app's requests, by shape (its argv: gevent or eventlet, the shape), every ROLLBACK
#: deferred: 12 greenlets on 2 connections (and 3 of overflow, closed at checkin with their
#: ROLLBACK under way), workers idle past their exit and needed again, backends terminated
#: before the Session closes (said, with their own error), dispose after every batch, a fork.
GREEN_REQUESTS = r"""
import os
import sys

lib, shape = sys.argv[1], sys.argv[2]
if lib == "gevent":
    from gevent import monkey

    monkey.patch_all()
    import gevent

    def spawn_all(fn, n):
        jobs = [gevent.spawn(fn, i) for i in range(n)]
        gevent.joinall(jobs, raise_error=True)

    sleep = gevent.sleep
else:
    import eventlet

    # eventlet's own psycopg2 patch sets a wait callback (the ROLLBACK is then awaited, in the
    # greenlet); without it psycopg2 blocks the hub, as under gevent's patch_all.
    if lib == "eventlet":
        eventlet.monkey_patch()
    else:
        eventlet.monkey_patch(psycopg=False)

    def spawn_all(fn, n):
        pool = eventlet.GreenPool()
        threads = [pool.spawn(fn, i) for i in range(n)]
        for t in threads:
            t.wait()

    sleep = eventlet.sleep

import sqlalchemy as sa
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._drivers import psycopg2_rollback
from dropsafe.events import RollbackConnectionLost

psycopg2_rollback.SLOW_ROLLBACK_S = 0.0
psycopg2_rollback.DEFERRED_BEFORE_TIMING = 1000
url, admin_url = os.environ["RB_ATTACK_URL"], os.environ["RB_ATTACK_ADMIN_URL"]
events = []
policy = dropsafe.Policy(hooks=(events.append,))
overflow = 3 if shape == "overflow" else 0
engine = dropsafe.create_engine(
    url, policy=policy, pool_size=2, max_overflow=overflow, pool_timeout=20
)
admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
requests = []
handed = []
hand_over = psycopg2_rollback._Workers.run


def counted(self, pending):
    handed.append(pending)
    hand_over(self, pending)


psycopg2_rollback._Workers.run = counted


def request():
    with Session(engine) as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        native = session.connection().connection.dbapi_connection
    requests.append(native)
    return pid


def work(i):
    for _ in range(10):
        request()


if shape in ("many", "overflow"):
    spawn_all(work, 12)
elif shape == "idle":
    psycopg2_rollback._Workers.IDLE_S = 0.05
    spawn_all(work, 4)
    before = list(psycopg2_rollback._WORKERS[0]._idle)
    sleep(0.5)  # the workers' idle time passes (they end)
    assert not psycopg2_rollback._WORKERS[0]._idle, "idle workers did not end"
    spawn_all(work, 4)
elif shape == "terminate":
    def killing(i):
        with admin.connect() as killer:
            for _ in range(5):
                with Session(engine) as session:
                    pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                    native = session.connection().connection.dbapi_connection
                    killer.execute(sa.text(f"SELECT pg_terminate_backend({pid}, 5000)"))
                requests.append(native)
    spawn_all(killing, 4)
    spawn_all(work, 4)
    lost = [e for e in events if isinstance(e, RollbackConnectionLost)]
    assert lost, events
    assert "already closed" not in str(lost), lost
elif shape == "dispose":
    for _ in range(3):
        spawn_all(work, 4)
        engine.dispose()
        assert not psycopg2_rollback._PENDING
elif shape == "fork":
    # SQLAlchemy's after-fork step, as docs/how-to/process-models.md asks of the app.
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    spawn_all(work, 4)
    request()
    child = os.fork()
    if child == 0:
        try:
            ok = request() > 0
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    spawn_all(work, 2)
# Every request's ROLLBACK handed to a worker, once; none where a wait callback is set.
assert requests
expected = [] if lib == "eventlet" else requests
assert [p._connection for p in handed] == expected, (len(handed), len(requests))
engine.dispose()
print("DONE", len(requests))
"""
#: The slowest shape takes about 3 s on a loaded 2-core machine.
GREEN_DEADLINE_S = 30.0
GREEN_SHAPES = ["many", "overflow", "idle", "terminate", "dispose", "fork"]


def _skip_without(library: str) -> None:
    """Skip where ``library`` is not installed, without importing it here: eventlet's import
    registers an at-fork warning in this process that fails every later test that forks in
    it (the warning is an error under this suite's filters). The green app runs in a child."""
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")


@pytest.mark.parametrize("shape", GREEN_SHAPES)
@pytest.mark.parametrize("lib", ["gevent", "eventlet", "eventlet-threads"])
def test_green_requests(shared_server, shared_server_proxy, lib, shape) -> None:
    """Monkey patched, no psycopg2 wait callback (psycopg2 blocks the hub on its I/O), 2 ms
    each way through the proxy so that every ROLLBACK is still under way when its request ends:
    every shape ends within the deadline, every ROLLBACK deferred, none said twice or wrongly."""
    _skip_without(lib.split("-")[0])
    shared_server_proxy.latency(2)
    env = {
        **os.environ,
        "RB_ATTACK_URL": shared_server_proxy.route(shared_server.url("psycopg2")),
        "RB_ATTACK_ADMIN_URL": shared_server.url("psycopg2"),
        "PYTHONWARNINGS": "ignore",
    }
    done: subprocess.CompletedProcess[str] | None = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        done = subprocess.run(
            [sys.executable, "-c", GREEN_REQUESTS, lib, shape],
            env=env,
            capture_output=True,
            text=True,
            timeout=GREEN_DEADLINE_S,
            check=False,
        )
    assert done is not None, f"{lib}: the {shape} requests hung"
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("DONE"), done.stderr[-3000:]


# -- a ROLLBACK that failed before the pool's reset: said once, as the closer's ----------------


@pytest.mark.parametrize("pre_ping", [False, True], ids=["", "pre_ping"])
@pytest.mark.parametrize("closer", ["session", "connection"])
def test_a_rollback_failed_before_the_reset_said_once(
    shared_server, disposing, closer, pre_ping
) -> None:
    """The backend terminated inside the request; its closing ROLLBACK fails in the worker
    before the pool's reset runs (a ``reset`` listener waits for the worker: not a checkin
    listener, so the ROLLBACK stays deferred). Whoever closes (a Session, a Connection), and
    whoever reads it (the checkout check, or SQLAlchemy's pre-ping): said once, as 'rollback',
    with its own error; the next request has a new backend."""
    events: list[object] = []
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url("psycopg2"),
            policy=dropsafe.Policy(hooks=(events.append,)),
            pool_size=1,
            max_overflow=0,
            pool_pre_ping=pre_ping,
        )
    )

    @sa.event.listens_for(engine, "reset")
    def the_worker_has_ended(dbapi_connection, record, reset_state) -> None:
        del record, reset_state
        pending = psycopg2_rollback._PENDING.get(dbapi_connection)
        if pending is not None:
            assert pending.wait(DEADLINE_S)

    for _ in range(2):
        user = Session(engine) if closer == "session" else engine.connect()
        pid = user.execute(BACKEND_PID).scalar()
        assert shared_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)") == [("t",)]
        user.close()
        with engine.connect() as connection:
            assert connection.execute(BACKEND_PID).scalar() != pid
    lost = [event for event in events if isinstance(event, RollbackConnectionLost)]
    assert [event.during for event in lost] == ["rollback", "rollback"], events
    assert "already closed" not in str(lost)
    # The server's side of it (psycopg2's "connection already closed" is an InterfaceError).
    assert all(event.error.startswith("OperationalError") for event in lost), lost


#: How many times the threads' links are cut.
CUTS = 10


@pytest.mark.parametrize("idle_s", [60.0, 0.001], ids=["workers-kept", "workers-ending"])
@pytest.mark.parametrize("mode", ["rst", "fin"])
def test_threads_while_the_link_is_cut_again_and_again(  # noqa: PLR0917 - fixtures
    shared_server, shared_server_proxy, disposing, monkeypatch, mode, idle_s
) -> None:
    """6 threads on a pool of 3 at 3 ms each way, every link cut 10 times, each while a
    ROLLBACK is under way in a worker (and, ``workers-ending``, on workers
    ending after 1 ms idle as they are handed the next one): a request may meet the cut (its
    statement's error is the app's), but its close never raises nor hangs, no ROLLBACK is said
    with 'connection already closed', and once healed every request is answered."""
    monkeypatch.setattr(psycopg2_rollback, "DEFERRED_BEFORE_TIMING", 1000)
    monkeypatch.setattr(psycopg2_rollback._Workers, "IDLE_S", idle_s)
    events: list[object] = []
    size = 3
    engine = disposing(
        dropsafe.create_engine(
            shared_server_proxy.route(shared_server.url("psycopg2")),
            policy=dropsafe.Policy(hooks=(events.append,)),
            pool_size=size,
            max_overflow=0,
            pool_timeout=DEADLINE_S,
        )
    )
    shared_server_proxy.latency(3)
    handed: list[psycopg2_rollback.PendingRollback] = []
    hand_over = psycopg2_rollback._Workers.run

    def counted(workers, pending) -> None:
        handed.append(pending)
        hand_over(workers, pending)

    monkeypatch.setattr(psycopg2_rollback._Workers, "run", counted)
    stop = threading.Event()
    close_errors: list[BaseException] = []
    answered: list[int] = []
    cuts: list[int] = []

    def client() -> None:
        while not stop.is_set():
            session = Session(engine)
            # The cut may strike the request's own statement: that error is the app's to see.
            with contextlib.suppress(sa.exc.DBAPIError):
                answered.append(session.execute(BACKEND_PID).scalar())
            try:
                session.close()
            except BaseException as exc:
                close_errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(CUTS):
            # Struck while a ROLLBACK is under way in a worker (its end not yet signalled).
            until(lambda: any(p._done.locked() for p in handed[-6:]), "no ROLLBACK under way")
            cuts.append(shared_server_proxy.cut(mode))
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE_S)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert close_errors == []
    assert sum(cuts) > 0
    assert answered
    shared_server_proxy.heal()
    for _ in range(2 * size):
        with Session(engine) as session:
            assert session.execute(sa.text("SELECT 41 + 1")).scalar() == 42
    lost = [event for event in events if isinstance(event, RollbackConnectionLost)]
    assert "already closed" not in str(lost)
    # The cuts struck ROLLBACKs under way: some were read as failed, and said.
    assert lost, events
    engine.dispose()
    assert not psycopg2_rollback._PENDING


def test_deferred_after_dispose(shared_server, disposing, monkeypatch) -> None:
    """dispose() makes a new pool with the old one's listeners, dropsafe's among them: still
    deferred there, and awaited once the app listens to the new pool's checkin."""
    monkeypatch.setattr(psycopg2_rollback, "DEFERRED_BEFORE_TIMING", 1000)
    engine = disposing(
        dropsafe.create_engine(shared_server.url("psycopg2"), pool_size=1, max_overflow=0)
    )
    assert [_deferred(engine) for _ in range(2)] == [True, True]
    old_pool = engine.pool
    engine.dispose()
    assert engine.pool is not old_pool
    assert [_deferred(engine) for _ in range(2)] == [True, True]
    sa.event.listen(engine, "checkin", _noop)
    assert [_deferred(engine) for _ in range(2)] == [False, False]


#: Greenlets under gevent's patch_all, on 2 connections through the proxy, until the stop file
#: appears: a line every 20 answered requests; at the end, whether any close raised and what the
#: ROLLBACKs that failed said.
GEVENT_UNTIL_STOPPED = r"""
import os
import sys
from gevent import monkey

monkey.patch_all()
import gevent
import sqlalchemy as sa
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._drivers import psycopg2_rollback
from dropsafe.events import RollbackConnectionLost

psycopg2_rollback.SLOW_ROLLBACK_S = 0.0
psycopg2_rollback.DEFERRED_BEFORE_TIMING = 1000
url, stop_file = sys.argv[1], sys.argv[2]
events = []
engine = dropsafe.create_engine(
    url, policy=dropsafe.Policy(hooks=(events.append,)), pool_size=2, max_overflow=0
)
answered = []
close_errors = []


def work():
    while not os.path.exists(stop_file):
        session = Session(engine)
        try:
            session.execute(sa.text("SELECT 1")).all()
            answered.append(1)
            if len(answered) % 20 == 0:
                print("answered", len(answered), flush=True)
        except sa.exc.DBAPIError:
            pass  # the cut struck the request's own statement
        try:
            session.close()
        except BaseException as exc:
            close_errors.append(repr(exc))
        gevent.sleep(0)


gevent.joinall([gevent.spawn(work) for _ in range(6)], raise_error=True)
with Session(engine) as session:
    assert session.execute(sa.text("SELECT 41 + 1")).scalar() == 42
lost = [e for e in events if isinstance(e, RollbackConnectionLost)]
engine.dispose()
print("DONE", close_errors, "already closed" in str(lost), len(lost), flush=True)
"""


@pytest.mark.parametrize("mode", ["rst", "fin"])
def test_gevent_while_the_link_is_cut(shared_server, shared_server_proxy, tmp_path, mode) -> None:
    """Six greenlets under gevent's patch_all (no wait callback) on 2 connections at 3 ms each
    way; the link cut 5 times, each after more requests were answered: no close raises, none
    hangs, no failed ROLLBACK is said as 'connection already closed', and the engine answers
    once the cuts stop."""
    _skip_without("gevent")
    import queue

    shared_server_proxy.latency(3)
    stop_file = tmp_path / "stop"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            GEVENT_UNTIL_STOPPED,
            shared_server_proxy.route(shared_server.url("psycopg2")),
            str(stop_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    assert child.stdout is not None
    stdout = child.stdout
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True)
    reader.start()
    try:
        for _ in range(5):
            line = lines.get(timeout=DEADLINE_S)  # more requests answered since the last cut
            assert line.startswith("answered"), line
            shared_server_proxy.cut(mode)
        stop_file.touch()
        child.wait(timeout=DEADLINE_S)
    finally:
        child.kill()
        child.wait()
    reader.join(DEADLINE_S)
    assert child.stderr is not None
    err = child.stderr.read()
    child.stderr.close()
    stdout.close()
    assert child.returncode == 0, err[-3000:]
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    # No close raised; no ROLLBACK said as 'connection already closed'.
    assert rest
    assert rest[-1].startswith("DONE [] False "), rest[-3:]
    # The cuts struck ROLLBACKs under way in the workers (5 of 5 cuts did, measured).
    assert int(rest[-1].split()[-1]) >= 1, rest[-1]
