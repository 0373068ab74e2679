"""What the replay tests share: a prepared server, losing a connection for real, a hardened
engine, the events. (The ChaosProxy in front of the server is tests/engine/conftest.py's.)"""

from __future__ import annotations

import contextlib

import sqlalchemy as sa
from sqlalchemy import event
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
    "failed_replays",
    "lose",
    "lose_at_next_checkout",
    "prepared_server",
    "replay_async_engine",
    "replay_engine",
    "replayed",
]
