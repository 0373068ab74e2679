"""The ROLLBACK that ends a request is not awaited on asyncio engines either (issue 28).

asyncpg's ROLLBACK is started at checkin and its reply read at the next checkout (or before
SQLAlchemy's pre-ping, a close, a dispose); psycopg's async face sends it through libpq and
reads its reply at the next checkout, or before any other use of the connection. Each fault
is real, through a `ChaosProxy`: the link blackholed while the ROLLBACK is unanswered (on the
unchanged code the session's close then waited: the first test fails there after 2 s), the
link cut or the backend terminated before the reply, a reply later than ``ping_timeout``, a
reply 300 ms late, a dispose with the reply still due, the request's task cancelled while its
connection is checked in, the event loop closed before the reply was read. Whatever goes
wrong after checkin, the next request never sees it, and no task, coroutine or socket is left
behind (asyncio's exception handler hears nothing; warnings are errors here).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import dropsafe
from dropsafe._engine.guard import guard_of
from dropsafe.events import DeadConnectionReplaced, RollbackConnectionLost

pytestmark = [pytest.mark.fault, pytest.mark.shares_server]

BACKEND_PID = sa.text("SELECT pg_backend_pid()")
#: Longer than a close that does not wait for the server can take on a loaded machine.
PROMPT_S = 2.0
DEADLINE_S = 20.0
#: The settle's bound (``ping_timeout``): a reply later than this closes the connection.
SETTLE_S = 3.0
DRIVERS = ["asyncpg", "psycopg"]


@pytest.fixture
async def loop_errors():
    """What asyncio's exception handler hears on the test's loop ("Task was destroyed...")."""
    heard: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: heard.append(context))
    yield heard
    gc.collect()
    assert heard == []


def _engine(url, events=None, *, pre_ping=False, defer=True):
    policy = dropsafe.Policy(
        hooks=() if events is None else (events.append,),
        pool=dropsafe.PoolPolicy(ping_timeout=SETTLE_S, defer_checkin_rollback=defer),
    )
    return dropsafe.create_async_engine(
        url, policy=policy, pool_size=1, max_overflow=0, pool_pre_ping=pre_ping
    )


async def _idle_at_checkout(engine):
    """Check a connection out; return its backend pid, after asserting it is in no transaction.

    Both asyncpg's state and SQLAlchemy's adapter's (its ``_transaction``) say so.
    """
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        adapter = raw.dbapi_connection
        assert not _in_transaction(adapter)
        pid = (await connection.execute(BACKEND_PID)).scalar()
        # The statement's own transaction, begun as usual on the settled connection.
        assert _in_transaction(adapter)
        return pid


def _in_transaction(adapter):
    """What SQLAlchemy's adapter and the driver say: asyncpg's both, psycopg's libpq's."""
    native = adapter.driver_connection
    if hasattr(native, "pgconn"):
        import psycopg

        idle = native.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert "wait" not in vars(native)  # no reply left to read
        return not idle
    assert (adapter._transaction is not None) == native.is_in_transaction()
    return native.is_in_transaction()


async def _session_pid(engine):
    session = AsyncSession(engine)
    return session, (await session.execute(BACKEND_PID)).scalar()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_request_ends_without_waiting_for_its_rollback(
    shared_server, shared_server_proxy, disposing_async, loop_errors, driver
) -> None:
    """Blackholed after the last reply: the close returns at once (it waited before)."""
    engine = disposing_async(_engine(shared_server_proxy.route(shared_server.url(driver))))
    session, pid = await _session_pid(engine)
    shared_server_proxy.blackhole()
    started = time.monotonic()
    closing = asyncio.ensure_future(session.close())
    done, _ = await asyncio.wait({closing}, timeout=PROMPT_S)
    waited = time.monotonic() - started
    shared_server_proxy.heal()
    await asyncio.wait_for(closing, DEADLINE_S)
    assert done, f"the close waited {waited:.1f} s for the ROLLBACK's reply"
    # The reply, read at the next checkout: the same connection, in no transaction.
    assert await _idle_at_checkout(engine) == pid
    assert guard_of(engine.sync_engine).quiet_rollback.defers


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("pre_ping", [False, True], ids=["", "pre_ping"])
@pytest.mark.parametrize("fault", ["cut", "terminate", "late"])
async def test_a_rollback_that_fails_after_checkin_is_never_seen(  # noqa: PLR0917 - fixtures
    shared_server, shared_server_proxy, disposing_async, loop_errors, fault, pre_ping, driver
) -> None:
    """The ROLLBACK unanswered, then the link cut, the backend terminated, or the reply later
    than ``ping_timeout``: the next request gets a new connection and no error.

    With ``pool_pre_ping`` SQLAlchemy's ping comes before the checkout check: the reply is
    read before it (asyncpg refuses a second operation while one is in progress).
    """
    events: list[object] = []
    engine = disposing_async(
        _engine(shared_server_proxy.route(shared_server.url(driver)), events, pre_ping=pre_ping)
    )
    session, pid = await _session_pid(engine)
    shared_server_proxy.blackhole()
    closing = asyncio.ensure_future(session.close())
    await asyncio.wait({closing}, timeout=PROMPT_S)
    if fault == "cut":
        assert shared_server_proxy.cut("rst") >= 1
    elif fault == "terminate":
        assert shared_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)") == [("t",)]
    if fault != "late":
        shared_server_proxy.heal()
    started = time.monotonic()
    # The next request: no error, a new backend, in no transaction.
    checkout = asyncio.ensure_future(_idle_at_checkout(engine))
    if fault == "late":
        # Given up after ping_timeout (the blackhole still on), then a new connection.
        while not any(isinstance(event, RollbackConnectionLost) for event in events):
            assert time.monotonic() - started < DEADLINE_S, "the settle never gave up"
            await asyncio.sleep(0.02)  # polling the events, with a deadline
        assert time.monotonic() - started >= SETTLE_S * 0.9
        shared_server_proxy.heal()
    assert await asyncio.wait_for(checkout, DEADLINE_S) != pid
    await asyncio.wait_for(closing, DEADLINE_S)
    assert any(
        isinstance(event, (DeadConnectionReplaced, RollbackConnectionLost)) for event in events
    )


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_late_reply_is_read_before_the_next_checkout_sends(
    shared_server, shared_server_proxy, disposing_async, loop_errors, driver
) -> None:
    """300 ms each way: the next request checks out at once, and waits for the reply first."""
    engine = disposing_async(_engine(shared_server_proxy.route(shared_server.url(driver))))
    async with AsyncSession(engine) as session:
        pid = (await session.execute(BACKEND_PID)).scalar()
    shared_server_proxy.latency(300)
    for _ in range(2):
        async with AsyncSession(engine) as session:
            assert (await session.execute(BACKEND_PID)).scalar() == pid
            await session.execute(sa.text("SELECT 1"))
    assert await _idle_at_checkout(engine) == pid


@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_same_connection_goes_on_after_its_own_rollback(
    shared_server, disposing_async, loop_errors, driver
) -> None:
    """conn.rollback() then more statements, commit, close, again: state right throughout."""
    table = f"deferred_rb_{driver}"
    shared_server.execute(f"CREATE TABLE IF NOT EXISTS {table} (v int)")
    engine = disposing_async(_engine(shared_server.url(driver)))
    for value in (1, 2):
        async with engine.connect() as connection:
            await connection.execute(sa.text(f"INSERT INTO {table} VALUES ({value})"))
            await connection.rollback()
            count = sa.text(f"SELECT count(*) FROM {table}")
            assert (await connection.execute(count)).scalar() == value - 1
            await connection.execute(sa.text(f"INSERT INTO {table} VALUES ({value})"))
            await connection.commit()
        async with AsyncSession(engine) as session:  # ends with a ROLLBACK not awaited
            await session.execute(sa.text(f"INSERT INTO {table} VALUES (-1)"))
    assert shared_server.execute(f"SELECT v FROM {table} ORDER BY v") == [("1",), ("2",)]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("link", ["healthy", "blackholed"])
async def test_a_dispose_with_a_rollback_due_neither_hangs_nor_leaks(
    shared_server, shared_server_proxy, loop_errors, driver, link
) -> None:
    """The engine disposed right after the request: the reply is read (or given up on after
    ``ping_timeout``) and the connection closed; no task or coroutine is left pending."""
    engine = _engine(shared_server_proxy.route(shared_server.url(driver)))
    session, pid = await _session_pid(engine)
    if link == "blackholed":
        shared_server_proxy.blackhole()
    await asyncio.wait_for(session.close(), PROMPT_S if link == "blackholed" else DEADLINE_S)
    await asyncio.wait_for(engine.dispose(), DEADLINE_S)
    shared_server_proxy.heal()
    # The backend is gone once the server sees the close (or the cut, once healed).
    deadline = time.monotonic() + DEADLINE_S
    query = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
    while shared_server.execute(query) != [("0",)]:
        assert time.monotonic() < deadline, "the disposed connection was never closed"
        await asyncio.sleep(0.05)  # polling the server's view, with a deadline


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_request_cancelled_as_its_connection_is_checked_in(
    shared_server, shared_server_proxy, disposing_async, loop_errors, driver
) -> None:
    """The request's task cancelled as its ROLLBACK starts (an app's timeout, a client gone):
    the ROLLBACK still ends, the connection is kept, the next request gets it idle."""
    engine = disposing_async(_engine(shared_server_proxy.route(shared_server.url(driver))))
    shared_server_proxy.latency(50)

    @sa.event.listens_for(engine.sync_engine, "rollback")
    def cancel_me(_connection):
        asyncio.current_task().cancel()

    async def request():
        async with AsyncSession(engine) as session:
            return (await session.execute(BACKEND_PID)).scalar()

    task = asyncio.ensure_future(request())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    sa.event.remove(engine.sync_engine, "rollback", cancel_me)
    shared_server_proxy.heal()
    pid = await _idle_at_checkout(engine)
    assert await _idle_at_checkout(engine) == pid


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_loop_closed_before_the_reply_was_read(
    shared_server, shared_server_proxy, driver
) -> None:
    """A ROLLBACK still due when its loop closes (``asyncio.run`` ended without a dispose):
    the engine, used on a new loop, replaces that connection unseen; nothing is left pending."""
    engine = _engine(shared_server_proxy.route(shared_server.url(driver)))
    heard: list[dict[str, object]] = []

    async def first():
        asyncio.get_running_loop().set_exception_handler(lambda _l, c: heard.append(c))
        session, pid = await _session_pid(engine)
        shared_server_proxy.blackhole()
        await asyncio.wait_for(session.close(), PROMPT_S)
        return pid

    async def second():
        asyncio.get_running_loop().set_exception_handler(lambda _l, c: heard.append(c))
        try:
            return await asyncio.wait_for(_idle_at_checkout(engine), DEADLINE_S)
        finally:
            await engine.dispose()

    pid = asyncio.run(first())
    shared_server_proxy.heal()
    if driver == "asyncpg":  # its connection belongs to the loop that closed: replaced
        assert asyncio.run(second()) != pid
    else:  # psycopg's belongs to no loop: the next loop reads the reply, and it goes on
        assert asyncio.run(second()) == pid
    gc.collect()
    assert heard == []


@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_opt_out_waits_as_before(
    shared_server, shared_server_proxy, disposing_async, driver
) -> None:
    """``PoolPolicy(defer_checkin_rollback=False)`` or the URL's flag: the close waits."""
    url = shared_server_proxy.route(shared_server.url(driver))
    engine = disposing_async(_engine(url, defer=False))
    flagged = disposing_async(
        create_async_engine(f"{url}&plugin=dropsafe&dropsafe_defer_checkin_rollback=false")
    )
    assert not guard_of(engine.sync_engine).quiet_rollback.defers
    assert not guard_of(flagged.sync_engine).quiet_rollback.defers
    session, _ = await _session_pid(engine)
    shared_server_proxy.latency(300)
    started = time.monotonic()
    await asyncio.wait_for(session.close(), DEADLINE_S)
    assert time.monotonic() - started >= 0.5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_child_forked_with_a_reply_due_never_reads_it(
    shared_server, shared_server_proxy, driver
) -> None:
    """A process forked with a ROLLBACK's reply due (its loop ended, as ``asyncio.run`` before
    a pre-fork server forks): the child's first request gets a connection of its own, and the
    parent goes on (replacing its connection if the child's close ended it)."""
    engine = _engine(shared_server_proxy.route(shared_server.url(driver)))

    async def first():
        session, pid = await _session_pid(engine)
        shared_server_proxy.blackhole()  # the reply stays due when the loop ends
        await asyncio.wait_for(session.close(), PROMPT_S)
        return pid

    async def request():
        async with AsyncSession(engine) as session:
            return (await session.execute(sa.text("SELECT 41 + 1"))).scalar()

    asyncio.run(first())
    shared_server_proxy.heal()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports by its exit status
        try:
            ok = asyncio.run(asyncio.wait_for(request(), DEADLINE_S)) == 42
        except BaseException:  # any failure is the child's answer
            ok = False
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + DEADLINE_S
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0:
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)  # polling the child's end, with a deadline
    assert os.waitstatus_to_exitcode(done[1]) == 0

    async def second():
        try:
            return await asyncio.wait_for(request(), DEADLINE_S)
        finally:
            await engine.dispose()

    assert asyncio.run(second()) == 42
    gc.collect()
