"""run_transaction and friends against a real server: retries, refusals, and COMMITs cut mid-way."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest
import sqlalchemy as sa
from commit_faults import WhenCommitRuns, slow_commit_schema
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe import CommitOutcomeUnknown, ConfigurationError, ErrorKind
from dropsafe.events import CommitResolved, RetriesGaveUp, RetryScheduled

SCHEMA = slow_commit_schema("items", unique=True)
RAISE_40001 = sa.text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind):
        return [event for event in self.events if isinstance(event, kind)]


@pytest.fixture
def server(postgres_server):
    postgres_server.execute(SCHEMA)
    return postgres_server


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def engine(server, chaos_proxy, recorder):
    engine = dropsafe.create_engine(
        chaos_proxy.route(server.url("psycopg2")),
        policy=dropsafe.Policy(
            unit=dropsafe.UnitPolicy(commit_status_timeout=5), hooks=(recorder,)
        ),
    )
    yield engine
    engine.dispose()


def _insert(value, commit_sleep=0.0):
    def unit(handle):
        handle.execute(sa.text(f"SET LOCAL test.commit_sleep = '{commit_sleep}'"))
        handle.execute(sa.text("INSERT INTO items VALUES (:v)"), {"v": value})
        return value

    return unit


def _values(server):
    return [int(v) for (v,) in server.execute("SELECT v FROM items ORDER BY v")]


# -- the plain path -------------------------------------------------------------------------


@pytest.mark.shares_server
def test_session_unit_is_committed_and_its_value_returned(server, engine):
    assert dropsafe.run_transaction(sessionmaker(engine), _insert(1)) == 1
    assert _values(server) == [1]


@pytest.mark.shares_server
def test_engine_bind_gives_a_connection(server, engine):
    def unit(connection):
        assert isinstance(connection, sa.Connection)
        return _insert(2)(connection)

    assert dropsafe.run_transaction(engine, unit) == 2
    assert _values(server) == [2]


@pytest.mark.shares_server
def test_transactional_decorator_passes_the_session_first(server, engine):
    @dropsafe.transactional(sessionmaker(engine))
    def add(session, value, *, twice=False):
        _insert(value)(session)
        if twice:
            _insert(value + 1)(session)
        return "done"

    assert add(3, twice=True) == "done"
    assert add.__name__ == "add"
    assert _values(server) == [3, 4]


# -- retries and refusals -------------------------------------------------------------------


@pytest.mark.shares_server
def test_permanent_error_is_raised_unchanged_and_not_retried(server, engine):
    calls = []

    def unit(session):
        calls.append(1)
        session.execute(sa.text("INSERT INTO items VALUES (5), (5)"))

    with pytest.raises(sa.exc.IntegrityError):
        dropsafe.run_transaction(sessionmaker(engine), unit)
    assert len(calls) == 1


@pytest.mark.shares_server
def test_transient_error_reruns_the_whole_unit(server, engine, recorder):
    calls = []

    def unit(session):
        calls.append(1)
        _insert(len(calls) * 10)(session)
        if len(calls) == 1:
            session.execute(RAISE_40001)
        return len(calls)

    assert dropsafe.run_transaction(sessionmaker(engine), unit) == 2
    # The first attempt's insert was rolled back with it: only the second one's row is there.
    assert _values(server) == [20]
    (retry,) = recorder.of(RetryScheduled)
    assert (retry.attempt, retry.kind) == (1, ErrorKind.TRANSIENT)


@pytest.mark.shares_server
def test_out_of_attempts_raises_the_last_error_itself_with_a_note(engine, recorder):
    policy = dropsafe.UnitPolicy(max_attempts=3)
    with dropsafe.test_mode(), pytest.raises(sa.exc.OperationalError) as raised:
        dropsafe.run_transaction(engine, lambda conn: conn.execute(RAISE_40001), policy=policy)
    if sys.version_info >= (3, 11):
        assert "gave up after 3 attempt(s)" in " ".join(raised.value.__notes__)
    assert recorder.of(RetriesGaveUp)[0].attempts == 3
    assert [event.delay for event in recorder.of(RetryScheduled)] == [0.0, 0.0]
    assert recorder.of(RetriesGaveUp)[0].reason == "attempts"


@pytest.mark.shares_server
def test_deadline_ends_the_retries(engine, recorder):
    policy = dropsafe.UnitPolicy(
        deadline=0.5, max_attempts=1000, backoff_initial=0.2, backoff_max=0.2, backoff_multiplier=1
    )
    with pytest.raises(sa.exc.OperationalError):
        dropsafe.run_transaction(engine, lambda conn: conn.execute(RAISE_40001), policy=policy)
    assert recorder.of(RetriesGaveUp)[0].reason == "deadline"
    # The deadline is checked between attempts: at most one attempt's length past it.
    assert recorder.of(RetriesGaveUp)[0].elapsed < 1.0


@pytest.mark.shares_server
def test_nested_unit_of_work_is_refused(server, engine):
    session_factory = sessionmaker(engine)

    def outer(session):
        _insert(6)(session)
        return dropsafe.run_transaction(session_factory, _insert(7))

    with pytest.raises(ConfigurationError, match="inside a unit of work"):
        dropsafe.run_transaction(session_factory, outer)
    assert _values(server) == []


@pytest.mark.shares_server
def test_unit_that_commits_itself_is_refused(server, engine):
    def unit(session):
        _insert(8)(session)
        session.commit()

    # Refused before its own COMMIT is sent: nothing written (it used to be after).
    with pytest.raises(ConfigurationError, match="committed its own transaction"):
        dropsafe.run_transaction(sessionmaker(engine), unit)
    assert _values(server) == []


@pytest.mark.shares_server
def test_wrong_kinds_of_fn_and_bind_are_refused(engine):
    async def async_unit(session):
        return 1

    session_factory = sessionmaker(engine)
    with pytest.raises(ConfigurationError, match="is async: use await run_transaction_async"):
        dropsafe.run_transaction(session_factory, async_unit)
    with pytest.raises(ConfigurationError, match="returned an awaitable"):
        dropsafe.run_transaction(session_factory, lambda s: async_unit(s))  # noqa: PLW0108
    with pytest.raises(ConfigurationError, match="fn must be callable"):
        dropsafe.run_transaction(session_factory, 42)
    with pytest.raises(ConfigurationError, match="bind must be a sessionmaker or an Engine"):
        dropsafe.run_transaction("postgresql://", lambda s: 1)
    with pytest.raises(ConfigurationError, match="must be bound to an Engine"):
        dropsafe.run_transaction(sessionmaker(), lambda s: 1)
    with pytest.raises(ConfigurationError, match="is not async: use run_transaction"):
        asyncio.run(dropsafe.run_transaction_async(engine, async_unit))
    with pytest.raises(ConfigurationError, match=r"policy must be a dropsafe\.UnitPolicy"):
        dropsafe.run_transaction(engine, lambda c: 1, policy={"max_attempts": 2})


# -- COMMITs cut mid-way --------------------------------------------------------------------


@pytest.mark.shares_server
@pytest.mark.fault
def test_commit_cut_after_the_server_committed_is_not_run_again(
    server, engine, chaos_proxy, recorder
):
    calls = []

    def unit(session):
        calls.append(1)
        return _insert(9, commit_sleep=0.5)(session)

    watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
    assert dropsafe.run_transaction(sessionmaker(engine), unit) == 9
    watcher.join(timeout=20)
    assert len(calls) == 1, "a committed unit of work ran again"
    assert _values(server) == [9]
    (resolved,) = recorder.of(CommitResolved)
    assert resolved.outcome == "committed"
    # The cut came while the trigger slept: the server said "in progress" before "committed".
    assert resolved.elapsed > 0.1


@pytest.mark.shares_server
@pytest.mark.fault
def test_commit_cut_and_aborted_runs_the_unit_again(server, engine, chaos_proxy, recorder):
    calls = []

    def unit(session):
        calls.append(1)
        return _insert(10, commit_sleep=2 if len(calls) == 1 else 0)(session)

    def cut_and_kill():
        chaos_proxy.cut("fin")
        server.terminate_backends()

    watcher = WhenCommitRuns(server, cut_and_kill)
    assert dropsafe.run_transaction(sessionmaker(engine), unit) == 10
    watcher.join(timeout=20)
    assert len(calls) == 2
    assert _values(server) == [10]
    assert [event.outcome for event in recorder.of(CommitResolved)] == ["aborted"]


@pytest.mark.fault
def test_commit_held_by_a_stopped_backend_past_the_bound_is_unknown(server, chaos_proxy, recorder):
    # A SIGSTOPped backend cannot be fenced (it does not exit when told): no answer in time.
    engine = dropsafe.create_engine(
        chaos_proxy.route(server.url("psycopg2")),
        policy=dropsafe.Policy(
            unit=dropsafe.UnitPolicy(commit_status_timeout=1), hooks=(recorder,)
        ),
    )
    stopped = []

    def cut_and_stop():
        (pid,) = server.execute(
            "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' AND state = 'active'"
        )[0]
        assert server.signal_backend(int(pid), signal.SIGSTOP)
        stopped.append(int(pid))
        chaos_proxy.cut("rst")

    try:
        watcher = WhenCommitRuns(server, cut_and_stop)
        with pytest.raises(CommitOutcomeUnknown, match="still in progress") as raised:
            dropsafe.run_transaction(sessionmaker(engine), _insert(11, commit_sleep=3))
        watcher.join(timeout=20)
    finally:
        for pid in stopped:
            server.signal_backend(pid, signal.SIGCONT)
        engine.dispose()
    assert raised.value.xid is not None
    assert [event.outcome for event in recorder.of(CommitResolved)] == ["unknown"]


@pytest.mark.shares_server
@pytest.mark.fault
def test_without_commit_verification_an_ambiguous_commit_is_reported(
    server, chaos_proxy, disposing
):
    engine = disposing(
        dropsafe.create_engine(
            chaos_proxy.route(server.url("psycopg")),
            policy=dropsafe.Policy(unit=dropsafe.UnitPolicy(verify_commits=False)),
        )
    )
    watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
    with pytest.raises(CommitOutcomeUnknown, match="verify_commits is off"):
        dropsafe.run_transaction(sessionmaker(engine), _insert(12, commit_sleep=0.5))
    watcher.join(timeout=20)


@pytest.mark.shares_server
@pytest.mark.fault
def test_async_commit_cut_after_the_server_committed_is_not_run_again(
    server, chaos_proxy, recorder
):
    calls = []

    async def unit(session):
        calls.append(1)
        await session.execute(sa.text("SET LOCAL test.commit_sleep = '0.5'"))
        await session.execute(sa.text("INSERT INTO items VALUES (13)"))
        return 13

    async def scenario():
        engine = dropsafe.create_async_engine(
            chaos_proxy.route(server.url("asyncpg")), policy=dropsafe.Policy(hooks=(recorder,))
        )
        try:
            watcher = WhenCommitRuns(server, lambda: chaos_proxy.cut("rst"))
            result = await dropsafe.run_transaction_async(async_sessionmaker(engine), unit)
            await asyncio.to_thread(watcher.join, 20)
            return result
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == 13
    assert len(calls) == 1
    assert _values(server) == [13]
    assert [event.outcome for event in recorder.of(CommitResolved)] == ["committed"]


@pytest.mark.shares_server
def test_async_transactional_decorator(server, chaos_proxy):
    async def scenario():
        engine = dropsafe.create_async_engine(chaos_proxy.route(server.url("asyncpg")))
        try:

            @dropsafe.transactional(engine)
            async def add(connection, value):
                await connection.execute(sa.text("INSERT INTO items VALUES (:v)"), {"v": value})
                return value

            return await add(14)
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == 14
    assert _values(server) == [14]


@pytest.mark.shares_server
def test_decorator_refuses_a_bind_of_the_wrong_kind(engine):
    with pytest.raises(ConfigurationError, match="is not async"):

        @dropsafe.transactional(engine)
        async def add(connection): ...
