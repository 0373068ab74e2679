"""A replay that fails, or is refused once a fresh connection was taken, leaves the pool's fate to
the app's ``handle_error`` listeners, as the lost connection's error would without dropsafe.

Before, the replay invalidated the SQLAlchemy Connection itself before raising the original
error; SQLAlchemy then skips its own invalidation, and with it ``invalidate_pool_on_disconnect``:
a listener asking for the whole pool to be recycled was ignored.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from replay_faults import prepared_server
from sqlalchemy import event

import dropsafe
from dropsafe._drivers import driver_names
from dropsafe.events import FirstStatementReplayed, TransactionReplayed

pytestmark = pytest.mark.fault

SYNC = driver_names(sync=True, replays=True)
POOL = 3
PID = sa.text("SELECT pg_backend_pid()")


@pytest.fixture(scope="module")
def server():
    with prepared_server("CREATE TABLE inval_items (n int PRIMARY KEY, note text)") as server:
        yield server


@pytest.fixture(autouse=True)
def _one_row(server):
    server.execute("TRUNCATE inval_items")
    server.execute("INSERT INTO inval_items VALUES (1, 'first')")


def _terminate(server, pid: int) -> None:
    """End one backend and wait (bounded) until the server no longer lists it."""
    server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")
    deadline = time.monotonic() + 10
    while int(server.execute(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")[0][0]):
        assert time.monotonic() < deadline, f"backend {pid} still there"
        time.sleep(0.01)  # polling a condition, with a deadline


def _idle_pids(engine) -> set[int]:
    held = [engine.connect() for _ in range(POOL)]
    try:
        return {conn.execute(PID).scalar_one() for conn in held}
    finally:
        for conn in held:
            conn.close()


def _engine(server, driver, events, *, user_says):
    engine = dropsafe.create_engine(
        server.url(driver),
        policy=dropsafe.Policy(
            pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
        ),
        pool_size=POOL,
        max_overflow=0,
    )

    @event.listens_for(engine, "handle_error")
    def decide(context):
        if context.is_disconnect and user_says is not None:
            context.invalidate_pool_on_disconnect = user_says

    return engine


def _kept(before: set[int], lost: int, after: set[int]) -> set[int]:
    return (before - {lost}) & after


@pytest.mark.parametrize("user_says", [True, False])
@pytest.mark.parametrize("driver", SYNC)
def test_a_failed_transaction_replay_leaves_the_pool_to_the_apps_listener(
    server, driver, user_says, disposing
):
    events = []
    engine = disposing(_engine(server, driver, events, user_says=user_says))
    before = _idle_pids(engine)
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT note FROM inval_items")).scalar() == "first"
        lost = conn.execute(PID).scalar_one()
        server.execute("UPDATE inval_items SET note = 'changed'")  # the replay will differ
        _terminate(server, lost)
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("INSERT INTO inval_items VALUES (99, 'x')"))
        conn.rollback()
    assert raised.value.connection_invalidated
    outcomes = [e.outcome for e in events if isinstance(e, TransactionReplayed)]
    assert outcomes == ["failed"]
    after = _idle_pids(engine)
    if user_says:
        assert not _kept(before, lost, after), "the app asked for the whole pool to be recycled"
    else:
        # A lone terminated backend: the other idle connections stay, but for the one the
        # failed replay ran on (its transaction must not survive).
        assert len(_kept(before, lost, after)) == POOL - 2
    assert server.execute("SELECT count(*) FROM inval_items WHERE n = 99") == [("0",)]


@pytest.mark.parametrize("driver", SYNC)
def test_a_first_statement_replay_refused_on_its_fresh_connection_honours_the_listener(
    server, driver, disposing
):
    # The first statement may change the session (set_config, not local): it is replayed only
    # on a connection that has run nothing, and every pooled one has. Refused after the fresh
    # connection was taken.
    events = []
    engine = disposing(_engine(server, driver, events, user_says=True))
    before = _idle_pids(engine)
    armed = [True]
    lost = []

    @event.listens_for(engine, "checkout")
    def lose_it(dbapi_connection, entry, proxied):
        if armed[0]:
            armed[0] = False
            # Read without a byte sent: bytes sent since checkout refuse the replay earlier.
            native = getattr(dbapi_connection, "driver_connection", dbapi_connection)
            info = getattr(native, "info", None)
            lost.append(
                info.backend_pid if hasattr(info, "backend_pid") else native.get_backend_pid()
            )
            _terminate(server, lost[0])

    with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            conn.execute(sa.text("SELECT set_config('application_name', 'x', false)"))
        conn.rollback()
    assert raised.value.connection_invalidated
    assert not [e for e in events if isinstance(e, FirstStatementReplayed)]
    after = _idle_pids(engine)
    assert not _kept(before, lost[0], after), "the app asked for the whole pool to be recycled"
