"""Server-side session kills and server errors, classified the same by every driver and language.

The server itself ends sessions here: idle_in_transaction_session_timeout (25P03) and
idle_session_timeout (57P05) fire for real, and pg_terminate_backend (57P01). Each reaches the
client in its driver's own way (psycopg 3 and pg8000 read the SQLSTATE; psycopg2 over TLS and
asyncpg only see the connection closed), and each must be a retryable DISCONNECT. The same
errors from a server whose messages are in German (lc_messages) must be classified exactly as
from an English one: the SQLSTATE decides, never the English text.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe import ErrorKind, classify
from dropsafe.testing import PostgresServer

pytestmark = pytest.mark.fault

DRIVERS = ["psycopg2", "psycopg", "asyncpg", "pg8000"]
GERMAN = "de_DE.UTF-8"
# name: (statements, the kind); "TERMINATE"/"WAIT-GONE" are steps of the test, not SQL.
CASES: dict[str, tuple[list[str], ErrorKind]] = {
    "idle-in-transaction-timeout": (
        [
            "SET idle_in_transaction_session_timeout = '100ms'",
            "SELECT 1",  # in a transaction now (SQLAlchemy began one)
            "WAIT-GONE",
            "SELECT 1",
        ],
        ErrorKind.DISCONNECT,
    ),
    "idle-session-timeout": (
        ["SET idle_session_timeout = '100ms'", "COMMIT", "WAIT-GONE", "SELECT 1"],
        ErrorKind.DISCONNECT,
    ),
    "terminated": (["SELECT 1", "TERMINATE", "SELECT 1"], ErrorKind.DISCONNECT),
    "serialization": (
        ["DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END $$"],
        ErrorKind.TRANSIENT,
    ),
    "syntax": (["SELEC 1"], ErrorKind.PERMANENT),
    "unique": (
        ["CREATE TEMP TABLE u (v int UNIQUE)", "INSERT INTO u VALUES (1), (1)"],
        ErrorKind.PERMANENT,
    ),
    "read-only": (["SET TRANSACTION READ ONLY", "CREATE TABLE nope (v int)"], ErrorKind.PERMANENT),
    "xid-in-the-future": (["SELECT pg_xact_status('9999999999'::xid8)"], ErrorKind.PERMANENT),
}


def _has_locale(name: str) -> bool:
    listed = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
    wanted = name.lower().replace("utf-8", "utf8")
    return any(line.lower().replace("utf-8", "utf8") == wanted for line in listed.split())


@pytest.fixture(scope="module", params=["C", GERMAN])
def server(request):
    if request.param != "C" and not _has_locale(request.param):
        pytest.skip(f"no {request.param} locale: run scripts/setup.sh as root")
    with PostgresServer(settings={"lc_messages": f"'{request.param}'"}) as server:
        yield server


def _wait_gone(server: PostgresServer, pid: int) -> None:
    """Wait (bounded) until the server ended the backend ``pid`` on its own."""
    deadline = time.monotonic() + 10
    query = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
    while server.execute(query) != [("0",)]:
        assert time.monotonic() < deadline, f"backend {pid} was not ended by the server"
        time.sleep(0.02)


def _errors_sync(server, driver):
    engine = dropsafe.create_engine(server.url(driver), connect_args=server.connect_args(driver))
    found = {}
    try:
        for name, (steps, _) in CASES.items():
            try:
                with engine.connect() as conn:
                    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                    for step in steps:
                        if step == "WAIT-GONE":
                            _wait_gone(server, pid)
                        elif step == "TERMINATE":
                            server.terminate_backends()
                        elif step == "COMMIT":
                            conn.commit()
                        else:
                            conn.exec_driver_sql(step)
            except Exception as exc:  # noqa: PERF203 - each case fails on its own
                found[name] = exc
    finally:
        engine.dispose()
    return found


async def _errors_async(server):
    engine = dropsafe.create_async_engine(server.url("asyncpg"))
    found = {}
    try:
        for name, (steps, _) in CASES.items():
            try:
                async with engine.connect() as conn:
                    pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
                    for step in steps:
                        if step == "WAIT-GONE":
                            await asyncio.to_thread(_wait_gone, server, pid)
                        elif step == "TERMINATE":
                            await asyncio.to_thread(server.terminate_backends)
                        elif step == "COMMIT":
                            await conn.commit()
                        else:
                            await conn.exec_driver_sql(step)
            except Exception as exc:  # noqa: PERF203 - each case fails on its own
                found[name] = exc
    finally:
        await engine.dispose()
    return found


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_driver_and_language_classifies_alike(server, driver):
    if driver == "asyncpg":
        errors = asyncio.run(_errors_async(server))
    else:
        errors = _errors_sync(server, driver)
    assert set(errors) == set(CASES), "every case must have failed"
    got = {name: classify(error) for name, error in errors.items()}
    expected = {name: kind for name, (_, kind) in CASES.items()}
    assert got == expected, {name: repr(errors[name])[:200] for name in got}
    if "de" in server.settings["lc_messages"] and driver != "asyncpg":
        # The server really speaks German (asyncpg's wrapper shows the same text).
        assert "Syntaxfehler" in str(errors["syntax"]), str(errors["syntax"])


IDLE_TIMEOUT = "SET idle_in_transaction_session_timeout = '100ms'"
BACKEND_PID = sa.text("SELECT pg_backend_pid()")
ANSWER = sa.text("SELECT 42")


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_unit_killed_by_the_idle_in_transaction_timeout_runs_again(shared_server, driver):
    """run_transaction runs the unit again after the server ended its idle session."""
    calls = []
    if driver == "asyncpg":

        async def unit(conn):
            calls.append(1)
            if len(calls) == 1:  # idle in the transaction until the server ends the session
                await conn.exec_driver_sql(IDLE_TIMEOUT)
                pid = (await conn.execute(BACKEND_PID)).scalar()
                await asyncio.to_thread(_wait_gone, shared_server, pid)
            return (await conn.execute(ANSWER)).scalar()

        async def main():
            engine = dropsafe.create_async_engine(shared_server.url(driver))
            try:
                with dropsafe.test_mode():
                    return await dropsafe.run_transaction_async(engine, unit)
            finally:
                await engine.dispose()

        result = asyncio.run(main())
    else:

        def unit(conn):
            calls.append(1)
            if len(calls) == 1:  # idle in the transaction until the server ends the session
                conn.exec_driver_sql(IDLE_TIMEOUT)
                _wait_gone(shared_server, conn.execute(BACKEND_PID).scalar())
            return conn.execute(ANSWER).scalar()

        engine = dropsafe.create_engine(
            shared_server.url(driver), connect_args=shared_server.connect_args(driver)
        )
        try:
            with dropsafe.test_mode():
                result = dropsafe.run_transaction(engine, unit)
        finally:
            engine.dispose()
    assert result == 42
    assert len(calls) == 2
