"""A transaction that loses its connection before its COMMIT was sent is replayed, or refused.

The faults are real (the backend terminated, the socket cut by the proxy, a crash restart), put
between two statements of one transaction: a request that reads, then writes. Before the
transaction replay each of the positive cases raised the driver's error to the app. Then the
refusals: a result that would differ (another transaction changed a row the app read), and the
statements a replay must not repeat: each must keep raising the original error with nothing
written.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import time
from decimal import Decimal

import pytest
import sqlalchemy as sa
from replay_faults import lose, prepared_server
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dropsafe
from dropsafe._drivers import driver_names
from dropsafe._engine.fresh_connection import REPLAY_LOCK_TIMEOUT_MS
from dropsafe._engine.guard import guard_of
from dropsafe._engine.transcript import rows_digest
from dropsafe._engine.url_plugin import policy_from_query
from dropsafe.events import TransactionReplayed

pytestmark = pytest.mark.fault

SYNC = driver_names(sync=True, replays=True)
ASYNC = driver_names(asyncio=True, replays=True)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "txreplay_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(unique=True)
    note: Mapped[str] = mapped_column(default="", server_default="")


ITEMS = Item.__table__


@pytest.fixture(scope="module")
def server():
    with prepared_server(Base.metadata) as server:
        server.execute("CREATE SEQUENCE txreplay_seq")
        yield server


@pytest.fixture(autouse=True)
def _one_row(server):
    server.execute("TRUNCATE txreplay_items")
    server.execute("INSERT INTO txreplay_items (id, n, note) VALUES (1000, 1, 'first')")


def _lose(fault, server, proxy):
    """``replay_faults.lose``, and ``sigkill``: a backend killed as the OOM killer would.

    The postmaster then ends every backend and runs crash recovery (a crash restart).
    """
    if fault != "sigkill":
        lose(fault, server, proxy)
        return
    pids = server.execute(
        "SELECT pid FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    assert pids
    assert server.signal_backend(int(pids[0][0]), signal.SIGKILL)


def _rows(server):
    return sorted(int(n) for (n,) in server.execute("SELECT n FROM txreplay_items"))


def _policy(events, **pool):
    return dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True, **pool), hooks=(events.append,)
    )


def _engine(server, proxy, driver, events, *, policy=None, **pool):
    return dropsafe.create_engine(
        proxy.route(server.url(driver)),
        policy=policy or _policy(events, **pool),
        pool_size=1,
        max_overflow=0,
    )


def _outcomes(events):
    return [(e.outcome, e.reason) for e in events if isinstance(e, TransactionReplayed)]


# -- replayed ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["terminate", "cut", "crash", "sigkill"])
@pytest.mark.parametrize("driver", SYNC)
def test_orm_read_then_write_survives_a_lost_connection(server, proxy, driver, fault, disposing):
    events = []
    engine = disposing(_engine(server, proxy, driver, events))
    with Session(engine) as session:
        seen = [(i.n, i.note) for i in session.scalars(sa.select(Item).order_by(Item.n))]
        _lose(fault, server, proxy)
        session.add(Item(n=2))
        session.commit()  # the flush's INSERT finds the connection lost: replayed, then sent
        again = [(i.n, i.note) for i in session.scalars(sa.select(Item).order_by(Item.n))]
    assert seen == [(1, "first")]
    assert again == [(1, "first"), (2, "")]
    assert _rows(server) == [1, 2]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("fault", ["terminate", "cut"])
@pytest.mark.parametrize("driver", SYNC)
def test_core_write_read_write_lands_once(server, proxy, driver, fault, disposing):
    events = []
    engine = disposing(_engine(server, proxy, driver, events))
    with engine.begin() as conn:
        conn.execute(ITEMS.update().where(ITEMS.c.n == 1).values(note="updated"))
        new_id = conn.execute(ITEMS.insert().values(id=7, n=2).returning(ITEMS.c.id)).scalar()
        count = conn.execute(sa.text("SELECT count(*) FROM txreplay_items")).scalar()
        lose(fault, server, proxy)
        conn.execute(ITEMS.insert().values(n=3))
    assert (new_id, count) == (7, 2)
    assert _rows(server) == [1, 2, 3]
    assert server.execute("SELECT note FROM txreplay_items WHERE n = 1") == [("updated",)]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", SYNC)
def test_a_result_partly_read_goes_on_after_the_replay(server, proxy, driver, disposing):
    server.execute("INSERT INTO txreplay_items (n) SELECT g FROM generate_series(2, 5) g")
    events = []
    engine = disposing(_engine(server, proxy, driver, events))
    with engine.begin() as conn:
        result = conn.execute(sa.select(ITEMS.c.n).order_by(ITEMS.c.n))
        first = [result.fetchone()[0], result.fetchone()[0]]
        lose("terminate", server, proxy)
        conn.execute(ITEMS.insert().values(n=6))
        rest = [n for (n,) in result]
    assert first + rest == [1, 2, 3, 4, 5]
    assert _rows(server) == [1, 2, 3, 4, 5, 6]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("fault", ["terminate", "cut", "crash"])
@pytest.mark.parametrize("driver", ASYNC)
async def test_async_read_then_write_survives_a_lost_connection(
    server, proxy, driver, fault, disposing_async
):
    events = []
    engine = disposing_async(
        dropsafe.create_async_engine(
            proxy.route(server.url(driver)), policy=_policy(events), pool_size=1, max_overflow=0
        )
    )
    async with AsyncSession(engine) as session:
        seen = [i.n for i in (await session.scalars(sa.select(Item).order_by(Item.n))).all()]
        lose(fault, server, proxy)
        session.add(Item(n=2))
        await session.commit()
    async with engine.begin() as conn:  # Core: write, read, lose, write
        await conn.execute(ITEMS.update().where(ITEMS.c.n == 1).values(note="async"))
        assert (await conn.execute(sa.select(ITEMS.c.note).where(ITEMS.c.n == 1))).scalar() == (
            "async"
        )
        lose(fault, server, proxy)
        await conn.execute(ITEMS.insert().values(id=3, n=3))
    assert seen == [1]
    assert _rows(server) == [1, 2, 3]
    assert server.execute("SELECT note FROM txreplay_items WHERE n = 1") == [("async",)]
    assert _outcomes(events) == [("replayed", None)] * 2


# -- refused: the original error, nothing written ------------------------------------------


def _lose_then_write(engine, before, fault, *, n=99):
    """In one transaction: ``before(conn)``, then the ``fault``, then an INSERT of ``n``."""
    with engine.begin() as conn:
        before(conn)
        fault()
        conn.execute(ITEMS.insert().values(n=n))


def _fails_and_writes_nothing(server, proxy, driver, events, before, *, fault="terminate"):
    """Run ``before(conn)`` in a transaction, lose it, write: the write must fail, not land."""
    engine = _engine(server, proxy, driver, events)
    try:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            _lose_then_write(engine, before, lambda: lose(fault, server, proxy))
    finally:
        engine.dispose()
    assert raised.value.connection_invalidated
    assert 99 not in _rows(server)
    return _outcomes(events)


@pytest.mark.parametrize("driver", SYNC)
def test_a_row_changed_since_the_app_read_it_refuses_the_replay(server, proxy, driver):
    events = []

    def read_then_changed_elsewhere(conn):
        assert conn.execute(sa.select(ITEMS.c.note)).scalar() == "first"
        server.execute("UPDATE txreplay_items SET note = 'changed' WHERE n = 1")

    outcomes = _fails_and_writes_nothing(server, proxy, driver, events, read_then_changed_elsewhere)
    assert outcomes == [("failed", "statement 1's rows differ from those the app received")]


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("SELECT now()", "statement 1's rows differ"),
        ("SELECT clock_timestamp()", "statement 1's rows differ"),
        ("SELECT random()", "statement 1's rows differ"),
        ("SELECT gen_random_uuid()", "statement 1's rows differ"),
    ],
)
def test_values_that_differ_on_a_replay_are_caught_by_the_digest(server, proxy, what, expected):
    events = []
    outcomes = _fails_and_writes_nothing(
        server, proxy, "psycopg2", events, lambda conn: conn.execute(sa.text(what)).all()
    )
    assert len(outcomes) == 1
    assert outcomes[0][0] == "failed"
    assert outcomes[0][1].startswith(expected)


REFUSALS = {
    "session SET": ("SET statement_timeout = '1min'", "may change the session"),
    "advisory session lock": ("SELECT pg_advisory_lock(42)", "may change the session"),
    "sequence": ("SELECT nextval('txreplay_seq')", "sequence function"),
    "LISTEN": ("LISTEN txreplay", "may change the session"),
    "DECLARE": ("DECLARE c CURSOR FOR SELECT 1", "may change the session"),
    "two statements": ("SELECT 1; SELECT 2", "several statements"),
}


@pytest.mark.parametrize("kind", REFUSALS)
@pytest.mark.parametrize("driver", SYNC)
def test_statements_a_replay_cannot_repeat_refuse_it(server, proxy, driver, kind):
    statement, reason = REFUSALS[kind]
    events = []
    outcomes = _fails_and_writes_nothing(
        server, proxy, driver, events, lambda conn: conn.exec_driver_sql(statement)
    )
    assert len(outcomes) == 1
    assert outcomes[0][0] == "refused"
    assert reason in outcomes[0][1]


@pytest.mark.parametrize("driver", SYNC)
def test_rollback_to_a_savepoint_refuses_the_replay(server, proxy, driver):
    events = []

    def savepoint_rolled_back(conn):
        savepoint = conn.begin_nested()
        conn.execute(ITEMS.insert().values(n=50))
        savepoint.rollback()

    outcomes = _fails_and_writes_nothing(server, proxy, driver, events, savepoint_rolled_back)
    assert len(outcomes) == 1
    assert outcomes[0][0] == "refused"
    assert outcomes[0][1].startswith("ROLLBACK TO a savepoint")


@pytest.mark.parametrize("driver", SYNC)
def test_a_released_savepoint_is_replayed(server, proxy, driver, disposing):
    events = []
    engine = disposing(_engine(server, proxy, driver, events))
    with engine.begin() as conn:
        with conn.begin_nested():
            conn.execute(ITEMS.insert().values(id=50, n=50))  # a serial id would differ
        lose("terminate", server, proxy)
        conn.execute(ITEMS.insert().values(n=51))
    assert _rows(server) == [1, 50, 51]
    assert _outcomes(events) == [("replayed", None)]


def test_notify_is_replayed_it_is_delivered_at_commit_only(server, proxy, disposing):
    events = []
    engine = disposing(_engine(server, proxy, "psycopg2", events))
    with engine.begin() as conn:
        conn.exec_driver_sql("NOTIFY txreplay, 'once'")
        lose("terminate", server, proxy)
        conn.execute(ITEMS.insert().values(n=2))
    assert _rows(server) == [1, 2]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize(
    ("options", "fetch", "reason"),
    [
        ({"dropsafe_replay": False}, "all", "dropsafe_replay=False"),
        ({"stream_results": True}, "fetchone", "server-side cursor"),
    ],
)
def test_the_opt_out_and_a_server_side_cursor_refuse(server, proxy, options, fetch, reason):
    events = []

    def read(conn):
        getattr(conn.execute(sa.select(ITEMS.c.n).execution_options(**options)), fetch)()

    outcomes = _fails_and_writes_nothing(server, proxy, "psycopg2", events, read)
    assert [outcome for outcome, _ in outcomes] == ["refused"]
    assert reason in outcomes[0][1]


def test_past_the_cap_the_replay_is_off(server, proxy):
    events = []
    engine = _engine(server, proxy, "psycopg2", events, replay_max_statements=2)
    with pytest.raises(sa.exc.DBAPIError):
        _lose_then_write(
            engine,
            lambda conn: [conn.execute(sa.text("SELECT 1")).all() for _ in range(3)],
            lambda: lose("terminate", server, proxy),
        )
    engine.dispose()
    assert _outcomes(events) == [("refused", "more than 2 statements (the cap)")]


def test_work_sent_around_sqlalchemy_refuses(server, proxy, disposing):
    events = []

    def raw_write(conn):
        conn.execute(sa.text("SELECT 1")).all()
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute("INSERT INTO txreplay_items (n) VALUES (77)")

    outcomes = _fails_and_writes_nothing(server, proxy, "psycopg2", events, raw_write)
    assert 77 not in _rows(server)
    assert outcomes[0][0] == "refused"
    assert "around SQLAlchemy" in outcomes[0][1]


@pytest.mark.parametrize("driver", SYNC)
def test_off_by_default(server, proxy, driver):
    events = []
    policy = dropsafe.Policy(hooks=(events.append,))
    engine = _engine(server, proxy, driver, events, policy=policy)
    with pytest.raises(sa.exc.DBAPIError):
        _lose_then_write(
            engine,
            lambda conn: conn.execute(sa.select(ITEMS.c.n)).all(),
            lambda: lose("terminate", server, proxy),
        )
    engine.dispose()
    assert _rows(server) == [1]
    assert _outcomes(events) == []


def test_an_error_the_server_answered_is_not_replayed(server, proxy, disposing):
    events = []
    engine = disposing(_engine(server, proxy, "psycopg2", events))
    with pytest.raises(sa.exc.IntegrityError):
        _lose_then_write(
            engine, lambda conn: conn.execute(sa.select(ITEMS.c.n)).all(), lambda: None, n=1
        )
    assert _outcomes(events) == []


# -- the record, and its settings ----------------------------------------------------------


def test_the_digest_tells_types_apart():
    digests = {rows_digest([(value,)]) for value in (1, 1.0, True, Decimal("1.00"), "1")}
    assert len(digests) == 5
    assert rows_digest([([1, 2], {"a": 1})]) == rows_digest([([1, 2], {"a": 1})])
    assert rows_digest([(1,), (2,)]) != rows_digest([(2,), (1,)])


@pytest.mark.parametrize(
    "bad",
    [
        {"replay_transaction": "yes"},
        {"replay_transaction": 1},
        {"replay_max_statements": 0},
        {"replay_max_rows": -1},
        {"replay_max_bytes": 1.5},
    ],
)
def test_strict_settings(bad):
    with pytest.raises(dropsafe.ConfigurationError):
        dropsafe.PoolPolicy(**bad)


def test_the_url_turns_it_on():
    policy = policy_from_query(
        {"dropsafe_replay_transaction": "true", "dropsafe_replay_max_rows": "10"}
    )
    assert policy.pool.replay_transaction is True
    assert policy.pool.replay_max_rows == 10
    with pytest.raises(dropsafe.ConfigurationError):
        policy_from_query({"dropsafe_replay_transaction": "maybe"})


def test_a_lock_the_old_backend_still_holds_bounds_the_replay(server, proxy, disposing):
    # The old backend of a connection cut where the server did not see it (half-open) keeps
    # the transaction's locks until it notices. Stood in for by another transaction that takes
    # the lock the replayed UPDATE needs: the replay gives up after its lock bound, raises the
    # original error and writes nothing, instead of waiting for as long as the lock is held
    # (its deadline, a client-side one, shuts the fresh connection down).
    events = []
    engine = disposing(_engine(server, proxy, "psycopg2", events))
    locker = disposing(sa.create_engine(server.url("psycopg2"), poolclass=sa.pool.NullPool))

    def update_then_locked_elsewhere(conn):
        conn.execute(ITEMS.update().where(ITEMS.c.n == 1).values(note="mine"))

    with contextlib.ExitStack() as stack:
        started = []

        def lose_then_lock():
            lose("terminate", server, proxy)  # every backend: the locker connects after
            other = stack.enter_context(locker.connect())
            other.execute(sa.text("SELECT 1 FROM txreplay_items WHERE n = 1 FOR UPDATE")).all()
            started.append(time.monotonic())

        with pytest.raises(sa.exc.DBAPIError):
            _lose_then_write(engine, update_then_locked_elsewhere, lose_then_lock)
        waited = time.monotonic() - started[0]
    assert waited < REPLAY_LOCK_TIMEOUT_MS / 1000 + 3
    assert _rows(server) == [1]
    assert server.execute("SELECT note FROM txreplay_items") == [("first",)]
    (outcome,) = _outcomes(events)
    assert outcome[0] == "failed"
    assert f"ran past {REPLAY_LOCK_TIMEOUT_MS} ms" in outcome[1]


@pytest.mark.parametrize("control", ["COMMIT", "END", "/* c */ commit", "ROLLBACK", "BEGIN"])
@pytest.mark.parametrize("driver", SYNC)
def test_transaction_control_sent_as_text_refuses(server, proxy, driver, control):
    # A COMMIT sent as a statement (not through the DBAPI's commit()) ends the transaction on
    # the server: a replay sent after it would run its statements a second time.
    events = []

    def update_then_commit_as_text(conn):
        conn.execute(ITEMS.update().values(note=ITEMS.c.note + "+"))
        conn.exec_driver_sql(control)

    outcomes = _fails_and_writes_nothing(
        server, proxy, "psycopg2", events, update_then_commit_as_text
    )
    assert [outcome for outcome, _ in outcomes] == ["refused"]
    assert server.execute("SELECT note FROM txreplay_items") in ([("first+",)], [("first",)])


@pytest.mark.parametrize("driver", SYNC)
def test_a_later_transaction_on_the_same_connection_is_not_replayed(server, proxy, driver):
    # Only a checkout's first transaction is proven to start with nothing of the app's on the
    # connection; the first transaction's statements must never be sent again for the second.
    events = []
    engine = _engine(server, proxy, driver, events)
    with engine.connect() as conn:
        conn.execute(ITEMS.update().values(note=ITEMS.c.note + "+"))
        conn.commit()
        with pytest.raises(sa.exc.DBAPIError):
            _write_after(conn, lambda: lose("terminate", server, proxy))
    engine.dispose()
    assert server.execute("SELECT note FROM txreplay_items") == [("first+",)]
    assert _rows(server) == [1]
    assert _outcomes(events) == []


def _write_after(conn, fault):
    conn.execute(sa.select(ITEMS.c.n)).all()
    fault()
    conn.execute(ITEMS.insert().values(n=99))


@pytest.mark.parametrize("driver", SYNC)
def test_the_record_goes_with_its_transaction(server, proxy, driver, disposing):
    # Held by the engine for as long as the transaction lives, not longer: before, each record
    # (its statements' contexts, and through them the checkout) stayed for the engine's life.
    events = []
    engine = disposing(_engine(server, proxy, driver, events))
    for _ in range(20):
        with Session(engine) as session:
            session.scalars(sa.select(Item)).all()
            session.commit()
        with engine.begin() as conn:
            conn.execute(sa.select(ITEMS.c.n)).all()
    gc.collect()
    assert len(guard_of(engine).replay._transcripts) == 0


ASYNC_REFUSALS = {
    "row changed": ("changed", "failed", "statement 1's rows differ"),
    "session SET": ("SET statement_timeout = '1min'", "refused", "may change the session"),
    "sequence": ("SELECT nextval('txreplay_seq')", "refused", "a sequence function"),
}


async def _async_lose_then_write(engine, before, server, proxy):
    async with engine.begin() as conn:
        if before == "changed":
            (await conn.execute(sa.select(ITEMS.c.note))).all()
            server.execute("UPDATE txreplay_items SET note = 'changed' WHERE n = 1")
        else:
            await conn.exec_driver_sql(before)
        lose("terminate", server, proxy)
        await conn.execute(ITEMS.insert().values(n=99))


@pytest.mark.parametrize("case", ASYNC_REFUSALS)
@pytest.mark.parametrize("driver", ASYNC)
async def test_async_refusals_raise_the_original_error(
    server, proxy, driver, case, disposing_async
):
    before, outcome, reason = ASYNC_REFUSALS[case]
    events = []
    engine = disposing_async(
        dropsafe.create_async_engine(
            proxy.route(server.url(driver)), policy=_policy(events), pool_size=1, max_overflow=0
        )
    )
    with pytest.raises(sa.exc.DBAPIError):
        await _async_lose_then_write(engine, before, server, proxy)
    assert 99 not in _rows(server)
    ((got, why),) = _outcomes(events)
    assert got == outcome
    assert why.startswith(reason) or reason in why
