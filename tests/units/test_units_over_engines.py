"""Unit shapes beyond one engine and one COMMIT: guarded on every engine, or refused.

Issue 26, histories 1 and 7. A unit over two engines (``sessionmaker(binds=...)``) whose second
COMMIT loses its reply was acknowledged with a row missing or run twice; a unit that committed
itself wrote the part before its own COMMIT twice when the final COMMIT was lost. Each test
names the fault it injects (a COMMIT whose reply the kernel drops, or one fenced after both
directions drop) and checks on the server: acknowledged means every row exactly once; refused
means no row at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket

import pytest
import sqlalchemy as sa
from commit_faults import heard_until_end, listen
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe import ConfigurationError
from dropsafe._commit_truth.resolution import APP_COMMITTED

pytestmark = pytest.mark.fault

# (driver, face): every driver, and both faces where the driver has both.
FACES = [("psycopg2", "sync"), ("psycopg", "sync"), ("psycopg", "async"), ("asyncpg", "async")]
FACE_IDS = [f"{driver}-{face}" for driver, face in FACES]

ONE = sa.Table("ledger_one", sa.MetaData(), sa.Column("v", sa.Integer))
TWO = sa.Table("ledger_two", sa.MetaData(), sa.Column("v", sa.Integer))
_VALUES = itertools.count(1)


class TwoRow:
    """A row of ``TWO`` as an ORM object: flushed only at COMMIT when added last."""

    def __init__(self, v):
        self.v = v


sa.orm.registry().map_imperatively(TwoRow, TWO, primary_key=[TWO.c.v])


class RoutingSession(Session):
    """Routes ``TWO`` to the engine in ``info["two"]``: an engine not in the sessionmaker."""

    def get_bind(self, mapper=None, clause=None, **kw):
        if mapper is not None and mapper.class_ is TwoRow:
            return self.info["two"]
        return super().get_bind(mapper, clause=clause, **kw)


@pytest.fixture(scope="module")
def server(shared_server):
    for database, table in (("db_one", "ledger_one"), ("db_two", "ledger_two")):
        shared_server.execute(f"CREATE DATABASE {database}")
        shared_server.execute(f"CREATE TABLE {table} (v int NOT NULL)", database=database)
    return shared_server


def count(server, table, value):
    database = "db_one" if table is ONE else "db_two"
    query = f"SELECT count(*) FROM {table.name} WHERE v = {int(value)}"
    return int(server.execute(query, database=database)[0][0])


def policy():
    # A lost reply is noticed by TCP within 2 s; the resolver fences within the deadline.
    return dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
        unit=dropsafe.UnitPolicy(commit_status_timeout=20, deadline=40),
    )


class LoseCommitReply:
    """The ``nth`` COMMIT sent through these engines (counted across them) loses its reply.

    The fault strikes inside the dialect's ``do_commit``, after every listener (dropsafe's
    marks included) and right before the DBAPI COMMIT: the kernel drops what comes back to the
    client's port (``direction="to"``: the COMMIT reaches the server, its reply does not), or
    everything (``"both"``: the COMMIT never arrives and the backend must be fenced).
    """

    def __init__(self, kernel_blackhole, nth, direction="to"):
        self.kernel_blackhole, self.nth, self.direction = kernel_blackhole, nth, direction
        self.sent = 0
        self.holes = contextlib.ExitStack()
        self.struck_database = None

    def install(self, *engines):
        for engine in engines:
            original = engine.dialect.do_commit

            def do_commit(dbapi_connection, original=original, database=engine.url.database):
                self.sent += 1
                if self.sent == self.nth:
                    self.struck_database = database
                    port = _local_port(dbapi_connection)
                    self.holes.enter_context(self.kernel_blackhole(port, direction=self.direction))
                original(dbapi_connection)

            engine.dialect.do_commit = do_commit

    @property
    def struck(self):
        return self.sent >= self.nth


def _local_port(fairy):
    transport = getattr(fairy.driver_connection, "_transport", None)
    if transport is not None:  # asyncpg
        return transport.get_extra_info("sockname")[1]
    with socket.socket(fileno=os.dup(fairy.driver_connection.fileno())) as sock:
        return sock.getsockname()[1]


class TwoEngines:
    """A unit over two databases: ``ONE`` on the main bind, ``TWO`` bound by ``binds``."""

    def __init__(self, server, driver, face, *, routed_row=None):
        self.server, self.driver, self.face = server, driver, face
        self.calls = 0
        # With a routed row: a RoutingSession, which adds TwoRow(routed_row) last.
        self.routed_row = routed_row

    def _factory(self, maker, engines, sync_engines, **kw):
        if self.routed_row is None:
            return maker(bind=engines[0], binds={TWO: engines[1]})
        return maker(bind=engines[0], info={"two": sync_engines[1]}, **kw)

    def run(self, work, fault=None):
        """Run ``work(execute)`` as a unit; ``execute`` runs a statement (awaited if async)."""
        urls = [self.server.url(self.driver, database=db) for db in ("db_one", "db_two")]
        if self.face == "async":
            return asyncio.run(self._run_async(urls, work, fault))
        engines = [dropsafe.create_engine(url, policy=policy()) for url in urls]
        if fault is not None:
            fault.install(*engines)

        def unit(session):
            self.calls += 1
            work(session.execute)
            if self.routed_row is not None:
                session.add(TwoRow(self.routed_row))
            return "done"

        try:
            factory = self._factory(sessionmaker, engines, engines, class_=RoutingSession)
            with fault.holes if fault is not None else contextlib.nullcontext():
                return dropsafe.run_transaction(factory, unit)
        finally:
            for engine in engines:
                engine.dispose()

    async def _run_async(self, urls, work, fault):
        engines = [dropsafe.create_async_engine(url, policy=policy()) for url in urls]
        if fault is not None:
            fault.install(*(engine.sync_engine for engine in engines))

        async def unit(session):
            self.calls += 1
            statements = []
            work(statements.append)
            for statement in statements:
                await session.execute(statement)
            if self.routed_row is not None:
                session.add(TwoRow(self.routed_row))
            return "done"

        try:
            factory = self._factory(
                async_sessionmaker,
                engines,
                [engine.sync_engine for engine in engines],
                sync_session_class=RoutingSession,
            )
            with fault.holes if fault is not None else contextlib.nullcontext():
                return await dropsafe.run_transaction_async(factory, unit)
        finally:
            for engine in engines:
                await engine.dispose()


# -- history 1: two engines in one unit -------------------------------------------------------


def _outcome(unit, steps, fault):
    """Run ``unit`` under ``fault``: "acknowledged", or "refused: <why>" (a ConfigurationError)."""
    try:
        unit.run(steps, fault)
    except ConfigurationError as exc:
        return f"refused: {exc}"
    return "acknowledged"


def _assert_refused_not_acknowledged(outcome, rows, unit):
    """Refused; an acknowledgement must at least have written both rows once (said first)."""
    if outcome == "acknowledged":
        assert rows == (1, 1), f"acknowledged, rows {rows}, runs {unit.calls}"
    assert outcome.startswith("refused"), f"not refused: rows {rows}, runs {unit.calls}"


@pytest.mark.parametrize("direction", ["to", "both"], ids=["reply-lost", "commit-lost"])
@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_a_unit_that_writes_through_two_engines_is_refused_before_any_commit(
    server, kernel_blackhole, driver, face, direction
):
    # The second COMMIT loses its reply (or is lost itself). Nothing can make that unit whole
    # without two-phase commit: it must be refused before the first COMMIT, nothing written.
    value = next(_VALUES)
    unit = TwoEngines(server, driver, face)
    fault = LoseCommitReply(kernel_blackhole, nth=2, direction=direction)
    outcome = _outcome(
        unit,
        lambda execute: (
            execute(ONE.insert().values(v=value)),
            execute(TWO.insert().values(v=value)),
        ),
        fault,
    )
    rows = (count(server, ONE, value), count(server, TWO, value))
    _assert_refused_not_acknowledged(outcome, rows, unit)
    assert "one unit of work per engine" in outcome
    assert server.password not in outcome  # the engines are named by redacted URLs
    assert rows == (0, 0)
    assert unit.calls == 1
    assert not fault.struck  # no COMMIT was sent at all


@pytest.mark.parametrize("nth", [1, 2], ids=["first-commit", "second-commit"])
@pytest.mark.parametrize("writer", [ONE, TWO], ids=["main-bind-writes", "other-bind-writes"])
@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_a_lost_commit_reply_of_a_unit_over_two_engines_is_acknowledged_once(  # noqa: PLR0917
    server, kernel_blackhole, driver, face, writer, nth
):
    # One engine writes, the other only reads; the nth COMMIT sent (whichever engine SQLAlchemy
    # commits then: it follows no set order) loses its reply. Acknowledged, the row once; run
    # again only when the lost one was the reader's, sent before the writer's.
    value = next(_VALUES)
    reader = TWO if writer is ONE else ONE
    unit = TwoEngines(server, driver, face)
    fault = LoseCommitReply(kernel_blackhole, nth=nth)
    result = unit.run(
        lambda execute: (
            execute(sa.select(reader.c.v).limit(1)),
            execute(writer.insert().values(v=value)),
        ),
        fault,
    )
    assert fault.struck
    assert (result, count(server, writer, value)) == ("done", 1)
    # A lost COMMIT of the reader before the writer's was sent: nothing committed, run again.
    reader_first = fault.struck_database == ("db_one" if reader is ONE else "db_two")
    assert unit.calls == (2 if nth == 1 and reader_first else 1)


@pytest.mark.parametrize("nth", [1, 2], ids=["first-commit", "second-commit"])
@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_an_engine_a_routing_session_first_reaches_at_commit_is_guarded(
    server, kernel_blackhole, driver, face, nth
):
    # A Session with its own get_bind sends a row to an engine the sessionmaker does not name,
    # first at the flush inside COMMIT; SQLAlchemy may send that engine's COMMIT first. Its
    # reply is lost (or the other's): acknowledged, the row once.
    value = next(_VALUES)
    unit = TwoEngines(server, driver, face, routed_row=value)
    fault = LoseCommitReply(kernel_blackhole, nth=nth)
    result = unit.run(lambda execute: execute(sa.select(ONE.c.v).limit(1)), fault)
    assert fault.struck
    assert (result, count(server, TWO, value)) == ("done", 1)
    reader_first = fault.struck_database == "db_one"
    assert unit.calls == (2 if nth == 1 and reader_first else 1)


@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_a_unit_over_two_engines_that_only_reads_runs_healthy(server, driver, face):
    unit = TwoEngines(server, driver, face)
    result = unit.run(
        lambda execute: (execute(sa.select(ONE.c.v).limit(1)), execute(sa.select(TWO.c.v)))
    )
    assert (result, unit.calls) == ("done", 1)


# -- history 7: a unit that commits itself ----------------------------------------------------


class OneEngine:
    """A unit on ``db_one`` given a Session or a Connection, through either face.

    Its work is a list of steps: a statement; "commit" or "rollback"; ("swallow", "commit"),
    a commit whose error the function catches and ignores; ("nested", statement), a statement
    inside ``begin_nested()``; ("apart", statement), a statement the function commits on a
    connection of its own.
    """

    def __init__(self, server, driver, face, kind):
        self.server, self.driver, self.face, self.kind = server, driver, face, kind
        self.calls = 0

    def run(self, steps, fault=None):
        url = self.server.url(self.driver, database="db_one")
        if self.face == "async":
            return asyncio.run(self._run_async(url, steps, fault))
        engine = dropsafe.create_engine(url, policy=policy())
        if fault is not None:
            fault.install(engine)

        def unit(handle):
            self.calls += 1
            for step in steps:
                if step in ("commit", "rollback"):
                    getattr(handle, step)()
                elif step == ("swallow", "commit"):
                    with contextlib.suppress(ConfigurationError):
                        handle.commit()
                elif isinstance(step, tuple) and step[0] == "apart":
                    own = handle.get_bind() if self.kind == "session" else handle.engine
                    with own.begin() as connection:
                        connection.execute(step[1])
                elif isinstance(step, tuple):
                    with handle.begin_nested():
                        handle.execute(step[1])
                else:
                    handle.execute(step)
            return "done"

        bind = engine if self.kind == "connection" else sessionmaker(engine)
        try:
            with fault.holes if fault is not None else contextlib.nullcontext():
                return dropsafe.run_transaction(bind, unit)
        finally:
            engine.dispose()

    async def _run_async(self, url, steps, fault):
        engine = dropsafe.create_async_engine(url, policy=policy())
        if fault is not None:
            fault.install(engine.sync_engine)

        async def unit(handle):
            self.calls += 1
            for step in steps:
                if step in ("commit", "rollback"):
                    await getattr(handle, step)()
                elif step == ("swallow", "commit"):
                    with contextlib.suppress(ConfigurationError):
                        await handle.commit()
                elif isinstance(step, tuple) and step[0] == "apart":
                    own = handle.bind if self.kind == "session" else handle.engine
                    async with own.begin() as connection:
                        await connection.execute(step[1])
                elif isinstance(step, tuple):
                    async with handle.begin_nested():
                        await handle.execute(step[1])
                else:
                    await handle.execute(step)
            return "done"

        bind = engine if self.kind == "connection" else async_sessionmaker(engine)
        try:
            with fault.holes if fault is not None else contextlib.nullcontext():
                return await dropsafe.run_transaction_async(bind, unit)
        finally:
            await engine.dispose()


KINDS = ["session", "connection"]


@pytest.fixture(
    params=[(driver, face, kind) for driver, face in FACES for kind in KINDS],
    ids=[f"{face_id}-{kind}" for face_id in FACE_IDS for kind in KINDS],
)
def unit(request, server):
    """A unit of work over one engine: every driver's face, through a session or a connection."""
    return OneEngine(server, *request.param)


def test_a_unit_that_commits_itself_is_refused_before_its_commit(server, kernel_blackhole, unit):
    # The unit commits, autobegin opens the next transaction, the unit writes more; the final
    # COMMIT is lost both ways, so the fenced backend rolls it back and the unit runs again:
    # the part before its own COMMIT would be written twice. Refused before that COMMIT.
    first, second = next(_VALUES), next(_VALUES)
    fault = LoseCommitReply(kernel_blackhole, nth=2, direction="both")
    steps = [ONE.insert().values(v=first), "commit", ONE.insert().values(v=second)]
    outcome = _outcome(unit, steps, fault)
    rows = (count(server, ONE, first), count(server, ONE, second))
    _assert_refused_not_acknowledged(outcome, rows, unit)
    assert "committed its own transaction" in outcome
    assert (rows, unit.calls, fault.sent) == ((0, 0), 1, 0)


def test_a_unit_that_swallows_the_refusal_of_its_own_commit_is_still_refused(server, unit):
    first, second = next(_VALUES), next(_VALUES)
    with pytest.raises(ConfigurationError, match="committed its own transaction"):
        unit.run(
            [ONE.insert().values(v=first), ("swallow", "commit"), ONE.insert().values(v=second)]
        )
    assert (count(server, ONE, first), count(server, ONE, second), unit.calls) == (0, 0, 1)


def test_a_savepoint_is_not_a_commit(server, kernel_blackhole, unit):
    # begin_nested() releases a SAVEPOINT, which is no COMMIT; the final COMMIT's reply is
    # lost and resolved: the row exists once, the unit ran once.
    value = next(_VALUES)
    fault = LoseCommitReply(kernel_blackhole, nth=1)
    assert unit.run([("nested", ONE.insert().values(v=value))], fault) == "done"
    assert fault.struck
    assert (count(server, ONE, value), unit.calls) == (1, 1)


def test_work_after_a_rollback_in_the_unit_is_committed_once(server, kernel_blackhole, unit):
    # The unit rolls back (say, after catching an error) and goes on: only what follows is
    # committed. The final COMMIT is lost both ways: fenced, aborted, the unit runs again.
    first, second = next(_VALUES), next(_VALUES)
    fault = LoseCommitReply(kernel_blackhole, nth=1, direction="both")
    result = unit.run(
        [ONE.insert().values(v=first), "rollback", ONE.insert().values(v=second)], fault
    )
    assert fault.struck
    assert result == "done"
    assert (count(server, ONE, first), count(server, ONE, second)) == (0, 1)
    assert unit.calls == 2


def test_a_commit_on_a_connection_the_function_opened_itself_is_not_refused(server, unit):
    # Outside the unit (an audit row meant to survive its rollback): committed as the app
    # asked, not retried with the unit, and not refused.
    apart, inside = next(_VALUES), next(_VALUES)
    result = unit.run([("apart", ONE.insert().values(v=apart)), ONE.insert().values(v=inside)])
    assert (result, count(server, ONE, apart), count(server, ONE, inside)) == ("done", 1, 1)


# -- a NOTIFY on the engine that wrote nothing, committed before the writer's lost COMMIT -------


@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_a_notify_committed_before_the_writer_s_lost_commit_is_heard_once(
    server, kernel_blackhole, driver, face
):
    # The engine that only notifies is committed first (SQLAlchemy follows no set order: tried
    # until it is), then the writer's COMMIT is lost on the way and fenced: aborted. Running the
    # unit again would send the notification a second time. (A text statement goes to the
    # main bind: the notifier is ONE's engine, the writer TWO's.)
    writer, notifier_db = TWO, "db_one"
    for _ in range(12):
        value = next(_VALUES)
        listener = listen(server, database=notifier_db)
        unit = TwoEngines(server, driver, face)
        fault = LoseCommitReply(kernel_blackhole, nth=2, direction="both")
        outcome = "acknowledged"
        try:
            unit.run(
                lambda execute, value=value: (
                    execute(sa.text(f"SELECT pg_notify('dropsafe_test', '{value}')")),
                    execute(writer.insert().values(v=value)),
                ),
                fault,
            )
        except dropsafe.CommitOutcomeUnknown:
            outcome = "unknown"
        heard = heard_until_end(listener, server, database=notifier_db)[:-1]
        listener.close()
        if fault.struck_database != notifier_db:  # the writer's COMMIT was the lost one
            break
    else:
        pytest.skip("SQLAlchemy committed the writer first in every trial")
    rows = count(server, writer, value)
    assert heard.count(str(value)) <= 1, f"heard {heard}, rows {rows}, runs {unit.calls}"
    # The writer's COMMIT never arrived: aborted, and the notification was delivered.
    assert (outcome, rows, heard, unit.calls) == ("unknown", 0, [str(value)], 1)


# -- an engine a routing session reaches is watched as the unit's own -------------------------


@pytest.mark.parametrize(("driver", "face"), FACES, ids=FACE_IDS)
def test_an_autocommit_engine_a_routing_session_reaches_is_refused(server, driver, face):
    # A Session with its own get_bind flushes a row to an AUTOCOMMIT engine the sessionmaker
    # does not name, then the function fails (the app's error). Under AUTOCOMMIT the row
    # committed on its own: an error with an effect, and a unit run again writes it twice.
    # Refused before the INSERT is sent, as on the unit's own engine.
    value = next(_VALUES)
    urls = [server.url(driver, database=db) for db in ("db_one", "db_two")]

    class AppError(Exception):
        pass

    def work(session):
        session.execute(sa.select(ONE.c.v).limit(1))
        session.add(TwoRow(value))
        return session.flush()

    if face == "sync":
        one = dropsafe.create_engine(urls[0], policy=policy())
        two = dropsafe.create_engine(urls[1], policy=policy(), isolation_level="AUTOCOMMIT")

        def unit(session):
            work(session)
            raise AppError

        try:
            factory = sessionmaker(bind=one, info={"two": two}, class_=RoutingSession)
            with pytest.raises((ConfigurationError, AppError)) as raised:
                dropsafe.run_transaction(factory, unit)
        finally:
            one.dispose()
            two.dispose()
    else:

        async def run_async():
            one = dropsafe.create_async_engine(urls[0], policy=policy())
            two = dropsafe.create_async_engine(
                urls[1], policy=policy(), isolation_level="AUTOCOMMIT"
            )

            async def unit(session):
                await session.run_sync(work)
                raise AppError

            try:
                factory = async_sessionmaker(
                    bind=one, info={"two": two.sync_engine}, sync_session_class=RoutingSession
                )
                await dropsafe.run_transaction_async(factory, unit)
            finally:
                await one.dispose()
                await two.dispose()

        with pytest.raises((ConfigurationError, AppError)) as raised:
            asyncio.run(run_async())
    written = count(server, TWO, value)
    assert (raised.type.__name__, written) == ("ConfigurationError", 0), raised.value
    assert "AUTOCOMMIT" in str(raised.value)


# -- a raw commit() on one engine's connection, then the other engine's COMMIT lost ------------


class LoseCommitOf(LoseCommitReply):
    """`LoseCommitReply` on ``database``'s engine only: its first COMMIT never arrives."""

    def __init__(self, kernel_blackhole, database):
        super().__init__(kernel_blackhole, nth=1, direction="both")
        self.database = database

    def install(self, *engines):
        super().install(*(e for e in engines if e.url.database == self.database))


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_raw_commit_on_one_engine_then_the_other_engines_lost_commit_never_runs_it_again(
    server, kernel_blackhole, driver
):
    """A unit over two engines: a read of TWO (its connection begins first, so SQLAlchemy
    commits it first), an INSERT on ONE (its xid read in flight), ONE's DBAPI connection's own
    commit() (the row committed), an INSERT on TWO; TWO's COMMIT never arrives (fenced,
    aborted). Before session 16 the marks of a unit over several connections noted no read the
    function had ended itself: the unit ran again, ONE's row twice (psycopg2). Now ONE's
    dropped read is asked about on ONE's own server before a rerun: committed by the app,
    `CommitOutcomeUnknown` (reason APP_COMMITTED), run once."""
    one, two = next(_VALUES), next(_VALUES)
    unit = TwoEngines(server, driver, "sync")
    fault = LoseCommitOf(kernel_blackhole, "db_two")

    def work(execute):
        session = execute.__self__
        execute(sa.select(TWO.c.v).limit(1))
        execute(ONE.insert().values(v=one))
        session.connection().connection.dbapi_connection.commit()
        execute(TWO.insert().values(v=two))

    outcome = "acknowledged"
    try:
        unit.run(work, fault)
    except dropsafe.CommitOutcomeUnknown as unknown:
        outcome = unknown.reason
    rows = (count(server, ONE, one), count(server, TWO, two))
    assert fault.struck
    # Whichever engine SQLAlchemy commits first, the app's own commit is asked about before
    # the rule for a connection committed before the writer's lost COMMIT ("another
    # connection committed before": said of a NOTIFY too, it says less).
    assert (outcome, unit.calls, rows) == (APP_COMMITTED, 1, (1, 0))
