"""Attacks on the transaction replay (issue 27 item 2): histories where it may break its promise.

The promise (docs/mid-transaction.md, docs/guarantees.md): a transaction lost before its COMMIT
was sent is replayed only when the replay cannot be told from the original; otherwise the
original error is raised and nothing of the replay is kept. Each test here is one history, on a
real server with a real fault. A test whose history breaks the promise today is marked
``xfail(strict=True)`` with the break in its reason: the fixer flips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
import sqlalchemy as sa
from replay_faults import lose, lose_at_next_checkout, prepared_server
from sqlalchemy import event

import dropsafe
from dropsafe._drivers import driver_names
from dropsafe._engine.fresh_connection import REPLAY_LOCK_TIMEOUT_MS
from dropsafe._engine.guard import guard_of
from dropsafe._redaction import describe_error
from dropsafe.events import TransactionReplayed
from dropsafe.testing import multi_host_url
from dropsafe.testing._runtime import wait_until

pytestmark = pytest.mark.fault

SYNC = driver_names(sync=True, replays=True)
ASYNC = driver_names(asyncio=True, replays=True)

SETUP = """
CREATE TABLE adv_accounts (
    id int PRIMARY KEY, balance numeric(10, 2) NOT NULL, note text NOT NULL DEFAULT '',
    big bigint NOT NULL DEFAULT 5);
CREATE TABLE adv_log (id serial PRIMARY KEY, what text NOT NULL);
CREATE TABLE adv_orders (id int PRIMARY KEY, what text NOT NULL);
CREATE TABLE adv_audit (id serial PRIMARY KEY, what text NOT NULL);
CREATE EXTENSION IF NOT EXISTS dblink;
"""

# An "autonomous" audit trail, as PostgreSQL apps build it: a trigger writes through dblink,
# so that the audit row stays even if the transaction rolls back. The app's statement is a
# plain INSERT; nothing in its text says dblink.
AUDIT_TRIGGER = """
CREATE FUNCTION adv_audit_remote() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM dblink_exec({connstr},
        format('INSERT INTO adv_audit (what) VALUES (%L)', NEW.what));
    RETURN NEW;
END $f$;
CREATE TRIGGER adv_orders_audit AFTER INSERT ON adv_orders
    FOR EACH ROW EXECUTE FUNCTION adv_audit_remote();
"""


@pytest.fixture(scope="module")
def server():
    with prepared_server(SETUP) as server:
        connstr = (
            f"host={server.host} port={server.port} dbname=postgres "
            f"user=postgres password={server.password}"
        )
        server.execute(AUDIT_TRIGGER.format(connstr="'" + connstr.replace("'", "''") + "'"))
        yield server


@pytest.fixture(autouse=True)
def _fresh_tables(server):
    server.execute("TRUNCATE adv_accounts, adv_log, adv_orders, adv_audit RESTART IDENTITY")
    server.execute(
        "INSERT INTO adv_accounts (id, balance, note) VALUES (1, -1.00, 'one'), (2, 5.00, 'two')"
    )


def _policy(events):
    return dropsafe.Policy(
        pool=dropsafe.PoolPolicy(replay_transaction=True), hooks=(events.append,)
    )


def _engine(server, proxy, driver, events):
    return dropsafe.create_engine(
        proxy.route(server.url(driver)), policy=_policy(events), pool_size=1, max_overflow=0
    )


def _async_engine(server, proxy, driver, events):
    return dropsafe.create_async_engine(
        proxy.route(server.url(driver)), policy=_policy(events), pool_size=1, max_overflow=0
    )


def _broke(reason):
    """Mark a test whose history breaks the replay's promise today: the fixer flips it."""
    return pytest.mark.xfail(strict=True, reason=f"broke: {reason}")


def _replaying(disposing, server, proxy, driver):
    """A replaying engine disposed at the test's end, and the list its events go to."""
    events = []
    return disposing(_engine(server, proxy, driver, events)), events


def _replaying_async(disposing_async, server, proxy, driver):
    """``_replaying`` for an async engine."""
    events = []
    return disposing_async(_async_engine(server, proxy, driver, events)), events


def _outcomes(events):
    return [(e.outcome, e.reason) for e in events if isinstance(e, TransactionReplayed)]


def _in_transaction(engine, request):
    """Run ``request(conn)`` in one transaction (its COMMIT at the end)."""
    with engine.begin() as conn:
        request(conn)


async def _in_transaction_async(engine, request):
    """``_in_transaction`` on an async engine: ``await request(conn)``."""
    async with engine.begin() as conn:
        await request(conn)


def _log(server):
    return [what for (what,) in server.execute("SELECT what FROM adv_log ORDER BY id")]


# -- stale reads: a result the app saw that the replayed transaction would not give -----------

# Pairs of values Python's hash() gives alike: -1 hashes as -2, and an int hashes modulo the
# Mersenne prime 2**61 - 1 (a bigint holds values past it).
HASH_ALIKE = {
    "numeric -1.00 then -2.00": ("balance", "-2.00"),
    "bigint 5 then 5 + 2**61 - 1": ("big", str(5 + 2**61 - 1)),
}


@pytest.mark.parametrize("case", HASH_ALIKE)
@pytest.mark.parametrize("driver", SYNC)
def test_a_changed_value_that_hashes_alike_refuses_the_replay(
    server, proxy, driver, case, disposing
):
    column, changed = HASH_ALIKE[case]
    engine, _ = _replaying(disposing, server, proxy, driver)

    def request(conn):
        seen = conn.exec_driver_sql(f"SELECT {column} FROM adv_accounts WHERE id = 1").scalar()
        server.execute(f"UPDATE adv_accounts SET {column} = {changed} WHERE id = 1")  # committed
        lose("terminate", server, proxy)
        conn.execute(
            sa.text("INSERT INTO adv_log (what) VALUES (:what)"),
            {"what": f"charged against {seen}"},
        )

    with pytest.raises(sa.exc.DBAPIError):
        _in_transaction(engine, request)
    assert _log(server) == []


def _phantom(case):
    """The read, and another transaction's change that makes the read's result grow."""
    if case == "empty then a row":
        return (
            "SELECT id FROM adv_accounts WHERE note = 'vip' ORDER BY id",
            "UPDATE adv_accounts SET note = 'vip' WHERE id = 2",
        )
    return (  # "one row then two"
        "SELECT id FROM adv_accounts WHERE balance < 10 ORDER BY id",
        "INSERT INTO adv_accounts (id, balance) VALUES (3, 1.00)",
    )


PHANTOMS = ["empty then a row", "one row then two"]


@pytest.mark.parametrize("case", PHANTOMS)
@pytest.mark.parametrize("driver", ASYNC)
async def test_a_phantom_in_a_read_refuses_the_replay_async(
    server, proxy, driver, case, disposing_async
):
    # Held: the replay fetches only as many rows as the app did, but compares the SELECT's
    # rowcount, which every driver gives (SQLAlchemy's asyncpg cursor reads it from the
    # command tag). A driver that gave -1 for a SELECT would let this phantom through.
    read, change = _phantom(case)
    engine, events = _replaying_async(disposing_async, server, proxy, driver)

    async def request(conn):
        seen = (await conn.exec_driver_sql(read)).all()
        server.execute(change)  # another transaction, committed
        lose("terminate", server, proxy)
        await conn.execute(
            sa.text("INSERT INTO adv_log (what) VALUES (:what)"), {"what": f"saw {seen}"}
        )

    with pytest.raises(sa.exc.DBAPIError):
        await _in_transaction_async(engine, request)
    assert _log(server) == []
    assert [outcome for outcome, _ in _outcomes(events)] == ["failed"]


@pytest.mark.parametrize("case", PHANTOMS)
@pytest.mark.parametrize("driver", SYNC)
def test_a_phantom_in_a_read_refuses_the_replay(server, proxy, driver, case, disposing):
    # Held: psycopg2 and psycopg give a SELECT's rowcount, which the replay compares.
    read, change = _phantom(case)
    engine, events = _replaying(disposing, server, proxy, driver)
    seen = []

    def request(conn):
        seen.extend(conn.exec_driver_sql(read).all())
        server.execute(change)
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES (:what)"), {"what": f"saw {seen}"})

    with pytest.raises(sa.exc.DBAPIError):
        _in_transaction(engine, request)
    assert _log(server) == []
    was, now = len(seen), len(seen) + 1
    assert _outcomes(events) == [("failed", f"statement 1's rowcount was {was}, now {now}")]


# -- the transaction's own settings, and the replay's bound on locks --------------------------


@_broke(
    "the replay puts lock_timeout back to its value before the replay, which "
    "undoes the app's own SET LOCAL lock_timeout: after the replay SHOW lock_timeout gives 0 "
    "(no bound) where the app set 7s",
)
@pytest.mark.parametrize("driver", SYNC)
def test_the_apps_set_local_survives_the_replay(server, proxy, driver, disposing):
    engine, events = _replaying(disposing, server, proxy, driver)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '7s'")
        conn.exec_driver_sql("SELECT id FROM adv_accounts ORDER BY id").all()
        lose("terminate", server, proxy)
        after = conn.exec_driver_sql("SHOW lock_timeout").scalar()
    assert _outcomes(events) == [("replayed", None)]
    assert after == "7s"


@_broke(
    "the app's SET LOCAL lock_timeout = 0 is replayed after the replay's own "
    "2 s bound and replaces it: the replay waited on the lock for as long as it was held "
    "(6 s here, until the server ended the holder), not 2 s",
)
def test_the_replay_lock_bound_holds_under_the_apps_set_local(server, proxy, disposing):
    engine, _ = _replaying(disposing, server, proxy, "psycopg2")
    locker = disposing(sa.create_engine(server.url("psycopg2"), poolclass=sa.pool.NullPool))
    with contextlib.ExitStack() as stack:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = 0")  # e.g. to undo a role's default
            conn.execute(sa.text("UPDATE adv_accounts SET note = 'mine' WHERE id = 1"))
            lose("terminate", server, proxy)
            # Stands in for the old backend of a half-open connection, still holding the lock;
            # the server ends it after 6 s (the test's bound).
            other = stack.enter_context(locker.connect())
            other.exec_driver_sql("SET idle_in_transaction_session_timeout = '6s'")
            other.exec_driver_sql("SELECT 1 FROM adv_accounts WHERE id = 1 FOR UPDATE").all()
            started = time.monotonic()
            with contextlib.suppress(sa.exc.DBAPIError):
                conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('after')"))
            waited = time.monotonic() - started
        with contextlib.suppress(sa.exc.DBAPIError):
            other.close()
    assert waited < REPLAY_LOCK_TIMEOUT_MS / 1000 + 2, f"the replay waited {waited:.1f} s"


# -- effects outside the transaction --------------------------------------------------------


@_broke(
    "an INSERT whose trigger writes through dblink (an autonomous audit row) is "
    "replayed: the audit row is written twice (2 rows, 1 order); nothing in the statement's "
    "text shows the dblink",
)
@pytest.mark.parametrize("driver", SYNC)
def test_a_trigger_that_writes_elsewhere_is_not_run_twice(server, proxy, driver, disposing):
    engine, _ = _replaying(disposing, server, proxy, driver)
    with contextlib.suppress(sa.exc.DBAPIError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO adv_orders (id, what) VALUES (1, 'order 1')"))
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('ordered')"))
    orders = server.execute("SELECT count(*) FROM adv_orders")[0][0]
    audits = server.execute("SELECT count(*) FROM adv_audit")[0][0]
    assert (int(orders), int(audits)) in ((1, 1), (0, 1))


@pytest.mark.parametrize("driver", SYNC)
def test_a_serial_the_app_never_saw_is_replayed_once(server, proxy, driver, disposing):
    # Held: the id from the sequence is another one after the replay (a gap), but the app never
    # received it; the row is written once.
    engine, events = _replaying(disposing, server, proxy, driver)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('first')"))
        lose("terminate", server, proxy)
        conn.execute(sa.text("UPDATE adv_accounts SET note = 'paid' WHERE id = 2"))
    assert _log(server) == ["first"]
    assert server.execute("SELECT note FROM adv_accounts WHERE id = 2") == [("paid",)]
    assert _outcomes(events) == [("replayed", None)]


# -- a second fault, under the replay itself ------------------------------------------------


@pytest.mark.parametrize("driver", SYNC)
def test_a_second_loss_during_the_replay_raises_the_original_error(
    server, proxy, driver, disposing
):
    # Held: the fresh connection is lost too, as the replay starts; the app gets the first
    # error, nothing is written, and no connection is left checked out.
    engine, events = _replaying(disposing, server, proxy, driver)
    armed = [False]

    @event.listens_for(engine, "checkout")
    def lose_again(dbapi_connection, entry, proxied):
        if armed[0]:
            armed[0] = False
            lose("terminate", server, proxy)

    def request(conn):
        conn.execute(sa.text("UPDATE adv_accounts SET note = 'x' WHERE id = 1"))
        lose("terminate", server, proxy)
        armed[0] = True
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('lost')"))

    with pytest.raises(sa.exc.DBAPIError) as raised:
        _in_transaction(engine, request)
    assert raised.value.connection_invalidated
    assert not armed[0]  # the replay did check out a fresh connection
    assert _log(server) == []
    assert server.execute("SELECT note FROM adv_accounts WHERE id = 1") == [("one",)]
    assert [outcome for outcome, _ in _outcomes(events)] == ["failed"]
    assert engine.pool.checkedout() == 0
    with engine.begin() as conn:  # the engine goes on
        assert conn.exec_driver_sql("SELECT count(*) FROM adv_log").scalar() == 0


@pytest.mark.parametrize("driver", ASYNC)
async def test_a_result_partly_read_goes_on_after_the_replay_async(
    server, proxy, driver, disposing_async
):
    engine, events = _replaying_async(disposing_async, server, proxy, driver)
    server.execute(
        "INSERT INTO adv_accounts (id, balance) SELECT g, g FROM generate_series(3, 6) g"
    )
    async with engine.begin() as conn:
        result = await conn.exec_driver_sql("SELECT id FROM adv_accounts ORDER BY id")
        first = [result.fetchone()[0], result.fetchone()[0]]
        lose("terminate", server, proxy)
        await conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('mid-read')"))
        rest = [n for (n,) in result]
    assert first + rest == [1, 2, 3, 4, 5, 6]
    assert _log(server) == ["mid-read"]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", ASYNC)
async def test_a_changed_value_that_hashes_alike_refuses_the_replay_async(
    server, proxy, driver, disposing_async
):
    engine, _ = _replaying_async(disposing_async, server, proxy, driver)

    async def request(conn):
        result = await conn.exec_driver_sql("SELECT balance FROM adv_accounts WHERE id = 1")
        seen = result.scalar()
        server.execute("UPDATE adv_accounts SET balance = -2.00 WHERE id = 1")
        lose("terminate", server, proxy)
        await conn.execute(
            sa.text("INSERT INTO adv_log (what) VALUES (:what)"),
            {"what": f"charged against {seen}"},
        )

    with pytest.raises(sa.exc.DBAPIError):
        await _in_transaction_async(engine, request)
    assert _log(server) == []


@pytest.mark.parametrize("driver", SYNC)
def test_an_executemany_rowcount_that_shrank_refuses_the_replay(server, proxy, driver, disposing):
    # The ORM checks an executemany UPDATE's rowcount (StaleDataError): the replay must not go
    # on where fewer rows match than the app was told.
    engine, _ = _replaying(disposing, server, proxy, driver)

    def request(conn):
        result = conn.execute(
            sa.text("UPDATE adv_accounts SET note = :note WHERE id = :id"),
            [{"id": 1, "note": "a"}, {"id": 2, "note": "b"}],
        )
        told = result.rowcount
        lose("terminate", server, proxy)  # the UPDATE's row locks go with the backend
        server.execute("DELETE FROM adv_accounts WHERE id = 2")  # another transaction
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES (:what)"), {"what": f"{told}"})

    with pytest.raises(sa.exc.DBAPIError):
        _in_transaction(engine, request)
    assert _log(server) == []


@pytest.mark.xfail(
    strict=True,
    reason="not a safety break, a replay that can never run: the replay sends its own "
    "SELECT set_config('lock_timeout', ...) before the transaction's first statement, so a "
    "replayed SET TRANSACTION ISOLATION LEVEL fails ('must be called before any query') and "
    "every such transaction gets the original error",
)
@pytest.mark.parametrize("driver", SYNC)
def test_a_transaction_that_starts_with_set_transaction_is_replayed(
    server, proxy, driver, disposing
):
    engine, events = _replaying(disposing, server, proxy, driver)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("SELECT id FROM adv_accounts ORDER BY id").all()
        lose("terminate", server, proxy)
        level = conn.exec_driver_sql("SHOW transaction_isolation").scalar()
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('rr')"))
    assert level == "repeatable read"
    assert _log(server) == ["rr"]
    assert _outcomes(events) == [("replayed", None)]


# -- bounded memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("driver", SYNC)
def test_a_large_array_parameter_counts_against_the_byte_cap(server, proxy, driver, disposing):
    engine, events = _replaying(disposing, server, proxy, driver)
    ids = list(range(200_000))
    found = []
    with contextlib.suppress(sa.exc.DBAPIError), engine.begin() as conn:
        found.append(
            conn.execute(
                sa.text("SELECT count(*) FROM adv_accounts WHERE id = ANY(:ids)"), {"ids": ids}
            ).scalar()
        )
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('big')"))
    assert found == [2]
    assert "big" not in _log(server)
    ((outcome, reason),) = _outcomes(events)
    assert (outcome, reason) == ("refused", "more than 1000000 bytes of statements (the cap)")


@pytest.mark.parametrize("driver", SYNC)
def test_a_temporary_table_refuses_the_replay(server, proxy, driver, disposing):
    # Held: CREATE TEMP TABLE (even ON COMMIT DROP) is DDL, outside the whitelist.
    engine, events = _replaying(disposing, server, proxy, driver)

    def request(conn):
        conn.exec_driver_sql("CREATE TEMP TABLE adv_scratch (n int) ON COMMIT DROP")
        conn.exec_driver_sql("INSERT INTO adv_scratch VALUES (1)")
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('temp')"))

    with pytest.raises(sa.exc.DBAPIError):
        _in_transaction(engine, request)
    assert _log(server) == []
    assert [outcome for outcome, _ in _outcomes(events)] == ["refused"]


# -- where the replay lands -----------------------------------------------------------------


@pytest.fixture(scope="module")
def standby(server):
    standby = server.make_standby(name="adversary")
    yield standby
    standby.close()


@pytest.mark.parametrize("driver", SYNC)
def test_a_replay_does_not_land_on_a_hot_standby(server, proxy, standby, driver, disposing):
    server.execute("UPDATE adv_accounts SET note = 'replicated' WHERE id = 2")
    wait_until(
        lambda: standby.execute("SELECT note FROM adv_accounts WHERE id = 2") == [("replicated",)],
        timeout=30,
        what="the standby caught up",
    )
    url = multi_host_url([server, standby], driver, target_session_attrs="any")
    url = url.replace(f"{server.host}:{server.port}", f"{proxy.host}:{proxy.port}")
    events = []
    engine = disposing(
        dropsafe.create_engine(url, policy=_policy(events), pool_size=1, max_overflow=0)
    )

    def request(conn):
        conn.exec_driver_sql("SELECT balance FROM adv_accounts WHERE id = 1").all()
        proxy.refuse()  # the primary out of reach: its connection cut, new ones refused
        proxy.cut("rst")
        conn.exec_driver_sql("SELECT note FROM adv_accounts WHERE id = 2").all()
        conn.execute(sa.text("UPDATE adv_accounts SET note = 'paid' WHERE id = 2"))

    try:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            _in_transaction(engine, request)
    finally:
        proxy.heal()
    # The original error: the connection lost (not the standby's answer to the write).
    assert isinstance(raised.value, sa.exc.OperationalError), describe_error(raised.value)
    assert [outcome for outcome, _ in _outcomes(events)] != ["replayed"]
    assert server.execute("SELECT note FROM adv_accounts WHERE id = 2") == [("replicated",)]


VOLATILE = ["txid_current()", "pg_backend_pid()", "inet_client_port()", "statement_timestamp()"]


@pytest.mark.parametrize("function", VOLATILE)
def test_a_volatile_value_the_app_saw_refuses_the_replay(server, proxy, function, disposing):
    # Held: refused by the whitelist, or caught by the digest (the value differs).
    engine, events = _replaying(disposing, server, proxy, "psycopg2")

    def request(conn):
        conn.exec_driver_sql(f"SELECT {function}").all()
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('volatile')"))

    with pytest.raises(sa.exc.DBAPIError):
        _in_transaction(engine, request)
    assert _log(server) == []
    assert [outcome for outcome, _ in _outcomes(events)] in (["refused"], ["failed"])


@pytest.mark.parametrize("driver", SYNC)
def test_a_first_statement_replay_then_a_loss_later_lands_once(server, proxy, driver, disposing):
    # Two faults in one transaction: at checkout (the first statement replayed), then before
    # the write. The record must follow the first statement onto its fresh connection.
    engine, events = _replaying(disposing, server, proxy, driver)
    lose_at_next_checkout(engine, "terminate", server, proxy)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE adv_accounts SET note = note || '+' WHERE id = 1"))
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('twice lost')"))
    assert server.execute("SELECT note FROM adv_accounts WHERE id = 1") == [("one+",)]
    assert _log(server) == ["twice lost"]
    assert [type(e).__name__ for e in events] == ["FirstStatementReplayed", "TransactionReplayed"]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", ASYNC)
async def test_a_replay_cancelled_by_the_apps_timeout_leaves_nothing(
    server, proxy, driver, disposing_async
):
    # The app's own deadline (asyncio.timeout, a web server's request timeout) cancels the
    # request while the replay waits on a lock. Nothing of the replay may stay: no write, no
    # connection left checked out, no backend of ours left in a transaction or waiting.
    engine, _ = _replaying_async(disposing_async, server, proxy, driver)
    locker = sa.create_engine(server.url("psycopg2"), poolclass=sa.pool.NullPool)
    try:
        async with engine.connect() as conn:
            await conn.begin()
            await conn.execute(sa.text("UPDATE adv_accounts SET note = 'mine' WHERE id = 1"))
            lose("terminate", server, proxy)  # every backend: the locker connects after
            with locker.connect() as other:
                other.exec_driver_sql("SELECT 1 FROM adv_accounts WHERE id = 1 FOR UPDATE").all()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('late')"))
                with contextlib.suppress(sa.exc.DBAPIError):
                    await conn.rollback()
                other.rollback()
    finally:
        locker.dispose()
    assert engine.pool.checkedout() == 0
    ours = server.execute(
        "SELECT state, wait_event_type FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND query LIKE '%adv_accounts%'"
    )
    assert ours == []
    assert _log(server) == []
    assert server.execute("SELECT note FROM adv_accounts WHERE id = 1") == [("one",)]
    async with engine.begin() as conn:  # the engine goes on
        assert (await conn.exec_driver_sql("SELECT count(*) FROM adv_log")).scalar() == 0


def _rss():
    with open("/proc/self/statm") as statm:  # noqa: PTH123 # a proc file
        return int(statm.read().split()[1]) * 4096


@_broke(
    "results the app closed after one row (.first()) are all executed again and "
    "kept open on fresh cursors until the transaction ends: 10 results of 5,000 rows of 1 kB "
    "each, 50,000 rows buffered at once (the original held one result at a time; the "
    "process grew 98 MiB in the replay, psycopg2 and psycopg alike), while replay_max_rows "
    "counts only the 10 rows the app fetched",
)
@pytest.mark.parametrize("driver", SYNC)
def test_a_replay_holds_no_more_than_the_original(server, proxy, driver, disposing):
    engine, events = _replaying(disposing, server, proxy, driver)
    server.execute(
        "CREATE TABLE IF NOT EXISTS adv_wide AS "
        "SELECT g AS id, repeat('x', 1000) AS filler FROM generate_series(1, 5000) g"
    )
    wide = sa.text("SELECT id, filler FROM adv_wide ORDER BY id")
    with engine.begin() as conn:
        firsts = [conn.execute(wide).first()[0] for _ in range(10)]
        lose("terminate", server, proxy)
        before = _rss()
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('wide')"))
        grown = _rss() - before
        transcript = guard_of(engine).replay._transcript_of(conn)
        held = sum(
            max(int(s.reader.cursor.rowcount), 0)
            for s in transcript.statements
            if s.reader is not None and not s.reader.cursor.closed
        )
    assert firsts == [1] * 10
    assert _outcomes(events) == [("replayed", None)]
    assert held <= 5000, f"{held} rows buffered after the replay; memory grew {grown >> 20} MiB"


@_broke(
    "the role's default search_path changed (ALTER ROLE ... SET, as a deploy "
    "does) after the lost connection was made; the fresh connection takes the new default, "
    "which the session check cannot see before PostgreSQL 18 (search_path is not reported), "
    "and the replayed INSERT and the app's next one land in schema adv_other, not public",
)
@pytest.mark.parametrize("driver", SYNC)
def test_a_replay_writes_in_the_lost_connections_schema(server, proxy, driver, disposing):
    server.execute(
        "CREATE SCHEMA IF NOT EXISTS adv_other; "
        "CREATE TABLE IF NOT EXISTS adv_other.adv_log (id serial PRIMARY KEY, what text); "
        "TRUNCATE adv_other.adv_log"
    )
    engine, _ = _replaying(disposing, server, proxy, driver)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('first')"))
            server.execute("ALTER ROLE postgres IN DATABASE postgres SET search_path = adv_other")
            lose("terminate", server, proxy)
            conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('second')"))
    except sa.exc.DBAPIError:
        pass  # refused: the original error, nothing written
    finally:
        server.execute("ALTER ROLE postgres IN DATABASE postgres RESET search_path")
    elsewhere = server.execute("SELECT what FROM adv_other.adv_log ORDER BY id")
    assert elsewhere == []
    assert _log(server) in (["first", "second"], [])


@pytest.mark.parametrize("driver", SYNC)
def test_a_failed_replay_logs_no_password(server, proxy, driver, disposing, caplog):
    # The replay fails inside the dblink trigger: the server's error quotes the trigger's
    # statement, connection string and password included (CONTEXT). dropsafe's log lines and
    # events must not carry it.
    engine, events = _replaying(disposing, server, proxy, driver)
    caplog.set_level(logging.DEBUG, logger="dropsafe")

    def request(conn):
        conn.execute(sa.text("INSERT INTO adv_orders (id, what) VALUES (1, 'order 1')"))
        lose("terminate", server, proxy)
        server.execute(
            "ALTER TABLE adv_audit ADD CONSTRAINT adv_once CHECK (what <> 'order 1') NOT VALID"
        )
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('ordered')"))

    try:
        with pytest.raises(sa.exc.DBAPIError):
            _in_transaction(engine, request)
    finally:
        server.execute("ALTER TABLE adv_audit DROP CONSTRAINT IF EXISTS adv_once")
    assert [outcome for outcome, _ in _outcomes(events)] == ["failed"]
    assert "adv_once" in caplog.text  # the failure was logged
    assert server.password not in repr(events)
    assert server.password not in caplog.text


def test_a_transaction_the_server_ended_for_idling_is_replayed(server, proxy, disposing):
    # What happens today (a question for the design, not a break of the written promise):
    # the server ends a transaction left idle past idle_in_transaction_session_timeout
    # (SQLSTATE 25P03, a DBA's guard against held locks), and the replay revives it: the app
    # never learns it idled past the limit.
    events = []
    url = proxy.route(server.url("psycopg2"))
    engine = disposing(
        dropsafe.create_engine(
            url,
            policy=_policy(events),
            pool_size=1,
            max_overflow=0,
            connect_args={
                "options": "-c idle_in_transaction_session_timeout=300",
                "application_name": "adv_idle",
            },
        )
    )
    mine = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'adv_idle'"
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT id FROM adv_accounts ORDER BY id").all()
        wait_until(lambda: server.execute(mine) == [], timeout=10, what="the session ended")
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('idled')"))
    assert _log(server) == ["idled"]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", SYNC)
def test_a_serializable_transaction_is_replayed_serializable(server, proxy, driver, disposing):
    # Held: the replay's fresh connection begins the transaction as the lost one did.
    events = []
    engine = disposing(
        dropsafe.create_engine(
            proxy.route(server.url(driver)),
            policy=_policy(events),
            pool_size=1,
            max_overflow=0,
            isolation_level="SERIALIZABLE",
        )
    )
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT id FROM adv_accounts ORDER BY id").all()
        lose("terminate", server, proxy)
        level = conn.exec_driver_sql("SHOW transaction_isolation").scalar()
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('serial')"))
    assert level == "serializable"
    assert _log(server) == ["serial"]
    assert _outcomes(events) == [("replayed", None)]


@pytest.mark.parametrize("driver", SYNC)
def test_a_listener_writing_through_the_driver_refuses_the_replay(server, proxy, driver, disposing):
    # Held: an audit INSERT sent by a before_cursor_execute listener on the driver's own
    # connection is not in the record; the bytes its socket sent tell, and the replay is off.
    engine, events = _replaying(disposing, server, proxy, driver)

    @event.listens_for(engine, "before_cursor_execute", named=True)
    def audit(conn, statement, **_):
        if statement.startswith("UPDATE"):
            raw = conn.connection.dbapi_connection.cursor()
            raw.execute("INSERT INTO adv_audit (what) VALUES ('listener')")
            raw.close()

    def request(conn):
        conn.execute(sa.text("UPDATE adv_accounts SET note = 'audited' WHERE id = 1"))
        lose("terminate", server, proxy)
        conn.execute(sa.text("INSERT INTO adv_log (what) VALUES ('after audit')"))

    with pytest.raises(sa.exc.DBAPIError):
        _in_transaction(engine, request)
    assert server.execute("SELECT count(*) FROM adv_audit") == [("0",)]
    assert _log(server) == []
    assert [outcome for outcome, _ in _outcomes(events)] == ["refused"]
