"""Shapes of a unit of work that dropsafe refuses, and one it must not turn into an error.

Each test names the fault it injects and the history it proves, for psycopg2, psycopg 3 (sync
and async) and asyncpg:

- two-phase sessions: the COMMIT PREPARED reply is lost; before the refusal the unit ran
  twice (2 rows). Now refused with a ConfigurationError before the function runs.
- AUTOCOMMIT: each statement commits on its own; the connection is cut at the second statement;
  before the refusal the unit ran again and the first INSERT was written twice. Now the first
  statement under AUTOCOMMIT is refused before it is sent (or the unit before it runs).
- an ``after_commit`` (or ``after_transaction_end``) hook that raises: before, the caller got
  the hook's error for a unit that had committed (and a retryable one ran the unit again). Now
  the unit's result is returned and the hook's failure is reported once (event and log line).
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
import sqlalchemy as sa
from commit_faults import PoolerErrorAtCommit
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe import ConfigurationError
from dropsafe.testing import ChaosProxy, PostgresServer

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

FACES = ["psycopg2-sync", "psycopg-sync", "psycopg-async", "asyncpg-async"]


@pytest.fixture(scope="module")
def server():
    with PostgresServer(settings={"max_prepared_transactions": "10"}) as server:
        server.execute("CREATE TABLE shapes (v int NOT NULL)")
        yield server


@pytest.fixture
def proxy(server):
    with ChaosProxy(server.host, server.port) as proxy:
        yield proxy


def rows(server, value):
    return int(server.execute(f"SELECT count(*) FROM shapes WHERE v = {int(value)}")[0][0])


def outcome(call):
    """Return what ``call`` returned, or the exception it raised (checked after the rows)."""
    try:
        return call()
    except Exception as exc:
        return exc


def insert(value):
    return f"INSERT INTO shapes VALUES ({int(value)})"


class Events(list):
    def __call__(self, event):
        self.append(event)

    def named(self, name):
        return [event for event in self if type(event).__name__ == name]


class Face:
    """Run a unit of work through one driver and one face (sync or async).

    ``steps`` are SQL strings, executed in order, or callables called with the attempt number
    and the handle (to strike a fault between two statements); an async face awaits what they
    return if it is awaitable.
    """

    def __init__(self, name):
        self.driver, self.mode = name.split("-")
        self.calls = 0

    def url(self, server, *, port=None, plain=False):
        query = {}
        if plain:
            query = {"ssl": "disable"} if self.driver == "asyncpg" else {"sslmode": "disable"}
        url = server.url(self.driver, **query)
        if port is not None:
            url = url.replace(f":{server.port}/", f":{port}/")
        return url

    def run(
        self,
        url,
        steps,
        *,
        bind="session",
        engine_kw=None,
        options=None,
        maker_kw=None,
        session_class=Session,
        hooks=(),
        policy=None,
        on_engine=None,
    ):
        policy = policy or dropsafe.Policy(hooks=(dropsafe.events.LoggingHook(), *hooks))
        if self.mode == "async":
            return asyncio.run(
                self._run_async(
                    url,
                    steps,
                    bind,
                    engine_kw or {},
                    options,
                    maker_kw or {},
                    session_class,
                    policy,
                    on_engine,
                )
            )
        engine = dropsafe.create_engine(url, policy=policy, **(engine_kw or {}))
        if on_engine is not None:
            on_engine(engine)
        try:
            target = engine.execution_options(**options) if options else engine
            if bind == "session":
                target = sessionmaker(target, class_=session_class, **(maker_kw or {}))

            def unit(handle):
                self.calls += 1
                for step in steps:
                    if callable(step):
                        step(self.calls, handle)
                    else:
                        handle.execute(sa.text(step))
                return "done"

            return dropsafe.run_transaction(target, unit)
        finally:
            engine.dispose()

    async def _run_async(  # noqa: PLR0917 - a test helper
        self, url, steps, bind, engine_kw, options, maker_kw, session_class, policy, on_engine
    ):
        engine = dropsafe.create_async_engine(url, policy=policy, **engine_kw)
        if on_engine is not None:
            on_engine(engine.sync_engine)
        try:
            target = engine.execution_options(**options) if options else engine
            if bind == "session":
                target = async_sessionmaker(target, sync_session_class=session_class, **maker_kw)

            async def unit(handle):
                self.calls += 1
                for step in steps:
                    if callable(step):
                        done = step(self.calls, handle)
                        if inspect.isawaitable(done):
                            await done
                    else:
                        await handle.execute(sa.text(step))
                return "done"

            return await dropsafe.run_transaction_async(target, unit)
        finally:
            await engine.dispose()


# -- 5. two-phase: refused before anything runs ---------------------------------------------


class TwoPhaseSession(Session):
    """A Session that turns two-phase on itself (not through its sessionmaker)."""

    def __init__(self, **kw):
        super().__init__(twophase=True, **kw)


def _no_prepared_transactions(server):
    return server.execute("SELECT count(*) FROM pg_prepared_xacts")[0][0] == "0"


@pytest.mark.parametrize("how", ["sessionmaker", "session_class"])
@pytest.mark.parametrize("face", FACES)
def test_a_two_phase_unit_is_refused_before_it_runs(server, face, how):
    # The fault: the COMMIT PREPARED reply is lost (a pooler's FATAL 08P01 in its place). On
    # the code before the refusal, SQLAlchemy fired commit_twophase, not commit: no xid was
    # read, the unit ran again, and its row was written twice.
    face = Face(face)
    value = 50 + FACES.index(face.driver + "-" + face.mode) + (10 if how == "session_class" else 0)
    pooler = PoolerErrorAtCommit(server.port)
    kw = {"maker_kw": {"twophase": True}} if how == "sessionmaker" else {}
    if how == "session_class":
        kw["session_class"] = TwoPhaseSession
    try:
        url = face.url(server, port=pooler.port, plain=True)
        got = outcome(lambda: face.run(url, [insert(value)], **kw))
    finally:
        pooler.close()
    written = rows(server, value)
    assert (written, face.calls) == (0, 0 if how == "sessionmaker" else face.calls), got
    assert _no_prepared_transactions(server)
    assert isinstance(got, ConfigurationError), got
    assert "two-phase" in str(got)
    assert "instead" in str(got)


# -- 6. AUTOCOMMIT: refused before a statement commits on its own ----------------------------

AUTOCOMMIT_SHAPES = [
    "engine_argument",  # create_engine(..., isolation_level="AUTOCOMMIT")
    "engine_option_session",  # sessionmaker(engine.execution_options(isolation_level=...))
    "engine_option_connection",  # run_transaction(engine.execution_options(...), fn)
    "driver_flag",  # the DBAPI connection's own autocommit, set inside the unit
    "driver_connect_argument",  # psycopg's connect_args={"autocommit": True}
]


def _cut_on_first_attempt(proxy):
    def cut(attempt, handle):
        del handle
        if attempt == 1:
            proxy.cut("rst")

    return cut


def _set_driver_autocommit(attempt, handle):
    """Turn the DBAPI connection's own autocommit on, under SQLAlchemy's feet."""
    del attempt

    def turn_on(connection):
        connection.connection.dbapi_connection.autocommit = True

    if hasattr(handle, "run_sync"):
        return handle.run_sync(turn_on)
    return turn_on(handle)


def _autocommit_settings(shape):
    if shape == "engine_argument":
        return {"engine_kw": {"isolation_level": "AUTOCOMMIT"}}
    if shape == "engine_option_session":
        return {"options": {"isolation_level": "AUTOCOMMIT"}}
    if shape == "engine_option_connection":
        return {"options": {"isolation_level": "AUTOCOMMIT"}, "bind": "engine"}
    if shape == "driver_connect_argument":
        return {"engine_kw": {"connect_args": {"autocommit": True}}}
    return {"bind": "engine"}


@pytest.mark.parametrize("shape", AUTOCOMMIT_SHAPES)
@pytest.mark.parametrize("face", FACES)
def test_autocommit_inside_a_unit_is_refused_before_a_statement_commits(server, proxy, face, shape):
    # The fault: the connection is cut (RST) between the unit's two INSERTs, on its first run.
    # Under AUTOCOMMIT the first had committed on its own: on the code before the refusal the
    # unit ran again and the first INSERT was written twice.
    face = Face(face)
    if shape == "driver_connect_argument" and face.driver != "psycopg":
        pytest.skip("only psycopg 3 takes autocommit as a connect argument")
    value = 100 + 10 * AUTOCOMMIT_SHAPES.index(shape) + FACES.index(f"{face.driver}-{face.mode}")
    settings = _autocommit_settings(shape)
    steps = [insert(value), _cut_on_first_attempt(proxy), insert(value + 1000)]
    if shape == "driver_flag":
        steps = [_set_driver_autocommit, *steps]
    got = outcome(lambda: face.run(proxy.route(face.url(server)), steps, **settings))
    written = (rows(server, value), rows(server, value + 1000))
    assert written == (0, 0), f"a statement under AUTOCOMMIT was sent; the unit gave {got!r}"
    assert isinstance(got, ConfigurationError), got
    assert "AUTOCOMMIT" in str(got)
    assert face.calls <= 1


@pytest.mark.parametrize("face", FACES)
def test_an_ordinary_unit_pays_nothing_for_the_autocommit_check(server, face):
    face = Face(face)
    before = rows(server, 199)  # the module's server: other faces wrote theirs (any order)
    assert face.run(face.url(server), [insert(199), insert(199)]) == "done"
    assert rows(server, 199) == before + 2


# -- 8. a hook after COMMIT that raises: the unit committed, the caller must know it --------


class HookError(RuntimeError):
    pass


def _raising_session(hook_name, make_error):
    class HookedSession(Session):
        pass

    def hook(*args):
        del args
        raise make_error()

    event.listen(HookedSession, hook_name, hook)
    return HookedSession


def _database_error(server, statement):
    """A real error of the database, met by the hook on its own connection."""

    def make():
        engine = sa.create_engine(server.url("psycopg2"), poolclass=sa.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(statement))
        except sa.exc.DBAPIError as exc:
            return exc
        finally:
            engine.dispose()
        raise AssertionError(f"{statement} did not fail")

    return make


HOOK_ERRORS = {
    "app_error": lambda server: lambda: HookError("the hook failed"),
    # retryable, and PostgreSQL's own refusal: a unit that got it at COMMIT is run again
    "serialization_failure": lambda server: _database_error(
        server, "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"
    ),
    # retryable, and a lost connection at COMMIT: resolved by the xid
    "terminated": lambda server: _database_error(
        server, "SELECT pg_terminate_backend(pg_backend_pid())"
    ),
}


@pytest.mark.parametrize("error", list(HOOK_ERRORS))
@pytest.mark.parametrize("hook_name", ["after_commit", "after_transaction_end"])
@pytest.mark.parametrize("face", FACES)
def test_a_hook_that_raises_after_commit_does_not_hide_the_commit(
    server, face, hook_name, error, caplog
):
    # No network fault: the COMMIT succeeds, then the Session's hook raises. On the code
    # before, the caller got the hook's error for a unit that committed; a retryable one
    # (a real OperationalError: the hook's own connection terminated) ran the unit again.
    face = Face(face)
    index = FACES.index(f"{face.driver}-{face.mode}")
    value = 300 + 20 * index + 10 * (hook_name == "after_commit") + list(HOOK_ERRORS).index(error)
    make_error = HOOK_ERRORS[error](server)
    events = Events()
    caplog.set_level(logging.INFO, logger="dropsafe")
    session_class = _raising_session(hook_name, make_error)
    got = outcome(
        lambda: face.run(
            face.url(server), [insert(value)], session_class=session_class, hooks=(events,)
        )
    )
    assert (rows(server, value), face.calls, got) == (1, 1, "done")
    failed = events.named("HookFailedAfterCommit")
    assert len(failed) == 1, events
    assert failed[0].unit.endswith("unit")
    assert type(make_error()).__name__ in failed[0].error
    lines = [r for r in caplog.records if "hook_failed_after_commit" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize("face", FACES)
def test_a_hook_that_raises_after_a_retried_commit_does_not_hide_it(server, proxy, face):
    # The fault: the first attempt's connection is cut (RST) before its COMMIT; the second
    # commits and its after_commit hook raises. The result is returned, the row written once.
    face = Face(face)
    value = 400 + FACES.index(f"{face.driver}-{face.mode}")
    events = Events()
    session_class = _raising_session("after_commit", lambda: HookError("the hook failed"))
    steps = [insert(value), _cut_on_first_attempt(proxy), "SELECT 1"]
    got = outcome(
        lambda: face.run(
            proxy.route(face.url(server)), steps, session_class=session_class, hooks=(events,)
        )
    )
    assert (rows(server, value), face.calls, got) == (1, 2, "done")
    assert len(events.named("HookFailedAfterCommit")) == 1


@pytest.mark.parametrize("face", FACES)
def test_a_hook_that_raises_on_a_unit_that_failed_is_an_error_with_no_effect(server, face):
    # A unit whose statement fails (a permanent error) never commits: whatever the rollback's
    # hooks raise, the caller gets an error and nothing was written.
    face = Face(face)
    value = 500 + FACES.index(f"{face.driver}-{face.mode}")
    session_class = _raising_session("after_soft_rollback", lambda: HookError("rollback hook"))
    event.listen(
        session_class, "after_transaction_end", lambda *a: (_ for _ in ()).throw(HookError("end"))
    )
    with pytest.raises(Exception) as raised:
        face.run(face.url(server), [insert(value), "SELECT 1/0"], session_class=session_class)
    assert not isinstance(raised.value, dropsafe.CommitOutcomeUnknown)
    assert rows(server, value) == 0


@pytest.mark.parametrize("face", FACES)
def test_a_hook_on_a_commit_resolved_by_its_xid_never_ran_and_hides_nothing(server, face):
    # The fault: the COMMIT's reply is lost (a pooler's FATAL 08P01 in its place); the
    # resolver proves it committed. Session.commit() raised at the COMMIT, so its after_commit
    # hook never ran: nothing to report, the result returned, the row written once.
    face = Face(face)
    value = 600 + FACES.index(f"{face.driver}-{face.mode}")
    events = Events()
    pooler = PoolerErrorAtCommit(server.port)
    session_class = _raising_session("after_commit", lambda: HookError("the hook failed"))
    try:
        url = face.url(server, port=pooler.port, plain=True)
        got = outcome(
            lambda: face.run(url, [insert(value)], session_class=session_class, hooks=(events,))
        )
        assert pooler.struck.is_set()
    finally:
        pooler.close()
    assert (rows(server, value), face.calls, got) == (1, 1, "done")
    assert [event.outcome for event in events.named("CommitResolved")] == ["committed"]
    assert events.named("HookFailedAfterCommit") == []


def _refused_at_commit(server):
    server.execute(
        "CREATE TABLE IF NOT EXISTS refused_at_commit (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )
    return "INSERT INTO refused_at_commit VALUES (1), (1)"


def _app_commit_listener(engine):
    def refuse(conn):
        raise HookError("the app's commit listener")

    event.listen(engine, "commit", refuse)


@pytest.mark.parametrize("refusal", ["server_refuses_commit", "commit_listener_raises"])
@pytest.mark.parametrize("face", FACES)
def test_a_commit_that_failed_is_never_taken_for_a_hook_after_it(server, face, refusal):
    # The other side of the hook rule: a COMMIT that did not happen must still be an error. A
    # deferred UNIQUE makes PostgreSQL refuse the COMMIT; an engine `commit` listener of the
    # app raises before the COMMIT is sent. Both with a raising after_commit hook in place.
    face = Face(face)
    index = FACES.index(f"{face.driver}-{face.mode}")
    value = 700 + 10 * (refusal == "commit_listener_raises") + index
    events = Events()
    steps = [insert(value)]
    on_engine = None
    if refusal == "server_refuses_commit":
        steps.append(_refused_at_commit(server))
    else:
        on_engine = _app_commit_listener
    session_class = _raising_session("after_commit", lambda: HookError("after_commit"))
    got = outcome(
        lambda: face.run(
            face.url(server),
            steps,
            session_class=session_class,
            hooks=(events,),
            on_engine=on_engine,
        )
    )
    assert rows(server, value) == 0, got
    assert not isinstance(got, (str, dropsafe.CommitOutcomeUnknown)), got
    if refusal == "server_refuses_commit":
        assert isinstance(got, sa.exc.IntegrityError), got
    else:
        assert isinstance(got, HookError), got
        assert "commit listener" in str(got)
    assert events.named("HookFailedAfterCommit") == []
