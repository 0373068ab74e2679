"""The first-statement replay never runs a statement under another session's state (issue 26, 9).

A Session's later transaction gets a new checkout of the same pooled connection, which keeps
whatever session state an earlier checkout set on it. When that connection is lost under the
transaction's first statement, a replay on a fresh connection would run the statement without
that state: in another schema, as another role, at another isolation level. Each test sets the
state in one checkout, commits, loses the connection (backend terminated) at the next checkout,
and sends the next transaction's first statement. The original error must be raised (as without
dropsafe), and nothing may land elsewhere. State set the supported way (a ``connect`` listener,
the engine's ``isolation_level``) is on the fresh connection too, and must keep replaying.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from replay_faults import (
    lose_at_next_checkout,
    module_server,
    numbers,
    replay_async_engine,
    replay_engine,
    replayed,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from dropsafe._drivers import driver_names

pytestmark = pytest.mark.fault

TENANT = "replay_tenant_a"
ROLE = "replay_tenant_role"
INSERT = sa.text("INSERT INTO replay_state_items (n) VALUES (:n) RETURNING current_user")
CHARACTERISTICS = sa.text(
    "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')"
)
SCHEMA_SETUP = f"""
CREATE TABLE public.replay_state_items (n int);
CREATE SCHEMA {TENANT};
CREATE TABLE {TENANT}.replay_state_items (n int);
CREATE ROLE {ROLE} NOLOGIN;
GRANT USAGE ON SCHEMA {TENANT} TO {ROLE};
GRANT INSERT, SELECT ON public.replay_state_items, {TENANT}.replay_state_items TO {ROLE};
CREATE FUNCTION public.replay_use_tenant() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('search_path', '{TENANT}', false);
  RETURN 1;
END $$;
CREATE TABLE public.replay_role_switch (n int);
CREATE FUNCTION public.replay_switch_role() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('role', '{ROLE}', false);
  RETURN NEW;
END $$;
CREATE TRIGGER replay_switch_role AFTER INSERT ON public.replay_role_switch
  FOR EACH ROW EXECUTE FUNCTION public.replay_switch_role();
"""

# Ways an app sets a session-level search_path on its connection, through SQLAlchemy.
SET_TENANT = {
    "SET": f"SET search_path TO {TENANT}",
    "set_config": f"SELECT set_config('search_path', '{TENANT}', false)",
    "function": "SELECT replay_use_tenant()",
    "DO": f"DO $$ BEGIN PERFORM set_config('search_path', '{TENANT}', false); END $$",
}


server, _empty = module_server(
    SCHEMA_SETUP,
    empty=f"TRUNCATE public.replay_state_items, {TENANT}.replay_state_items, replay_role_switch",
)


def _rows(server, schema):
    return numbers(server, f"{schema}.replay_state_items")


def _set_driver_characteristics(driver, dbapi_connection):
    """Make the driver begin SERIALIZABLE READ ONLY transactions, through its own attributes."""
    if driver == "psycopg2":
        dbapi_connection.set_session(isolation_level="SERIALIZABLE", readonly=True)
    elif driver == "psycopg":
        import psycopg  # only this driver's test needs it

        native = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        native.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        native.read_only = True
    else:  # SQLAlchemy's asyncpg adapter: the attributes its BEGIN is made from
        dbapi_connection.set_isolation_level("serializable")
        dbapi_connection.readonly = True


# -- session state set in an earlier checkout: not replayed ------------------------------

RAISED = ("raised",)

# Statements of an earlier transaction that leave session state on the pooled connection.
EARLIER_STATE = {
    **{f"search_path-{how}": sql for how, sql in SET_TENANT.items()},
    # A replay would run the next statement as the connecting superuser.
    "SET ROLE": f"SET ROLE {ROLE}",
    "SET SESSION AUTHORIZATION": f"SET SESSION AUTHORIZATION {ROLE}",
    # The INSERT's text is on the whitelist; its trigger runs set_config('role', ..., false).
    # PostgreSQL reports is_superuser when the role changes, without a round trip: the lost
    # connection's report differs from the fresh one's, and nothing is replayed.
    "role-by-trigger": "INSERT INTO replay_role_switch (n) VALUES (1)",
}
# None of these shows in a reported parameter or a driver attribute: the text marks.
OTHER_STATE = [
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "LISTEN replay_channel",
    "CREATE TEMP TABLE replay_scratch (n int)",
    "SELECT pg_advisory_lock(4242)",
    "PREPARE replay_prepared AS SELECT 1",
    "SELECT set_config('app.tenant', 'acme', false)",
    "RESET ALL",
]
EARLIER_CASES = [
    *(
        pytest.param(driver, EARLIER_STATE[name], id=f"{name}-{driver}")
        for name in EARLIER_STATE
        for driver in driver_names(sync=True, replays=True)
    ),
    *(pytest.param("psycopg2", statement, id=statement) for statement in OTHER_STATE),
]


def _after_a_lost_checkout(engine, server, proxy, session, statement, *, params=None):
    """Lose the connection at the session's next checkout, then send ``statement`` as its new
    transaction's first and commit: the row it returned, or ``RAISED`` (no replay)."""
    lose_at_next_checkout(engine, "terminate", server, proxy)
    try:
        row = tuple(session.execute(statement, params).one())
        session.commit()
    except sa.exc.DBAPIError:
        return RAISED
    return row


async def _after_a_lost_checkout_async(engine, server, proxy, session, statement, *, params=None):
    """``_after_a_lost_checkout`` through an AsyncSession."""
    lose_at_next_checkout(engine.sync_engine, "terminate", server, proxy)
    try:
        row = tuple((await session.execute(statement, params)).one())
        await session.commit()
    except sa.exc.DBAPIError:
        return RAISED
    return row


def _assert_not_replayed(server, events, outcome):
    """The original error was raised (as without dropsafe), and nothing landed anywhere."""
    assert outcome == RAISED
    assert _rows(server, "public") == []
    assert _rows(server, TENANT) == []
    assert replayed(events) == []


@pytest.mark.parametrize(("driver", "earlier"), EARLIER_CASES)
def test_session_state_set_in_an_earlier_transaction_is_not_lost_by_a_replay(
    server, proxy, driver, earlier, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    with Session(engine) as session:
        session.execute(sa.text(earlier))
        session.commit()  # the connection goes back to the pool, its session state set
        outcome = _after_a_lost_checkout(engine, server, proxy, session, INSERT, params={"n": 1})
    _assert_not_replayed(server, events, outcome)


# Where, in checkouts of a connection that has run statements already, one that changes the
# session comes: the replay marks a connection once and then skips the mark of every statement
# that changes nothing (issue 28: a healthy request pays no mark), never of one that changes.
LATER_CHANGE = {
    "second statement": [["SELECT 1"], ["SELECT 1", SET_TENANT["SET"]]],
    "first statement of a later checkout": [["SELECT 1"], ["SELECT 1"], [SET_TENANT["SET"]]],
}


def _after_marked_checkouts(engine, server, proxy, transactions, *, statement, params=None):
    """Run ``transactions`` (each its own checkout of the one pooled connection), then
    ``_after_a_lost_checkout`` with ``statement``."""
    with Session(engine) as session:
        for transaction in transactions:
            for text in transaction:
                session.execute(sa.text(text))
            session.commit()
        return _after_a_lost_checkout(engine, server, proxy, session, statement, params=params)


@pytest.mark.parametrize("where", LATER_CHANGE)
@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_session_state_set_after_the_connection_was_marked_is_not_lost_by_a_replay(
    server, proxy, driver, where, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    outcome = _after_marked_checkouts(
        engine, server, proxy, LATER_CHANGE[where], statement=INSERT, params={"n": 1}
    )
    _assert_not_replayed(server, events, outcome)


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_a_connection_marked_before_keeps_replaying_statements_that_change_nothing(
    server, proxy, driver, disposing
):
    # The other side of the skipped mark: plain statements on a marked connection still replay.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    plain = [["SELECT 1", "SELECT 2"]] * 3
    outcome = _after_marked_checkouts(engine, server, proxy, plain, statement=sa.text("SELECT 7"))
    assert outcome == (7,)
    assert len(replayed(events)) == 1


@pytest.mark.parametrize(
    "earlier",
    [SET_TENANT["function"], f"SET ROLE {ROLE}"],
    ids=["search_path-function", "SET ROLE"],
)
@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_session_state_set_in_an_earlier_transaction_is_not_lost_by_a_replay(
    server, proxy, driver, earlier, disposing_async
):
    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events))
    async with AsyncSession(engine) as session:
        await session.execute(sa.text(earlier))
        await session.commit()
        outcome = await _after_a_lost_checkout_async(
            engine, server, proxy, session, INSERT, params={"n": 1}
        )
    _assert_not_replayed(server, events, outcome)


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_transaction_characteristics_set_on_the_driver_are_not_lost_by_a_replay(
    server, proxy, driver, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    with Session(engine) as session:
        dbapi_connection = session.connection().connection.dbapi_connection
        session.commit()  # the connection is idle again, the driver told what to begin
        _set_driver_characteristics(driver, dbapi_connection)
        seen = _after_a_lost_checkout(engine, server, proxy, session, CHARACTERISTICS)
    _assert_not_replayed(server, events, seen)  # a replay ran it as ('read committed', 'off')


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_transaction_characteristics_set_on_the_driver_are_not_lost_by_a_replay(
    server, proxy, driver, disposing_async
):
    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events))
    async with AsyncSession(engine) as session:
        raw = await (await session.connection()).get_raw_connection()
        dbapi_connection = raw.dbapi_connection
        await session.commit()
        if driver == "psycopg":  # its async connection takes them by awaited setters
            import psycopg  # only this driver's test needs it

            native = dbapi_connection.driver_connection
            await native.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            await native.set_read_only(True)
        else:
            _set_driver_characteristics(driver, dbapi_connection)
        seen = await _after_a_lost_checkout_async(engine, server, proxy, session, CHARACTERISTICS)
    _assert_not_replayed(server, events, seen)


# -- state every connection gets, and ordinary work before: still replayed ----------------


def _tenant_on_connect(engine, driver=None):
    """Set the tenant's search_path (and, given ``driver``, its characteristics) on every new
    connection, as a ``connect`` listener does."""

    @event.listens_for(engine, "connect")
    def tenant(dbapi_connection, record):
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET search_path TO {TENANT}")
        cursor.close()
        dbapi_connection.commit()
        if driver is not None:
            _set_driver_characteristics(driver, dbapi_connection)


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_state_set_by_a_connect_listener_and_ordinary_work_before_keep_the_replay(
    server, proxy, driver, disposing
):
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    _tenant_on_connect(engine, driver)
    with Session(engine) as session:
        # Earlier transactions of ordinary statements leave the session state alone.
        session.execute(sa.text("SELECT count(*) FROM replay_state_items")).scalar()
        session.commit()
        seen = _after_a_lost_checkout(engine, server, proxy, session, CHARACTERISTICS)
        assert seen == ("serializable", "on")
    assert len(replayed(events)) == 1


@pytest.mark.parametrize(
    "where",
    [
        "connect-listener",
        # libpq's options=-c: every connection starts with them, the fresh one too.
        "connect-arguments",
    ],
)
@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_search_path_every_connection_gets_keeps_the_replay_of_a_write(
    server, proxy, driver, where, disposing
):
    events = []
    if where == "connect-arguments":
        connect_args = {"options": f"-c search_path={TENANT}"}
        engine = disposing(replay_engine(server, proxy, driver, events, connect_args=connect_args))
    else:
        engine = disposing(replay_engine(server, proxy, driver, events))
        _tenant_on_connect(engine)
    with Session(engine) as session:
        session.execute(INSERT, {"n": 1})
        session.commit()
        _after_a_lost_checkout(engine, server, proxy, session, INSERT, params={"n": 2})
    assert _rows(server, TENANT) == [1, 2]
    assert _rows(server, "public") == []
    assert len(replayed(events)) == 1


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_isolation_level_of_the_engine_and_earlier_work_keep_the_replay(
    server, proxy, driver, disposing_async
):
    events = []
    engine = disposing_async(
        replay_async_engine(server, proxy, driver, events, isolation_level="SERIALIZABLE")
    )
    async with AsyncSession(engine) as session:
        await session.execute(INSERT, {"n": 1})
        await session.commit()
        seen = await _after_a_lost_checkout_async(engine, server, proxy, session, CHARACTERISTICS)
    assert seen == ("serializable", "off")
    assert _rows(server, "public") == [1]
    assert len(replayed(events)) == 1


EXECUTION_OPTIONS = {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True}
DEFAULTS = ("read committed", "off")


@pytest.mark.parametrize("driver", driver_names(sync=True, replays=True))
def test_sqlalchemy_execution_options_keep_the_replay_and_are_reset_after(
    server, proxy, driver, disposing
):
    # isolation_level and postgresql_readonly set by SQLAlchemy on the Connection are set on
    # the fresh connection too; the pool's connection is back to the defaults afterwards.
    events = []
    engine = disposing(replay_engine(server, proxy, driver, events))
    with Session(engine.execution_options(**EXECUTION_OPTIONS)) as session:
        seen = _after_a_lost_checkout(engine, server, proxy, session, CHARACTERISTICS)
    assert (seen, len(replayed(events))) == (("serializable", "on"), 1)
    with engine.connect() as conn:
        assert tuple(conn.execute(CHARACTERISTICS).one()) == DEFAULTS


@pytest.mark.parametrize("driver", driver_names(asyncio=True, replays=True))
async def test_async_sqlalchemy_execution_options_keep_the_replay_and_are_reset_after(
    server, proxy, driver, disposing_async
):
    events = []
    engine = disposing_async(replay_async_engine(server, proxy, driver, events))
    async with AsyncSession(engine.execution_options(**EXECUTION_OPTIONS)) as session:
        seen = await _after_a_lost_checkout_async(engine, server, proxy, session, CHARACTERISTICS)
    assert (seen, len(replayed(events))) == (("serializable", "on"), 1)
    async with engine.connect() as conn:
        assert tuple((await conn.execute(CHARACTERISTICS)).one()) == DEFAULTS
