"""Shared by the tests of COMMITs under faults: a slow COMMIT on demand, a watcher that strikes
while it runs, a reply lost on its way back, a strike once the COMMIT is done, and a unit of
work run the same way through psycopg2, psycopg 3 or asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import select
import signal
import socket
import threading
import time

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe._unit import dialect_hooks
from dropsafe._unit.recording import watch_engine
from dropsafe.events import CommitResolved
from dropsafe.testing import ServerError

# A deferred constraint trigger that sleeps makes COMMIT slow: a fault during it hits a COMMIT
# the server is still working on (``SET LOCAL test.commit_sleep = '2'`` in the transaction).


def slow_commit_schema(table, *, unique=False):
    """A table of ints whose COMMITs take ``test.commit_sleep`` seconds.

    Without ``unique`` a duplicate write shows as a second row; with it, as an error.
    """
    return f"""
CREATE TABLE {table} (v int NOT NULL{" UNIQUE" if unique else ""});
CREATE FUNCTION slow_commit_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  PERFORM pg_sleep(coalesce(nullif(current_setting('test.commit_sleep', true), '')::float, 0));
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table}
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit_{table}();
"""


SLOW_COMMIT_SCHEMA = slow_commit_schema("ledger")
COMMIT_RUNNING = "SELECT pid FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' AND state = 'active'"


def insert(value, commit_sleep=0.0):
    """The statements of a unit of work that writes ``value``, with a COMMIT this slow."""
    return [
        f"SET LOCAL test.commit_sleep = '{commit_sleep}'",
        f"INSERT INTO ledger VALUES ({int(value)})",
    ]


def rows(server, value):
    return int(server.execute(f"SELECT count(*) FROM ledger WHERE v = {int(value)}")[0][0])


class WhenCommitRuns(threading.Thread):
    """Run ``action`` once the server shows ``query`` returning a row (within 20 s)."""

    def __init__(self, server, action, query=COMMIT_RUNNING):
        super().__init__(daemon=True)
        self.server, self.action, self.query = server, action, query
        self.fired = False
        self.error = None
        self.start()

    def run(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.server.execute(self.query):
                try:
                    self.action()
                except BaseException as exc:
                    self.error = exc
                self.fired = True
                return

    def join(self, timeout=None):
        super().join(timeout)
        assert self.fired, "the fault never struck: no COMMIT was seen in progress"
        if self.error is not None:
            raise self.error


class Unit:
    """A unit of work run through dropsafe with one driver; counts its runs.

    Its steps are SQL texts, ``(text, parameters)`` pairs, or callables given the (sync)
    Session. ``driver`` is a face (`url_of`): ``psycopg-async`` is psycopg 3 through the async
    engine."""

    def __init__(self, driver, url, statements, *, policy, session_class=Session, **engine_kw):
        self.driver, self.url, self.statements = driver, url, statements
        self.policy, self.session_class, self.engine_kw = policy, session_class, engine_kw
        self.calls = 0
        self.elapsed = None

    def run(self, before_commit=None):
        """Run the unit; ``before_commit(engine)`` may add listeners after dropsafe's own."""
        started = time.monotonic()
        try:
            if self.driver in {"asyncpg", "psycopg-async"}:
                return asyncio.run(self._run_async(before_commit))
            return self._run_sync(before_commit)
        finally:
            self.elapsed = time.monotonic() - started

    def _run_sync(self, before_commit):
        engine = dropsafe.create_engine(self.url, policy=self.policy, **self.engine_kw)
        if before_commit is not None:
            before_commit(engine)

        def unit(session):
            self.calls += 1
            for step in self.statements:
                if callable(step):
                    step(session)
                elif isinstance(step, tuple):
                    session.execute(sa.text(step[0]), step[1])
                else:
                    session.execute(sa.text(step))
            return "done"

        try:
            factory = sessionmaker(engine, class_=self.session_class)
            return dropsafe.run_transaction(factory, unit)
        finally:
            engine.dispose()

    async def _run_async(self, before_commit):
        engine = dropsafe.create_async_engine(self.url, policy=self.policy, **self.engine_kw)
        if before_commit is not None:
            before_commit(engine.sync_engine)

        async def unit(session):
            self.calls += 1
            for step in self.statements:
                if callable(step):
                    await session.run_sync(step)
                elif isinstance(step, tuple):
                    await session.execute(sa.text(step[0]), step[1])
                else:
                    await session.execute(sa.text(step))
            return "done"

        try:
            factory = async_sessionmaker(engine, sync_session_class=self.session_class)
            return await dropsafe.run_transaction_async(factory, unit)
        finally:
            await engine.dispose()


def url_of(server, driver):
    """The server's URL for a `Unit`'s face (``psycopg-async``: psycopg 3's, run async)."""
    return server.url(driver.removesuffix("-async"))


class PoolerErrorAtCommit:
    """A plaintext middlebox that answers the first COMMIT with a pooler's own FATAL error.

    It forwards the COMMIT, waits for the server's reply (so the COMMIT did take effect), and
    sends the client ``FATAL 08P01 server conn crashed?`` instead, as PgBouncer does when it
    loses its server connection, then closes. A real server, a real COMMIT, a real error on
    the wire: only the decision of the client is under test.
    """

    _FIELDS = b"SFATAL\x00VFATAL\x00C08P01\x00Mserver conn crashed?\x00\x00"
    ERROR = b"E" + (4 + len(_FIELDS)).to_bytes(4, "big") + _FIELDS

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.struck = threading.Event()
        self.links = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._link, "127.0.0.1", 0), self.loop
        ).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self):
        async def stop():
            self.server.close()
            for task in list(self.links):
                task.cancel()  # links still open (the client's, the resolver's): end them
            await asyncio.gather(*self.links, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _link(self, client_reader, client_writer):
        task = asyncio.current_task()
        self.links.add(task)
        server_writer = None
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
            await self._forward(client_reader, client_writer, server_reader, server_writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
            self.links.discard(task)

    async def _forward(self, client_reader, client_writer, server_reader, server_writer):
        commit_sent = asyncio.Event()

        async def to_server():
            while data := await client_reader.read(65536):
                if not self.struck.is_set() and b"COMMIT" in data:
                    commit_sent.set()
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def to_client():
            while data := await server_reader.read(65536):
                if commit_sent.is_set() and not self.struck.is_set():
                    self.struck.set()  # the server's reply to COMMIT: swallowed
                    client_writer.write(self.ERROR)
                    await client_writer.drain()
                    break
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()
            server_writer.close()

        await asyncio.gather(to_server(), to_client())


class Recorder(list):
    """A hook that keeps every event; ``outcomes()`` the resolutions' answers."""

    def __call__(self, event):
        self.append(event)

    def outcomes(self):
        return [event.outcome for event in self if isinstance(event, CommitResolved)]


def wait_until(condition, timeout, what):
    """Wait until ``condition()`` is true (a server error counts as not yet), or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ServerError):
            if condition():
                return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def libpq_url(server, **url_kw):
    """The server's URL as libpq (and psycopg2.connect) reads it."""
    return server.url("psycopg2", **url_kw).replace("postgresql+psycopg2", "postgresql")


def listen(server, **url_kw):
    """A psycopg2 connection that listens on ``dropsafe_test``."""
    listener = psycopg2.connect(libpq_url(server, **url_kw))
    listener.autocommit = True
    listener.cursor().execute("LISTEN dropsafe_test")
    return listener


def heard_until_end(listener, server, **execute_kw):
    """Every payload ``listener`` hears up to a last one, ``end``, sent now (delivered after
    the rest, and the last in the list)."""
    server.execute("NOTIFY dropsafe_test, 'end'", **execute_kw)
    payloads = []
    deadline = time.monotonic() + 20
    while "end" not in payloads and time.monotonic() < deadline:
        select.select([listener], [], [], deadline - time.monotonic())
        listener.poll()
        payloads += [notify.payload for notify in listener.notifies]
        listener.notifies.clear()
    return payloads


def local_port(engine_connection):
    """The client side's port of a pooled connection's socket."""
    driver_connection = engine_connection.connection.driver_connection
    transport = getattr(driver_connection, "_transport", None)
    if transport is not None:  # asyncpg
        return transport.get_extra_info("sockname")[1]
    # psycopg2's and psycopg 3's own connections (its async one too: not SQLAlchemy's adapter)
    with socket.socket(fileno=os.dup(driver_connection.fileno())) as sock:
        return sock.getsockname()[1]


def backend_pid(engine_connection):
    """The server process behind a pooled connection, asked of its driver."""
    driver_connection = engine_connection.connection.driver_connection
    get_pid = getattr(driver_connection, "get_server_pid", None)  # asyncpg
    if get_pid is not None:
        return get_pid()
    info = getattr(driver_connection, "info", None)  # psycopg 3
    if info is not None and hasattr(info, "backend_pid"):
        return info.backend_pid
    return driver_connection.get_backend_pid()  # psycopg2


def lose_the_reply_then(holes, kernel_blackhole, server, action, strikes):
    """``before_commit`` for ``Unit.run``: the first COMMIT's reply lost (``lose_the_first_reply``),
    then ``action`` run once the server has done that COMMIT (``once_the_commit_is_done``)."""
    lose_the_reply = lose_the_first_reply(holes, kernel_blackhole)

    def install(engine):
        lose_the_reply(engine)
        once_the_commit_is_done(engine, server, action, strikes)

    return install


class _OnCheckout:
    """What `local_port` and `backend_pid` read of a Connection: its pool checkout."""

    def __init__(self, checkout):
        self.connection = checkout


def right_before_commit(engine, action):
    """Run ``action(connection)`` right before each COMMIT on ``engine`` is sent, after
    dropsafe's mark: the mark is read inside the dialect's ``do_commit``
    (`dropsafe._unit.dialect_hooks`), so an engine ``commit`` listener would run before it.
    Put under the unit's hooks: they wrap what the dialect had when the first unit ran, so
    on an engine that ran one this goes in their place (the closure's ``commit``)."""
    dialect = engine.dialect
    hooked = dialect.do_commit if dialect_hooks.hooked(dialect) else None
    cell = None
    if hooked is not None:
        cells = dict(zip(hooked.__code__.co_freevars, hooked.__closure__, strict=True))
        cell = cells["commit"]
    commit = dialect.do_commit if cell is None else cell.cell_contents

    def do_commit(dbapi_connection):
        action(_OnCheckout(dbapi_connection))
        commit(dbapi_connection)

    if cell is None:
        vars(dialect)["do_commit"] = do_commit
    else:
        cell.cell_contents = do_commit


def lose_the_first_reply(holes, kernel_blackhole, direction="to"):
    """After dropsafe's mark: COMMIT goes out next, into a one-way blackhole."""

    def install(engine):
        def cut_off(connection):
            if not holes._exit_callbacks:
                port = local_port(connection)
                holes.enter_context(kernel_blackhole(port, direction=direction))

        right_before_commit(engine, cut_off)
        watch_engine(engine)  # its hooks around this one: the mark is read before the cut

    return install


def once_the_commit_is_done(engine, server, action, strikes):
    """At the engine's first COMMIT, a thread (in ``strikes``) that waits until the server has
    done it (its backend idle again, within 20 s), then runs ``action``."""

    @sa.event.listens_for(engine, "commit")
    def strike_after_it(connection):
        if strikes:
            return
        pid = backend_pid(connection)

        def strike():
            wait_until(
                lambda: server.execute(
                    f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND state = 'idle'"
                ),
                20,
                "the COMMIT to be done on the server",
            )
            action()

        strikes.append(threading.Thread(target=strike, daemon=True))
        strikes[0].start()


def resolving_policy(recorder):
    """A unit's policy whose lost COMMIT replies are noticed in 2 s and resolved within 20 s."""
    return dropsafe.Policy(
        connection=dropsafe.ConnectionPolicy(tcp_user_timeout=2),
        unit=dropsafe.UnitPolicy(commit_status_timeout=20, deadline=40),
        hooks=(recorder,),
    )


def heard_with_the_commit_reply_lost(server, kernel_blackhole, driver, statements, **options):
    """Run a unit of ``statements`` whose first COMMIT reply is lost (noticed in 2 s), a
    listener on ``server``: what the listener heard (up to ``end``), how many times the unit
    ran, the resolver's outcomes. ``url`` (default the server's) and ConnectionPolicy fields
    go in ``options``."""
    url = options.pop("url", None) or server.url(driver)
    recorder = Recorder()
    connection = dropsafe.ConnectionPolicy(tcp_user_timeout=2, **options)
    unit = Unit(
        driver, url, statements, policy=dropsafe.Policy(connection=connection, hooks=(recorder,))
    )
    listener = listen(server)
    holes = contextlib.ExitStack()
    try:
        with holes:
            assert unit.run(before_commit=lose_the_first_reply(holes, kernel_blackhole)) == "done"
        payloads = heard_until_end(listener, server)
    finally:
        listener.close()
    return payloads, unit.calls, recorder.outcomes()


def struck_once_the_commit_is_done(  # noqa: PLR0917 - the fixtures, the unit, the strike
    server, kernel_blackhole, driver, statements, action, pool=None
):
    """Run a unit of ``statements`` (``resolving_policy``, with ``pool`` if given) whose first
    COMMIT reply is lost, and ``action`` once the server has done that COMMIT: ("acknowledged"
    or "unknown", how many times the unit ran, the resolver's outcomes)."""
    recorder = Recorder()
    policy = resolving_policy(recorder)
    if pool is not None:
        policy = dataclasses.replace(policy, pool=pool)
    unit = Unit(driver, url_of(server, driver), statements, policy=policy)
    holes = contextlib.ExitStack()
    strikes = []
    strike_once_committed = lose_the_reply_then(holes, kernel_blackhole, server, action, strikes)
    outcome = "acknowledged"
    try:
        with holes:
            unit.run(before_commit=strike_once_committed)
    except dropsafe.CommitOutcomeUnknown:
        outcome = "unknown"
    strikes[0].join(30)
    return outcome, unit.calls, recorder.outcomes()


def crash_once_the_commit_is_done(server, kernel_blackhole, driver, statements, pool=None):
    """``struck_once_the_commit_is_done`` with a crash restart (a backend SIGKILLed: every
    backend reset) as the strike."""
    bystander = psycopg2.connect(libpq_url(server))
    bystander_pid = bystander.get_backend_pid()
    try:
        return struck_once_the_commit_is_done(
            server,
            kernel_blackhole,
            driver,
            statements,
            lambda: os.kill(bystander_pid, signal.SIGKILL),
            pool,
        )
    finally:
        with contextlib.suppress(psycopg2.Error):
            bystander.close()


def committing_xid(server):
    """The xid of the COMMIT running on ``server`` now."""
    sql = "SELECT backend_xid FROM pg_stat_activity WHERE query ILIKE 'COMMIT%'"
    return int(server.execute(sql)[0][0])


def acknowledged_when_struck_at_commit(server, url, driver, strike):
    """Run a unit inserting 1 (a 3 s COMMIT, resolved within 30 s) through ``url``, ``strike``
    run while that COMMIT runs on ``server``: whether the unit was acknowledged, and the
    resolver's outcomes."""
    recorder = Recorder()
    policy = dropsafe.Policy(
        unit=dropsafe.UnitPolicy(commit_status_timeout=30, deadline=60), hooks=(recorder,)
    )
    unit = Unit(driver, url, insert(1, commit_sleep=3), policy=policy)
    watcher = WhenCommitRuns(server, strike)
    try:
        acknowledged = unit.run() == "done"
    except dropsafe.CommitOutcomeUnknown:
        acknowledged = False
    watcher.join(timeout=60)
    return acknowledged, recorder.outcomes()
