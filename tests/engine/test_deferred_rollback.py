"""The ROLLBACK that ends a request is not awaited, and a failed one is never seen (issue 28).

psycopg 3 (sync) sends it and returns; its reply is read before the connection is used again
(the next checkout, or the same Connection's next statement). Each fault is real, through a
`ChaosProxy`: the link blackholed while the ROLLBACK is unanswered (on the unchanged code the
Session's close then waited: the first test fails there after 2 s), the link cut or the backend
terminated before the reply, a reply 300 ms late, a fork after checkin. psycopg2's (its own
rollback in a worker thread): test_deferred_rollback_psycopg2.py; asyncpg's: _async.py.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import dropsafe
from dropsafe._engine.guard import guard_of
from dropsafe.events import DeadConnectionReplaced, RollbackConnectionLost
from dropsafe.testing import ChaosProxy

pytestmark = [pytest.mark.fault, pytest.mark.shares_server]

BACKEND_PID = sa.text("SELECT pg_backend_pid()")
#: Longer than a close that does not wait for the server can take on a loaded machine.
PROMPT_S = 2.0
DEADLINE_S = 20.0


@pytest.fixture
def proxy(shared_server):
    with ChaosProxy(shared_server.host, shared_server.port) as proxy:
        yield proxy


def _engine(disposing, url, events=None, *, pre_ping=False):
    policy = dropsafe.Policy(
        hooks=() if events is None else (events.append,),
        pool=dropsafe.PoolPolicy(ping_timeout=5),
    )
    return disposing(
        dropsafe.create_engine(
            url, policy=policy, pool_size=1, max_overflow=0, pool_pre_ping=pre_ping
        )
    )


def _idle_at_checkout(engine):
    """Check a connection out; return its backend pid, after asserting it is in no transaction."""
    import psycopg

    with engine.connect() as connection:
        native = connection.connection.dbapi_connection
        assert native.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        return connection.execute(BACKEND_PID).scalar()


def _close_in_background(session):
    closing = threading.Thread(target=session.close, daemon=True)
    closing.start()
    closing.join(PROMPT_S)
    return closing


def test_a_request_ends_without_waiting_for_its_rollback(shared_server, proxy, disposing) -> None:
    """Blackholed after the last reply: the close returns at once (it waited before)."""
    engine = _engine(disposing, proxy.route(shared_server.url("psycopg")))
    session = Session(engine)
    pid = session.execute(BACKEND_PID).scalar()
    proxy.blackhole()
    started = time.monotonic()
    closing = _close_in_background(session)
    waited = time.monotonic() - started
    proxy.heal()
    closing.join(DEADLINE_S)
    assert not closing.is_alive()
    assert waited < PROMPT_S, f"the close waited {waited:.1f} s for the ROLLBACK's reply"
    # The reply, read at the next checkout: the same connection, in no transaction.
    assert _idle_at_checkout(engine) == pid


@pytest.mark.parametrize("pre_ping", [False, True], ids=["", "pre_ping"])
@pytest.mark.parametrize("fault", ["cut", "terminate"])
def test_a_rollback_that_fails_after_checkin_is_never_seen(
    shared_server, proxy, disposing, fault, pre_ping
) -> None:
    """The ROLLBACK unanswered, then the link cut or the backend terminated: replaced, unseen.

    With ``pool_pre_ping`` SQLAlchemy's ping comes first, and reads the reply through psycopg.
    """
    events: list[object] = []
    url = proxy.route(shared_server.url("psycopg"))
    engine = _engine(disposing, url, events, pre_ping=pre_ping)
    session = Session(engine)
    pid = session.execute(BACKEND_PID).scalar()
    proxy.blackhole()
    closing = _close_in_background(session)
    if fault == "cut":
        assert proxy.cut("rst") >= 1
    else:
        assert shared_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)") == [("t",)]
    proxy.heal()
    closing.join(DEADLINE_S)
    assert not closing.is_alive()
    # The next request: no error, a new backend, in no transaction.
    assert _idle_at_checkout(engine) != pid
    # Said as a replaced connection (a ROLLBACK that was awaited says it lost its connection).
    assert any(
        isinstance(event, (DeadConnectionReplaced, RollbackConnectionLost)) for event in events
    )


def test_a_late_reply_is_read_before_the_next_checkout_sends(
    shared_server, proxy, disposing
) -> None:
    """300 ms each way: the next request checks out at once, and waits for the reply first."""
    engine = _engine(disposing, proxy.route(shared_server.url("psycopg")))
    with Session(engine) as session:
        pid = session.execute(BACKEND_PID).scalar()
    proxy.latency(300)
    with Session(engine) as session:
        assert session.execute(BACKEND_PID).scalar() == pid
        session.execute(sa.text("SELECT 1"))
    # Checked out while that ROLLBACK was in flight: read first, nothing sent before it.
    assert _idle_at_checkout(engine) == pid


def test_the_same_connection_goes_on_after_its_own_rollback(shared_server, disposing) -> None:
    """conn.rollback() then another statement: the reply is read before it is sent."""
    shared_server.execute("CREATE TABLE IF NOT EXISTS deferred_rb (v int)")
    engine = _engine(disposing, shared_server.url("psycopg"))
    with engine.connect() as connection:
        connection.execute(sa.text("INSERT INTO deferred_rb VALUES (1)"))
        connection.rollback()
        assert connection.execute(sa.text("SELECT count(*) FROM deferred_rb")).scalar() == 0
        connection.execute(sa.text("INSERT INTO deferred_rb VALUES (2)"))
        connection.commit()
    assert shared_server.execute("SELECT v FROM deferred_rb") == [("2",)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_after_checkin_never_reads_its_parents_reply(
    shared_server, disposing
) -> None:
    """A child that uses the inherited pool gets a new connection; the parent goes on."""
    engine = _engine(disposing, shared_server.url("psycopg"))
    with Session(engine) as session:
        session.execute(BACKEND_PID)  # ends with a ROLLBACK sent, its reply unread
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports by its exit status
        try:
            with Session(engine) as session:
                ok = session.execute(sa.text("SELECT 41 + 1")).scalar() == 42
        except BaseException:  # any failure is the child's answer
            ok = False
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + DEADLINE_S
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0:
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)  # polling the child's end, with a deadline
    assert os.waitstatus_to_exitcode(done[1]) == 0
    # The child's replacement said goodbye on the shared socket: the parent replaces it too.
    with Session(engine) as session:
        assert session.execute(sa.text("SELECT 41 + 1")).scalar() == 42


def test_the_opt_out_waits_as_before(shared_server) -> None:
    """``PoolPolicy(defer_checkin_rollback=False)`` or the URL's flag; a bad value is refused."""
    url = shared_server.url("psycopg")
    engine = dropsafe.create_engine(
        url, policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(defer_checkin_rollback=False))
    )
    flagged = sa.create_engine(f"{url}&plugin=dropsafe&dropsafe_defer_checkin_rollback=false")
    default = dropsafe.create_engine(url)
    try:
        assert not guard_of(engine).quiet_rollback.defers
        assert not guard_of(flagged).quiet_rollback.defers
        assert guard_of(default).quiet_rollback.defers
    finally:
        for each in (engine, flagged, default):
            each.dispose()
    with pytest.raises(dropsafe.ConfigurationError, match="defer_checkin_rollback"):
        sa.create_engine(f"{url}&plugin=dropsafe&dropsafe_defer_checkin_rollback=maybe")
    with pytest.raises(dropsafe.ConfigurationError, match="defer_checkin_rollback"):
        dropsafe.PoolPolicy(defer_checkin_rollback="no")  # type: ignore[arg-type]


def test_psycopg2_defers_through_its_own_rollback(shared_server) -> None:
    """psycopg2 keeps its transaction state in C: its own rollback() runs in a worker thread
    (tests/engine/test_deferred_rollback_psycopg2.py); the opt-out holds there too."""
    engine = dropsafe.create_engine(shared_server.url("psycopg2"))
    opted_out = dropsafe.create_engine(
        shared_server.url("psycopg2"),
        policy=dropsafe.Policy(pool=dropsafe.PoolPolicy(defer_checkin_rollback=False)),
    )
    try:
        assert guard_of(engine).quiet_rollback.defers
        assert not guard_of(opted_out).quiet_rollback.defers
    finally:
        engine.dispose()
        opted_out.dispose()
