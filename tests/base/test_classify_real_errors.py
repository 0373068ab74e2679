"""classify() on the errors real servers and real faults raise, through each driver."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from dropsafe import ErrorKind, classify
from dropsafe._classify import sqlstate_of
from dropsafe.testing._runtime import closed_port

pytestmark = pytest.mark.fault

DRIVERS = ["psycopg2", "psycopg", "asyncpg", "pg8000"]
# name: (statements run in one transaction, the SQLSTATE the server reports, the kind)
STATEMENTS = {
    "raise-40001": (
        ["DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END $$"],
        "40001",
        ErrorKind.TRANSIENT,
    ),
    "raise-40P01": (
        ["DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40P01'; END $$"],
        "40P01",
        ErrorKind.TRANSIENT,
    ),
    "read-only": (
        ["SET TRANSACTION READ ONLY", "CREATE TABLE nope (v int)"],
        "25006",
        ErrorKind.PERMANENT,  # the user's own read-only transaction on a primary
    ),
    "unique": (
        ["CREATE TEMP TABLE u (v int UNIQUE)", "INSERT INTO u VALUES (1), (1)"],
        "23505",
        ErrorKind.PERMANENT,
    ),
    "syntax": (["SELEC 1"], "42601", ErrorKind.PERMANENT),
}


def _errors(server, proxy, driver, closed):
    """Run each failing statement and each fault through a plain engine; collect the errors.

    ``closed``: a port nothing listens on, for the refused connect.
    """
    url = proxy.route(server.url(driver))
    refused_url = server.url(driver).replace(f":{server.port}/", f":{closed}/")
    connect_args = server.connect_args(driver)

    if driver == "asyncpg":

        async def collect():
            found = {}

            async def attempt(name, target, statements, fault=None):
                engine = create_async_engine(target)
                try:
                    if fault:
                        async with engine.connect() as conn:
                            await conn.execute(sa.text("SELECT 1"))
                        fault()
                    async with engine.connect() as conn:
                        for sql in statements:
                            await conn.exec_driver_sql(sql)
                except Exception as exc:
                    found[name] = exc
                finally:
                    await engine.dispose()

            for name, (statements, _, _) in STATEMENTS.items():
                await attempt(name, url, statements)
            await attempt("terminated", url, ["SELECT 1"], server.terminate_backends)
            await attempt("cut", url, ["SELECT 1"], lambda: proxy.cut("rst"))
            await attempt("refused", refused_url, ["SELECT 1"])
            return found

        return asyncio.run(collect())

    found = {}

    def attempt(name, target, statements, fault=None):
        engine = sa.create_engine(target, connect_args=connect_args)
        try:
            if fault:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                fault()
            with engine.connect() as conn:
                for sql in statements:
                    conn.exec_driver_sql(sql)
        except Exception as exc:
            found[name] = exc
        finally:
            engine.dispose()

    for name, (statements, _, _) in STATEMENTS.items():
        attempt(name, url, statements)
    attempt("terminated", url, ["SELECT 1"], server.terminate_backends)
    attempt("cut", url, ["SELECT 1"], lambda: proxy.cut("rst"))
    attempt("refused", refused_url, ["SELECT 1"])
    return found


@pytest.mark.shares_server
@pytest.mark.parametrize("driver", DRIVERS)
def test_real_errors_are_classified(postgres_server, chaos_proxy, driver):
    with closed_port("127.0.0.1") as closed:
        errors = _errors(postgres_server, chaos_proxy, driver, closed)
    for name, (_, state, _) in STATEMENTS.items():
        assert sqlstate_of(errors[name]) == state, repr(errors[name])
    expected = {name: kind for name, (_, _, kind) in STATEMENTS.items()} | {
        "terminated": ErrorKind.DISCONNECT,
        "cut": ErrorKind.DISCONNECT,
        "refused": ErrorKind.FAILOVER,
    }
    assert set(errors) == set(expected), "every statement and fault must have failed"
    got = {name: classify(error) for name, error in errors.items()}
    assert got == expected, {name: repr(errors[name])[:200] for name in got}
    # The same lost connection, met while committing, is ambiguous.
    assert classify(errors["cut"], during_commit=True) is ErrorKind.COMMIT_UNKNOWN
