"""PoolPolicy.max_lifetime on a real server: connections retired, spread out, never in use.

Eight connections are made together, as at start. One is held in a transaction throughout; the
others serve a stream of requests until every one of them has been retired (counted by the
pool's connect and close events, with a deadline, no sleeps). Then: none retired before
0.9 x max_lifetime, their retirements spread (not one burst), the held one untouched until it
came back, and each retired connection replaced by a new backend.
"""

from __future__ import annotations

import itertools
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import event

import dropsafe

POOL = 8
LIFETIME = 6.0
DEADLINE = 30.0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_connections_retire_spread_out_and_never_while_in_use(shared_server, disposing):
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url("psycopg2"),
            policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(max_lifetime=LIFETIME), hooks=()),
            pool_size=POOL,
            max_overflow=0,
        )
    )
    # Keyed on the DBAPI connections themselves (kept alive here: an id() would be reused).
    born: dict[object, float] = {}  # when it connected
    retired: dict[object, float] = {}  # when the pool closed or invalidated it

    @event.listens_for(engine, "connect")
    def connected(dbapi_connection, entry):
        born[dbapi_connection] = time.monotonic()

    @event.listens_for(engine, "close")
    def closed(dbapi_connection, entry):
        retired.setdefault(dbapi_connection, time.monotonic())

    @event.listens_for(engine, "invalidate")
    def invalidated(dbapi_connection, entry, exception):
        retired.setdefault(dbapi_connection, time.monotonic())

    def pid(conn):
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()

    # Eight connections made together, as at start.
    first = [engine.connect() for _ in range(POOL)]
    first_pids = {pid(conn) for conn in first}
    first_ids = {conn.connection.dbapi_connection for conn in first}
    held = first.pop()  # in use throughout, inside the transaction pid() began
    held_id = held.connection.dbapi_connection
    held_pid = pid(held)
    for conn in first:
        conn.close()

    # Requests on the other seven until all seven were retired, and the held one is past
    # any limit it could have drawn.
    others = first_ids - {held_id}
    seen_pids: set[int] = set()
    stop = time.monotonic() + DEADLINE
    while not (others <= retired.keys() and time.monotonic() - born[held_id] >= LIFETIME):
        assert time.monotonic() < stop, f"only {len(others & retired.keys())} of 7 retired"
        with engine.connect() as conn:
            seen_pids.add(pid(conn))

    # Never while in use: the held connection still works, on the same backend.
    assert held_id not in retired
    assert pid(held) == held_pid
    held.rollback()
    held.close()
    assert held_id in retired  # retired as it came back

    ages = sorted(retired[key] - born[key] for key in others)
    moments = sorted(retired[key] for key in others)
    gaps = [later - earlier for earlier, later in itertools.pairwise(moments)]
    spread = moments[-1] - moments[0]
    print(
        f"ages at retirement {ages[0]:.3f}..{ages[-1]:.3f} s (limit {LIFETIME} s), "
        f"spread {spread * 1000:.0f} ms, smallest gap {min(gaps) * 1000:.1f} ms"
    )
    # Never early: each connection's limit is at least 0.9 x max_lifetime.
    assert ages[0] >= 0.9 * LIFETIME
    # Each drew its own limit in the jitter window [5.4, 6.0] s. Equal limits would retire
    # none before 6 s; with jitter all seven drew above 5.95 s with odds of 3 in 100 million.
    assert ages[0] < LIFETIME - 0.05
    # And their ages spread over the window (0.45 s on average for 7 draws; below 0.06 s
    # with odds of 1 in 150 000), so connections made together do not retire together.
    assert ages[-1] - ages[0] >= 0.06
    # Each retired connection was replaced by a new backend.
    with engine.connect() as conn:
        assert pid(conn) not in first_pids
    assert len(born) >= 2 * POOL - 1
    assert seen_pids - first_pids, "no request ran on a replacement connection"


def test_without_max_lifetime_connections_stay(shared_server, disposing):
    engine = disposing(
        dropsafe.create_engine(
            shared_server.url("psycopg2"),
            policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(max_lifetime=None), hooks=()),
            pool_size=1,
            max_overflow=0,
        )
    )
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    for _ in range(20):
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() == before


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_async_connections_retire_cleanly(shared_server, caplog):
    # asyncpg closes inside SQLAlchemy's greenlet: a close at checkin must not go wrong there.
    engine = dropsafe.create_async_engine(
        shared_server.url("asyncpg"),
        policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(max_lifetime=1), hooks=()),
        pool_size=2,
        max_overflow=0,
    )
    connects = []
    event.listen(engine.sync_engine, "connect", lambda dbapi, entry: connects.append(dbapi))
    pids = set()
    try:
        stop = time.monotonic() + DEADLINE
        while len(connects) < 4:
            assert time.monotonic() < stop, f"{len(connects)} connects"
            async with engine.connect() as conn:
                pids.add(await conn.scalar(sa.text("SELECT pg_backend_pid()")))
    finally:
        await engine.dispose()
    assert len(pids) >= 2
    assert not [r for r in caplog.records if "Exception closing connection" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
