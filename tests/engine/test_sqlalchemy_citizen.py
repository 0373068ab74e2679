"""dropsafe inside SQLAlchemy: every event argument handled, the user's choices kept, no leaks.

Each test here failed on the guard as it was before issue 18 (recorded in the commit message);
SQLAlchemy's own suite checks the rest (scripts/sqlalchemy_compat.py).
"""

from __future__ import annotations

import gc
import select
import time

import pytest
import sqlalchemy as sa
from pooled import BACKEND_PID, held_backend_pids
from sqlalchemy import event

import dropsafe
from dropsafe._engine.guard import guard_of
from dropsafe.events import DeadConnectionReplaced


def _wait_until(condition, *, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _noting_engine(server, events, **kwargs):
    """A dropsafe engine on ``server`` (psycopg2), its events appended to ``events``."""
    policy = dropsafe.Policy(hooks=(events.append,))
    return dropsafe.create_engine(server.url("psycopg2"), policy=policy, **kwargs)


def _sessions(server, application_name):
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE application_name = '{application_name}' AND pid <> pg_backend_pid()"
    )
    return int(rows[0][0])


# -- do_connect without a pool entry -------------------------------------------------------


def test_pool_creator_called_directly_gets_dropsafes_connect_arguments(shared_server, disposing):
    # SQLAlchemy calls do_connect listeners with connection_record=None when the pool's creator
    # is called by hand. Before: AttributeError: 'NoneType' object has no attribute 'info'.
    engine = disposing(dropsafe.create_engine(shared_server.url("psycopg2")))
    raw = engine.pool._creator()
    try:
        assert "tcp_user_timeout=" in raw.dsn
        with raw.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        raw.close()


# -- the user's .info dictionaries ---------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg2", "pg8000"])
def test_no_dropsafe_keys_in_the_users_info(shared_server, driver, disposing):
    # Before: dropsafe.added_connect_args, dropsafe.idle_since, dropsafe.fresh in entry.info.
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url(driver), connect_args=shared_server.connect_args(driver)
        )
    )
    seen = []
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            seen.append(dict(conn.info))
            seen.append(dict(conn.connection._connection_record.info))
    with engine.connect() as conn:
        conn.invalidate()
        conn.execute(sa.text("SELECT 1"))  # reconnects the same pool entry
        seen.append(dict(conn.connection._connection_record.info))
    assert seen == [{}] * len(seen)


# -- the user's handle_error decisions -----------------------------------------------------


def _break_checked_out(server, conn):
    pid = conn.execute(BACKEND_PID).scalar()
    server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")
    return pid


@pytest.mark.parametrize("user_says", [None, True])
def test_users_invalidate_pool_on_disconnect_wins_over_dropsafes(
    shared_server, user_says, disposing
):
    # The user's listener is registered before harden(): SQLAlchemy runs listeners in order,
    # so before, dropsafe's ran last and overwrote the user's True with its own False.
    engine = disposing(sa.create_engine(shared_server.url("psycopg2"), pool_size=3, max_overflow=0))
    if user_says is not None:

        @event.listens_for(engine, "handle_error")
        def decide(context):
            if context.is_disconnect:
                context.invalidate_pool_on_disconnect = user_says

    dropsafe.harden(engine)
    idle_before = set(held_backend_pids(engine, 3))
    with engine.connect() as conn:
        broken = _break_checked_out(shared_server, conn)
        with pytest.raises(sa.exc.OperationalError) as caught:
            conn.execute(sa.text("SELECT 1"))
        assert caught.value.connection_invalidated
    idle_after = set(held_backend_pids(engine, 3))
    kept = (idle_before - {broken}) & idle_after
    if user_says:
        assert not kept, "the user asked for the whole pool to be recycled"
    else:
        # dropsafe's own default: the other idle connections are alive, so they stay.
        assert kept == idle_before - {broken}


def test_users_is_disconnect_false_is_kept(shared_server, disposing):
    # A user who knows better says "not a disconnect"; before, dropsafe flipped it back.
    engine = disposing(sa.create_engine(shared_server.url("psycopg2"), pool_size=1, max_overflow=0))

    @event.listens_for(engine, "handle_error")
    def decide(context):
        context.is_disconnect = False

    dropsafe.harden(engine)
    with engine.connect() as conn:
        _break_checked_out(shared_server, conn)
        with pytest.raises(sa.exc.OperationalError) as caught:
            conn.execute(sa.text("SELECT 1"))
        assert not caught.value.connection_invalidated
        conn.invalidate()  # the user's own cleanup, so the pool is left usable


# -- the user's pool: its class, its pool_pre_ping, detached and soft-invalidated entries ----


def test_users_pool_pre_ping_is_not_doubled(shared_server, disposing):
    # SQLAlchemy has just pinged the connection at checkout: dropsafe does not ping it again.
    events = []
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url("psycopg2"),
            policy=dropsafe.Policy(
                pool=dropsafe.PoolPolicy(ping_after_idle=0), hooks=(events.append,)
            ),
            pool_pre_ping=True,
        )
    )
    for _ in range(5):
        held_backend_pids(engine, 1)
    assert [type(e).__name__ for e in events] == []


@pytest.mark.parametrize(
    "pool_class", [sa.pool.NullPool, sa.pool.StaticPool, sa.pool.SingletonThreadPool]
)
def test_users_pool_class_is_served(shared_server, pool_class, disposing):
    events = []
    engine = disposing(_noting_engine(shared_server, events, poolclass=pool_class))
    pids = {held_backend_pids(engine, 1)[0] for _ in range(5)}
    assert len(pids) == (5 if pool_class is sa.pool.NullPool else 1)
    assert isinstance(engine.pool, pool_class)
    assert not events


def test_detached_and_soft_invalidated_entries(shared_server, disposing):
    events = []
    engine = disposing(_noting_engine(shared_server, events, pool_size=1, max_overflow=0))
    with engine.connect() as conn:
        conn.connection.detach()  # the DBAPI connection is the user's now
        detached_pid = conn.execute(BACKEND_PID).scalar()
    with engine.connect() as conn:
        soft_pid = conn.execute(BACKEND_PID).scalar()
        conn.connection.invalidate(soft=True)  # replaced at its next checkout, not now
        assert conn.execute(BACKEND_PID).scalar() == soft_pid
    with engine.connect() as conn:
        fresh_pid = conn.execute(BACKEND_PID).scalar()
    assert len({detached_pid, soft_pid, fresh_pid}) == 3
    assert not events, "detaching or soft-invalidating is not a dead connection"


# -- the pool: no strong references, no stale snapshot -------------------------------------


@pytest.mark.parametrize("hardened", [False, True])
def test_dispose_without_close_leaves_no_server_connections(shared_server, hardened, disposing):
    # dispose(close=False) drops the old pool; its connections close when collected. Before,
    # the guard's idle set held every idle DBAPI connection: 5 sessions stayed on the server.
    name = f"dispose-{'hardened' if hardened else 'plain'}"
    engine = disposing(
        sa.create_engine(
            shared_server.url("psycopg2", application_name=name), pool_size=5, max_overflow=0
        )
    )
    if hardened:
        dropsafe.harden(engine)
    held_backend_pids(engine, 5)
    assert _sessions(shared_server, name) == 5
    engine.dispose(close=False)

    def closed():
        gc.collect()
        return _sessions(shared_server, name) == 0

    _wait_until(closed, what=f"the {name} sessions to end")


def test_a_connection_the_pool_closes_mid_snapshot_is_no_server_event(shared_server, disposing):
    # One idle connection's backend is terminated; at checkout dropsafe looks at the other idle
    # ones to tell a lone death from a restart. Meanwhile the pool disposes (closes) the other
    # one. Before, the snapshot read it as dead and recycled the whole pool as for a restart.
    events = []
    engine = disposing(_noting_engine(shared_server, events, pool_size=2, max_overflow=0))
    first, second = engine.connect(), engine.connect()
    victim_pid = first.execute(BACKEND_PID).scalar()
    victim = first.connection.dbapi_connection
    other = second.connection.dbapi_connection
    first.close()  # checked in first: the next checkout takes it (the pool is FIFO)
    second.close()
    shared_server.execute(f"SELECT pg_terminate_backend({victim_pid}, 5000)")
    _wait_until(
        lambda: select.select([victim.fileno()], [], [], 0)[0],
        what="the terminated backend's goodbye to reach the client",
    )
    guard = guard_of(engine)
    assert guard is not None
    real_probe = guard.driver.probe

    def probe_closing_the_other(connection):
        # The interleaving a busy pool produces: the look at the other connection comes
        # right after the pool decided to close it.
        if connection is other and not other.closed:
            engine.pool.dispose()
        return real_probe(connection)

    guard.driver.probe = probe_closing_the_other
    with engine.connect() as conn:
        assert conn.execute(BACKEND_PID).scalar() != victim_pid
    assert other.closed, "the scenario did not happen: the pool never closed the other one"
    replaced = [e for e in events if isinstance(e, DeadConnectionReplaced)]
    assert [e.pool_wide for e in replaced] == [False]


# -- creator= connections: the driver's own, a known wrapper, an opaque one ----------------


class CloudSqlLikeConnector:
    """Hands out pg8000 connections from ``connect()``, as the Cloud SQL Python Connector does."""

    def __init__(self, host, port, **kwargs):
        self._where = {"host": host, "port": port, **kwargs}

    def connect(self):
        import pg8000  # optional driver

        return pg8000.connect(**self._where)


class AwsWrapperLike:
    """Like the AWS Advanced Python Wrapper's connection: the driver's behind target_connection,
    other attributes forwarded, the DBAPI methods its own."""

    def __init__(self, target):
        self._target = target

    @property
    def target_connection(self):
        return self._target

    def __getattr__(self, name):
        if name == "_target" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._target, name)

    def cursor(self, *args, **kwargs):
        return self._target.cursor(*args, **kwargs)

    def commit(self):
        self._target.commit()

    def rollback(self):
        self._target.rollback()

    def close(self):
        self._target.close()


class PublicSurfaceOnly:
    """A user's wrapper that shows only the DBAPI's public names: no socket, nothing private."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def _creator_engine(kind, server, through, events):
    """An engine whose connections come from creator=, through ``through`` (the server or a
    proxy: its host and port), its events in ``events``."""
    host, port = through.host, through.port
    policy = _policy_for(kind, events)
    if kind == "aws-wrapper-like":
        import psycopg

        def make():
            return AwsWrapperLike(
                psycopg.connect(
                    host=host,
                    port=port,
                    user="postgres",
                    password=server.password,
                    dbname="postgres",
                    sslmode="require",
                )
            )

        url = "postgresql+psycopg://"
        # SQLAlchemy's hstore lookup insists on psycopg's own Connection type.
        options = {"use_native_hstore": False}
    else:
        ssl = server.connect_args("pg8000").get("ssl_context")
        connector = CloudSqlLikeConnector(
            host,
            port,
            user="postgres",
            password=server.password,
            database="postgres",
            ssl_context=ssl,
        )
        make = (
            connector.connect
            if kind == "cloudsql-connector"
            else (lambda: PublicSurfaceOnly(connector.connect()))
        )
        url = "postgresql+pg8000://"
        options = {}
    return dropsafe.create_engine(
        url, creator=make, policy=policy, pool_size=4, max_overflow=0, **options
    )


CREATOR_KINDS = ["cloudsql-connector", "aws-wrapper-like", "public-surface-only"]


def _policy_for(kind, events):
    # dropsafe cannot look into the opaque wrapper: it falls back to a ping after idle, here
    # on every checkout so that a fault is caught before the app sees it.
    idle = 0 if kind == "public-surface-only" else 30
    return dropsafe.Policy(pool=dropsafe.PoolPolicy(ping_after_idle=idle), hooks=(events.append,))


@pytest.mark.parametrize("kind", CREATOR_KINDS)
def test_creator_connections_are_not_judged_dead(shared_server, kind, disposing):
    events = []
    engine = disposing(_creator_engine(kind, shared_server, shared_server, events))
    pids = set(held_backend_pids(engine, 4))
    for _ in range(20):
        pids.add(held_backend_pids(engine, 1)[0])
    assert len(pids) == 4, "a healthy connection was replaced"
    assert not [e for e in events if isinstance(e, DeadConnectionReplaced)]
    pings = [e for e in events if type(e).__name__ == "PingSucceeded"]
    # The opaque one is pinged at every checkout (idle 0); the others never (idle 30 s).
    assert bool(pings) == (kind == "public-surface-only")


@pytest.mark.fault
@pytest.mark.parametrize("fault", ["terminate", "fin"])
@pytest.mark.parametrize("kind", CREATOR_KINDS)
def test_creator_connections_survive_faults(postgres_server, chaos_proxy, kind, fault, disposing):
    events = []
    engine = disposing(_creator_engine(kind, postgres_server, chaos_proxy, events))
    before = set(held_backend_pids(engine, 4))
    if fault == "terminate":
        assert postgres_server.terminate_backends() == 4
    else:
        assert chaos_proxy.cut(fault) == 4
    after = set(held_backend_pids(engine, 4))  # no error reaches the app
    assert not before & after
    assert [e for e in events if isinstance(e, DeadConnectionReplaced)]
