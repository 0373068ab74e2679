"""A known password goes through every fault scenario; it must appear in no output at all.

The needle is the test server's own password, which every URL to it carries.
Searched: every log record of every logger, every event, every error raised (message and repr,
with its causes), and the command line's output.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe
from dropsafe._cli import main as cli_main
from dropsafe.events import LoggingHook

pytestmark = pytest.mark.fault


def _error_texts(error):
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts += [str(error), repr(error)]
        error = error.__cause__ or error.__context__
    return texts


def _commit_cut(server, proxy):
    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if server.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' AND state = 'active'"
            ):
                proxy.cut("rst")
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_no_output_of_any_scenario_holds_the_password(postgres_server, chaos_proxy, caplog, capsys):  # noqa: PLR0915
    server, proxy = postgres_server, chaos_proxy
    server.execute(
        "CREATE TABLE t (v int); "
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$; "
        "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION slow();"
    )
    events, errors = [], []
    policy = dropsafe.Policy(
        unit=dropsafe.UnitPolicy(max_attempts=3), hooks=(LoggingHook(), events.append)
    )
    caplog.set_level(logging.DEBUG)
    password = server.password  # what the test searches for
    assert f":{password}@" in server.url()

    def attempt(action):
        try:
            action()
        except Exception as exc:
            errors.append(exc)

    url = proxy.route(server.url("psycopg2"))
    engine = dropsafe.create_engine(url, policy=policy)
    session_factory = sessionmaker(engine)
    insert = lambda s: s.execute(sa.text("INSERT INTO t VALUES (1)"))  # noqa: E731
    try:
        # Faults between requests, inside units of work, and during COMMIT.
        for fault in (
            lambda: proxy.cut("fin"),
            lambda: proxy.cut("rst"),
            server.terminate_backends,
            lambda: server.restart("fast"),
        ):
            attempt(lambda: dropsafe.run_transaction(session_factory, insert))
            fault()
            attempt(lambda: dropsafe.run_transaction(session_factory, insert))
        watcher = _commit_cut(server, proxy)
        attempt(lambda: dropsafe.run_transaction(session_factory, insert))
        watcher.join(timeout=20)
        # Refused connections until the retries run out.
        proxy.refuse()
        proxy.cut("rst")
        # Refused connects use up no attempts, only time: a short deadline ends them.
        short = dropsafe.UnitPolicy(deadline=1)
        with dropsafe.test_mode():
            attempt(lambda: dropsafe.run_transaction(session_factory, insert, policy=short))
        proxy.heal()
        # Ambiguous COMMIT without verification: CommitOutcomeUnknown.
        unverified = dropsafe.create_engine(
            url, policy=dropsafe.Policy(unit=dropsafe.UnitPolicy(verify_commits=False))
        )
        watcher = _commit_cut(server, proxy)
        attempt(lambda: dropsafe.run_transaction(sessionmaker(unverified), insert))
        watcher.join(timeout=20)
        unverified.dispose()
    finally:
        engine.dispose()

    # The same through asyncpg.
    async def async_scenario():
        aengine = dropsafe.create_async_engine(proxy.route(server.url("asyncpg")), policy=policy)
        factory = async_sessionmaker(aengine)

        async def ainsert(session):
            await session.execute(sa.text("INSERT INTO t VALUES (2)"))

        try:
            await dropsafe.run_transaction_async(factory, ainsert)
            await asyncio.to_thread(proxy.cut, "rst")
            await dropsafe.run_transaction_async(factory, ainsert)
        finally:
            await aengine.dispose()

    attempt(lambda: asyncio.run(async_scenario()))
    # Bad input naming the URL.
    attempt(lambda: dropsafe.create_engine(url.replace("postgresql+psycopg2", "postgresql+nope")))
    attempt(lambda: dropsafe.create_engine(url.replace("://", ":/")))
    attempt(lambda: dropsafe.create_async_engine(url))
    cli_main(["reproduce"])

    assert any(isinstance(e, sa.exc.OperationalError) for e in errors)  # out of time
    assert any(isinstance(e, dropsafe.CommitOutcomeUnknown) for e in errors)
    assert any(isinstance(e, dropsafe.ConfigurationError) for e in errors)
    assert len(events) >= 5
    haystack = [record.getMessage() for record in caplog.records]
    haystack += [str(record.exc_info) for record in caplog.records if record.exc_info]
    haystack += [repr(event) for event in events]
    haystack += [text for error in errors for text in _error_texts(error)]
    output = capsys.readouterr()
    haystack += [output.out, output.err]
    leaks = [text for text in haystack if password in text]
    assert leaks == []
    # Nor any other password (`reproduce` ran a server of its own): only masks and placeholders.
    unmasked = re.compile(r"://[^\s/@:]*:(?!\*\*\*@|password@)[^\s/@]+@")
    assert [text for text in haystack if unmasked.search(text)] == []
