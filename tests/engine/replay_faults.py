"""What the replay tests share: a prepared server, a table of numbers, losing a connection for
real (at a checkout, before a statement, while one runs), a hardened engine, the events. (The
ChaosProxy in front of the server is tests/engine/conftest.py's.)"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

import dropsafe
from dropsafe.events import FirstStatementReplayed
from dropsafe.testing import PostgresServer


@contextlib.contextmanager
def prepared_server(setup):
    """A server for a module, ``setup`` applied through psycopg2: tables to create, or SQL."""
    with PostgresServer() as server:
        engine = sa.create_engine(server.url("psycopg2"))
        if isinstance(setup, str):
            with engine.begin() as conn:
                conn.exec_driver_sql(setup)
        else:
            setup.create_all(engine)
        engine.dispose()
        yield server


def module_server(setup, *, empty):
    """A test module's fixtures: ``server`` (prepared once with ``setup``) and an autouse one that
    runs ``empty`` (SQL) and heals the proxy before each test. Assign both:
    ``server, _empty = module_server(...)``."""

    @pytest.fixture(scope="module", name="server")
    def server_fixture():
        with prepared_server(setup) as server:
            yield server

    @pytest.fixture(autouse=True, name="_empty")
    def empty_fixture(server, proxy):
        proxy.heal()
        server.execute(empty)

    return server_fixture, empty_fixture


def items_model(tablename):
    """A declarative base and its ORM class ``Item`` of a table of unique numbers ``n``."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = tablename
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = mapped_column(unique=True)

    return Base, Item


def numbers(server, table):
    """The numbers ``n`` in ``table``, sorted, read on the server directly."""
    return sorted(int(n) for (n,) in server.execute(f"SELECT n FROM {table}"))


def lose(fault, server, proxy):
    """Lose every connection to ``server``: its backends terminated, cut, or a crash restart."""
    if fault == "terminate":
        assert server.terminate_backends() >= 1
    elif fault == "cut":
        assert proxy.cut("rst") >= 1
    else:
        server.restart("immediate")


def lose_at_next_checkout(engine, fault, server, proxy):
    """Lose the connection right after the next checkout (after dropsafe's check passed it)."""
    armed = [True]

    @event.listens_for(engine, "checkout")
    def lose_now(dbapi_connection, entry, proxied):
        if armed[0]:
            armed[0] = False
            lose(fault, server, proxy)

    return armed


def before_statement(engine, needle, fault):
    """Call ``fault(conn)`` once, right before the first statement holding ``needle`` is sent;
    the returned list holds False once it ran.

    ``before_cursor_execute`` fires after the cursor is made and before the driver is given the
    statement: the statement then meets a dead connection, before any reply.
    """
    armed = [True]

    @event.listens_for(engine, "before_cursor_execute")
    def lose_now(conn, cursor, statement, parameters, context, executemany):  # noqa: PLR0917
        if armed[0] and needle in statement:
            armed[0] = False
            fault(conn)

    return armed


def lose_before(engine, needle, fault, server, proxy):
    """Lose the connection right before the first statement holding ``needle`` is sent."""
    return before_statement(engine, needle, lambda conn: lose(fault, server, proxy))


def poll_until(server, sql, timeout=10.0, **params):
    """Poll ``sql`` (a count) until it is non-zero, within ``timeout``: whether it did. Polled
    on a direct connection (milliseconds; a psql per poll can take longer than what it watches
    on a loaded machine)."""
    watcher = sa.create_engine(server.url("psycopg2"), poolclass=NullPool)
    try:
        with watcher.connect() as conn:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if conn.execute(sa.text(sql), params).scalar():
                    return True
                conn.rollback()
                time.sleep(0.005)  # polling a condition with a deadline
    finally:
        watcher.dispose()
    return False


def wait_until_running(server, needle, timeout=10.0):
    """Wait until a statement holding ``needle`` runs on the server."""
    return poll_until(
        server,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state = 'active' AND query LIKE :like AND pid <> pg_backend_pid()",
        timeout,
        like=f"%{needle}%",
    )


@contextlib.contextmanager
def in_another_thread(work, timeout=10):
    """Run ``work()`` in a thread during the block; joined (within ``timeout``) at its end."""
    worker = threading.Thread(target=work)
    worker.start()
    try:
        yield
    finally:
        worker.join(timeout=timeout)
    assert not worker.is_alive()


@contextlib.contextmanager
def cut_from_another_thread_once(proxy, ready):
    """Cut the proxy's connections from a thread once ``ready()`` (a bounded wait) returned:
    yields a list that holds what it returned by the end of the block."""
    seen = []

    def cut():
        seen.append(ready())
        proxy.cut("rst")

    with in_another_thread(cut):
        yield seen


def replay_engine(server, proxy, driver, events, *, policy=None, **kwargs):
    """A hardened engine through ``proxy``, a pool of one unless told, its events in ``events``."""
    if kwargs.get("poolclass") is not NullPool:
        kwargs.setdefault("pool_size", 1)
        kwargs.setdefault("max_overflow", 0)
    return dropsafe.create_engine(
        proxy.route(server.url(driver)),
        policy=policy or dropsafe.Policy(hooks=(events.append,)),
        **kwargs,
    )


def replay_async_engine(server, proxy, driver, events, **kwargs):
    """``replay_engine``'s async twin: through ``proxy``, a pool of one unless told."""
    kwargs.setdefault("pool_size", 1)
    kwargs.setdefault("max_overflow", 0)
    return dropsafe.create_async_engine(
        proxy.route(server.url(driver)),
        policy=dropsafe.Policy(hooks=(events.append,)),
        **kwargs,
    )


def replayed(events):
    """The replays that succeeded."""
    return [e for e in events if isinstance(e, FirstStatementReplayed) and e.replay_error is None]


def failed_replays(events):
    """The replays that were tried and failed."""
    return [e for e in events if isinstance(e, FirstStatementReplayed) and e.replay_error]


__all__ = [
    "before_statement",
    "cut_from_another_thread_once",
    "failed_replays",
    "in_another_thread",
    "items_model",
    "lose",
    "lose_at_next_checkout",
    "lose_before",
    "module_server",
    "numbers",
    "poll_until",
    "prepared_server",
    "replay_async_engine",
    "replay_engine",
    "replayed",
    "wait_until_running",
]
