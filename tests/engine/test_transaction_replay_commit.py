"""A COMMIT about to go on a connection already known gone: the transaction is replayed and
committed on a fresh connection; a COMMIT cut while in flight is never replayed.

The backend is terminated between the transaction's last statement and its COMMIT, and the
client sees the server's goodbye and close before the COMMIT is sent: the transaction cannot
have committed. Before, the request failed at COMMIT (about ten per run of
benchmarks/continuity.py with the transaction replay on). The goodbye may also be there before
the close (the backend sends its FATAL, then aborts, then closes): a relay that holds the close
shows that window for as long as the test wants. The negative: a COMMIT the server is
working on (a deferred constraint trigger that sleeps) when its backend is terminated may have
committed as far as the client knows; it must raise, never be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import threading
import time

import pytest
import sqlalchemy as sa
from replay_faults import prepared_server
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.util import await_

import dropsafe
from dropsafe._drivers import driver_names, socket_fd_of
from dropsafe._engine import fresh_connection
from dropsafe._engine.guard import guard_of
from dropsafe.events import TransactionReplayed
from dropsafe.testing import ChaosProxy, PostgresServer, ServerError
from dropsafe.testing._runtime import wait_until
from relays import CloseHoldingRelay

pytestmark = pytest.mark.fault

SYNC = driver_names(sync=True, replays=True)
ASYNC = driver_names(asyncio=True, replays=True)
INSERT = sa.text("INSERT INTO unsent_commit (v) VALUES (:v)")
SCHEMA = """
CREATE TABLE unsent_commit (v int NOT NULL);
CREATE FUNCTION unsent_commit_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NEW.v < 0 THEN PERFORM pg_sleep(3); END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER unsent_commit_slow AFTER INSERT ON unsent_commit
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION unsent_commit_slow();
CREATE TABLE pinned_note (id serial PRIMARY KEY, token text NOT NULL);
"""
COMMIT_RUNNING = "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' AND state = 'active'"


@pytest.fixture(scope="module")
def server():
    with prepared_server(SCHEMA) as server:
        yield server


@pytest.fixture(autouse=True)
def _empty(server):
    server.execute("TRUNCATE unsent_commit, pinned_note")


def _count(server, v: int) -> int:
    return int(server.execute(f"SELECT count(*) FROM unsent_commit WHERE v = {v}")[0][0])


def _engine(create, server, driver, events):
    """A hardened engine (sync or async, by ``create``), replay on, a pool of one."""
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
    )
    return create(server.url(driver), policy=policy, pool_size=1, max_overflow=0)


def _outcomes(events):
    return [(e.outcome, e.reason) for e in events if isinstance(e, TransactionReplayed)]


def _goodbye_arrived(sync_engine, dbapi_connection) -> None:
    """Wait (bounded) until the terminated backend's goodbye is readable on the client."""
    driver = guard_of(sync_engine).driver
    fd = socket_fd_of(driver, driver.native(dbapi_connection))
    assert fd is not None
    readable, _, _ = select.select([fd], [], [], 10)
    assert readable, "the server's goodbye never reached the client"


def _terminate_all(server) -> None:
    assert server.terminate_backends() >= 1  # waits until they have exited


@pytest.mark.parametrize("driver", SYNC)
def test_a_backend_gone_before_commit_lands_the_write_once(server, driver, disposing):
    events = []
    engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT count(*) FROM unsent_commit")).scalar()
        conn.execute(INSERT, {"v": 1})
        _terminate_all(server)
        _goodbye_arrived(engine, conn.connection.dbapi_connection)
    assert _count(server, 1) == 1
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", ASYNC)
async def test_async_a_backend_gone_before_commit_lands_the_write_once(
    server, driver, disposing_async
):
    events = []
    engine = disposing_async(_engine(dropsafe.create_async_engine, server, driver, events))
    async with engine.begin() as conn:
        await conn.execute(sa.text("SELECT count(*) FROM unsent_commit"))
        await conn.execute(INSERT, {"v": 2})
        _terminate_all(server)
        raw = await conn.get_raw_connection()
        _goodbye_arrived(engine.sync_engine, raw.dbapi_connection)
    assert _count(server, 2) == 1
    assert _outcomes(events) == [("replayed", None)]


@contextlib.contextmanager
def _close_holding_relay(server):
    """A CloseHoldingRelay to ``server`` on a loop of its own (the sync drivers block theirs)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    relay = CloseHoldingRelay(server.host, server.port)
    try:
        asyncio.run_coroutine_threadsafe(relay.start(), loop).result(10)
        yield relay
    finally:
        asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _goodbye_without_close(server, relay, sync_engine, dbapi_connection) -> None:
    """Terminate the backend; return once its goodbye is readable and its close held back."""
    _terminate_all(server)
    wait_until(lambda: relay.closed_by_server >= 1, timeout=10, what="the server's close")
    _goodbye_arrived(sync_engine, dbapi_connection)


def _relayed_url(server, relay, driver: str) -> str:
    """The server's URL (TLS kept: the relay passes bytes) through ``relay``."""
    url = make_url(server.url(driver)).set(port=relay.port)
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("driver", SYNC)
def test_a_goodbye_read_before_commit_but_no_close_lands_the_write_once(server, driver, disposing):
    events = []
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
    )
    with _close_holding_relay(server) as relay:
        url = _relayed_url(server, relay, driver)
        engine = disposing(dropsafe.create_engine(url, policy=policy, pool_size=1))
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT count(*) FROM unsent_commit")).scalar()
            conn.execute(INSERT, {"v": 3})
            _goodbye_without_close(server, relay, engine, conn.connection.dbapi_connection)
        relay.release()
        engine.dispose()
    assert _count(server, 3) == 1
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", ASYNC)
async def test_async_a_goodbye_read_before_commit_but_no_close_lands_the_write_once(
    server, driver, disposing_async
):
    events = []
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
    )
    with _close_holding_relay(server) as relay:
        url = _relayed_url(server, relay, driver)
        engine = disposing_async(dropsafe.create_async_engine(url, policy=policy, pool_size=1))
        async with engine.begin() as conn:
            await conn.execute(sa.text("SELECT count(*) FROM unsent_commit"))
            await conn.execute(INSERT, {"v": 4})
            raw = await conn.get_raw_connection()
            _goodbye_without_close(server, relay, engine.sync_engine, raw.dbapi_connection)
        relay.release()
        await engine.dispose()
    assert _count(server, 4) == 1
    assert _outcomes(events) == [("replayed", None)]


async def test_asyncpg_a_goodbye_read_as_the_commit_goes_lands_the_write_once(
    server, disposing_async, monkeypatch
):
    """The look before COMMIT saw nothing; the goodbye arrived, and asyncpg read it, just after.

    asyncpg then refuses the COMMIT before sending it (``cannot switch to state 15; another
    operation (2) is in progress``): provably not committed (4 of the 5 COMMIT failures of
    benchmarks/continuity.py's FastAPI app under killed backends, with the replay on).
    """
    events = []
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
    )
    with _close_holding_relay(server) as relay:
        url = _relayed_url(server, relay, "asyncpg")
        engine = disposing_async(dropsafe.create_async_engine(url, policy=policy, pool_size=1))
        driver = guard_of(engine.sync_engine).driver
        look = driver.probe

        def look_then_goodbye(dbapi_connection):
            health = look(dbapi_connection)
            _goodbye_without_close(server, relay, engine.sync_engine, dbapi_connection)
            for _ in range(2):  # the event loop runs before the COMMIT: asyncpg reads it
                await_(asyncio.sleep(0))
            return health

        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT count(*) FROM unsent_commit"))
            await conn.execute(INSERT, {"v": 5})
            monkeypatch.setattr(driver, "probe", look_then_goodbye)
            try:
                await conn.commit()
            finally:
                monkeypatch.undo()
        relay.release()
        await engine.dispose()
    assert _count(server, 5) == 1
    assert _outcomes(events) == [("replayed", None)]


def _backend_pid(dbapi_connection) -> int:
    """The backend pid of a driver's connection, as each driver tells it (no round trip)."""
    native = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    for name in ("get_backend_pid", "get_server_pid"):  # psycopg2, asyncpg
        if hasattr(native, name):
            return int(getattr(native, name)())
    return int(native.info.backend_pid)  # psycopg 3


@pytest.mark.parametrize("driver", SYNC)
def test_a_replay_whose_fresh_connection_is_lost_too_goes_on_on_another(server, driver, disposing):
    """A restart while a replay runs loses its fresh connection too: no COMMIT was sent there.

    Before, the request failed (benchmarks/continuity.py, Flask under restarts: "the replay
    failed: InterfaceError: connection already closed", 3 of 9 failed requests).
    """
    events = []
    engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
    connects = []
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM unsent_commit")).scalar()
        conn.execute(INSERT, {"v": 6})

        @sa.event.listens_for(engine, "connect")
        def lose_the_first_fresh_one(dbapi_connection, _record):
            connects.append(_backend_pid(dbapi_connection))
            if len(connects) == 1:
                server.execute(f"SELECT pg_terminate_backend({connects[0]}, 5000)")
                _goodbye_arrived(engine, dbapi_connection)

        _terminate_all(server)
        _goodbye_arrived(engine, conn.connection.dbapi_connection)
        assert conn.execute(sa.text("SELECT count(*) FROM unsent_commit")).scalar() == 1
        conn.commit()
    assert len(connects) == 2
    assert _count(server, 6) == 1
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", SYNC)
def test_a_fresh_connection_lost_once_the_replay_began_is_not_replaced(
    server, driver, disposing, monkeypatch
):
    """A replayed statement that crashes its backend would crash the server again and again.

    So a fresh connection lost after the replay began sending the transaction on it is not
    replaced: here the link is cut right after the replay's first question, and the original
    error is raised, with one fresh connection made.
    """
    events = []
    asked = fresh_connection.ask_before_replay
    with ChaosProxy(server.host, server.port) as proxy:

        def ask_then_cut(fresh, lost_state):
            reason = asked(fresh, lost_state)
            proxy.cut("rst")
            return reason

        monkeypatch.setattr(fresh_connection, "ask_before_replay", ask_then_cut)
        policy = dropsafe.Policy(
            pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
        )
        url = proxy.route(server.url(driver))
        engine = disposing(dropsafe.create_engine(url, policy=policy, pool_size=1))
        connects = []
        sa.event.listen(engine, "connect", lambda dbapi_connection, _: connects.append(1))
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT count(*) FROM unsent_commit")).scalar()
            conn.execute(INSERT, {"v": 8})
            proxy.cut("rst")
            with pytest.raises(sa.exc.DBAPIError) as raised:
                conn.execute(sa.text("SELECT count(*) FROM unsent_commit"))
            assert raised.value.connection_invalidated
    assert len(connects) == 2  # the first connection, and one fresh one
    assert _count(server, 8) == 0
    assert [outcome for outcome, _ in _outcomes(events)] == ["failed"]


@pytest.mark.parametrize("driver", SYNC)
def test_a_new_connection_lost_while_its_start_is_read_is_not_left_in_autocommit(
    server, driver, disposing
):
    """The session's start is read at connect in autocommit, then autocommit is put back.

    On a connection lost meanwhile, psycopg2 refuses to put it back: the connection stayed in
    autocommit, and the next unit of work on it was refused as one run under AUTOCOMMIT
    (a ConfigurationError, never retried: tests/examples/test_flask_sqlalchemy.py under
    faults with the URL flag's transaction replay). It is closed instead: the pool replaces it.
    """
    events = []
    engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
    lost = []

    def lose_the_first(dbapi_connection, _record):
        if not lost:
            lost.append(_backend_pid(dbapi_connection))
            server.execute(f"SELECT pg_terminate_backend({lost[0]}, 5000)")
            _goodbye_arrived(engine, dbapi_connection)

    with engine.connect():  # SQLAlchemy's first connect initializes its dialect: done
        pass
    engine.pool.dispose()
    sa.event.listen(engine.pool, "connect", lose_the_first, insert=True)  # before dropsafe's
    dropsafe.run_transaction(engine, lambda conn: conn.execute(INSERT, {"v": 9}))
    assert lost
    assert _count(server, 9) == 1


def _terminate_when_commit_runs(server, done: threading.Event) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not done.is_set():
            pids = server.execute(COMMIT_RUNNING)
            if pids:
                server.execute(f"SELECT pg_terminate_backend({int(pids[0][0])})")
                return
            time.sleep(0.01)  # polling a condition, with a deadline

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("driver", SYNC)
def test_a_commit_cut_in_flight_is_never_replayed(server, driver, disposing):
    events = []
    engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
    done = threading.Event()
    conn = engine.connect()
    try:
        conn.execute(sa.text("SELECT count(*) FROM unsent_commit")).scalar()
        conn.execute(INSERT, {"v": -1})  # its COMMIT sleeps in the deferred trigger
        killer = _terminate_when_commit_runs(server, done)
        with pytest.raises(sa.exc.DBAPIError):
            conn.commit()
    finally:
        done.set()
        conn.close()
    killer.join(10)
    assert _count(server, -1) == 0
    assert [outcome for outcome, _ in _outcomes(events)] == []


@pytest.mark.parametrize("driver", ASYNC)
async def test_async_a_commit_cut_in_flight_is_never_replayed(server, driver, disposing_async):
    events = []
    engine = disposing_async(_engine(dropsafe.create_async_engine, server, driver, events))
    done = threading.Event()
    conn = await engine.connect()
    try:
        await conn.execute(sa.text("SELECT count(*) FROM unsent_commit"))
        await conn.execute(INSERT, {"v": -2})  # its COMMIT sleeps in the deferred trigger
        killer = _terminate_when_commit_runs(server, done)
        with pytest.raises(sa.exc.DBAPIError):
            await conn.commit()
    finally:
        done.set()
        await conn.close()
    killer.join(10)
    assert _count(server, -2) == 0
    assert [outcome for outcome, _ in _outcomes(events)] == []


# -- the ORM's generated id: the INSERT is replayed with the id the app already holds ---------


class _Base(DeclarativeBase):
    pass


class PinnedNote(_Base):
    """A row whose id the database generates (serial) and the ORM reads back (RETURNING)."""

    __tablename__ = "pinned_note"

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str]


def _stored(server, token: str) -> list[tuple[str, ...]]:
    return server.execute(f"SELECT id FROM pinned_note WHERE token = '{token}'")


@pytest.mark.parametrize("later", ["commit", "statement"])
@pytest.mark.parametrize("driver", SYNC)
def test_an_orm_insert_is_replayed_with_the_id_the_app_holds(server, driver, later, disposing):
    events = []
    engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
    with Session(engine) as session:
        note = PinnedNote(token=f"sync-{driver}-{later}")
        session.add(note)
        session.flush()  # INSERT ... RETURNING id: the app holds the id now
        held = note.id
        _terminate_all(server)
        _goodbye_arrived(engine, session.connection().connection.dbapi_connection)
        if later == "statement":  # lost at a later statement: replayed there
            assert session.scalar(sa.select(sa.func.count()).select_from(PinnedNote)) == 1
        session.commit()
    assert _stored(server, f"sync-{driver}-{later}") == [(str(held),)]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", ASYNC)
async def test_async_an_orm_insert_is_replayed_with_the_id_the_app_holds(
    server, driver, disposing_async
):
    events = []
    engine = disposing_async(_engine(dropsafe.create_async_engine, server, driver, events))
    async with AsyncSession(engine) as session:
        note = PinnedNote(token=f"async-{driver}")
        session.add(note)
        await session.flush()
        held = note.id
        _terminate_all(server)
        raw = await (await session.connection()).get_raw_connection()
        _goodbye_arrived(engine.sync_engine, raw.dbapi_connection)
        await session.commit()
    assert _stored(server, f"async-{driver}") == [(str(held),)]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", SYNC)
def test_an_id_taken_meanwhile_fails_the_replay_with_the_original_error(server, driver, disposing):
    events = []
    engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
    with Session(engine) as session:
        note = PinnedNote(token="mine")  # noqa: S106 # a row tag, not a secret
        session.add(note)
        session.flush()
        held = note.id
        _terminate_all(server)
        _goodbye_arrived(engine, session.connection().connection.dbapi_connection)
        server.execute(f"INSERT INTO pinned_note (id, token) VALUES ({held}, 'theirs')")
        with pytest.raises(sa.exc.DBAPIError) as raised:
            session.commit()
    assert raised.value.connection_invalidated
    assert _stored(server, "mine") == []
    assert _stored(server, "theirs") == [(str(held),)]
    [(outcome, reason)] = _outcomes(events)
    assert outcome == "failed"
    assert "duplicate key" in reason or "unique" in reason


@pytest.mark.own_server
@pytest.mark.parametrize("driver", SYNC)
def test_a_key_a_crash_gave_back_to_its_sequence_is_not_kept(driver, disposing):
    """A crash restart loses the sequence's advance still in WAL buffers: it draws the key again.

    Kept on replay, that key's row would make the next INSERT fail on the primary key (seen in
    benchmarks/continuity.py's FastAPI app under immediate restarts: a later request failed with
    "duplicate key value violates unique constraint notes_pkey"). The replay is refused instead.
    """
    with PostgresServer(settings={"wal_writer_delay": "10s"}) as server:  # WAL kept in memory
        server.execute("CREATE TABLE pinned_note (id serial PRIMARY KEY, token text NOT NULL)")
        server.execute("CHECKPOINT")  # the sequence's next advance is a WAL record of its own
        events = []
        engine = disposing(_engine(dropsafe.create_engine, server, driver, events))
        with Session(engine) as session:
            session.add(PinnedNote(token="kept"))  # noqa: S106 # a row tag
            session.flush()
            dbapi_connection = session.connection().connection.dbapi_connection
            assert server.signal_backend(_backend_pid(dbapi_connection), signal.SIGKILL)
            _goodbye_arrived(engine, dbapi_connection)
            wait_until(_answers(server), timeout=30, what="crash recovery")
            with pytest.raises(sa.exc.DBAPIError):
                session.commit()
        assert server.execute("SELECT count(*) FROM pinned_note") == [("0",)]
        server.execute("INSERT INTO pinned_note (token) VALUES ('next')")  # no duplicate key
        [(outcome, reason)] = _outcomes(events)
    assert outcome == "failed"
    assert "sequence" in reason


def _answers(server):
    def ready() -> bool:
        try:
            server.execute("SELECT 1")
        except ServerError:
            return False
        return True

    return ready
