"""The examples in the API reference run as written (the reference page shows each one)."""

from __future__ import annotations

import asyncio
import re
import textwrap

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import sessionmaker

import dropsafe


def _example(function: object) -> str:
    match = re.search(r"Example::\n\n((?:[ ]{8}.*\n|\n)+)", getattr(function, "__doc__", ""))
    assert match, f"{function} has no Example:: block"
    return textwrap.dedent(match.group(1))


@pytest.fixture(scope="module")
def posts(shared_server):
    engine = sa.create_engine(shared_server.url("psycopg2"))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS docstring_posts (id serial PRIMARY KEY, title text)"
            )
        )
    engine.dispose()
    return shared_server


def test_run_transaction_async_example_runs(posts):
    engine = dropsafe.create_async_engine(posts.url("asyncpg"))

    async def create_post_async(session):
        insert = sa.text("INSERT INTO docstring_posts (title) VALUES ('hello') RETURNING id")
        return (await session.execute(insert)).scalar_one()

    code = _example(dropsafe.run_transaction_async)
    body = textwrap.indent(code, "    ")
    scope = {
        "dropsafe": dropsafe,
        "engine": engine,
        "async_sessionmaker": async_sessionmaker,
        "AsyncSession": AsyncSession,  # what the example named before
        "create_post_async": create_post_async,
    }
    exec(f"async def example():\n{body}\n    return post_id\n", scope)  # noqa: S102

    async def run():
        try:
            return await scope["example"]()
        finally:
            await engine.dispose()

    assert isinstance(asyncio.run(run()), int)


def test_run_transaction_example_runs(posts):
    engine = dropsafe.create_engine(posts.url("psycopg2"))

    def create_post(session, title):
        insert = sa.text("INSERT INTO docstring_posts (title) VALUES (:t) RETURNING id")
        return session.execute(insert, {"t": title}).scalar_one()

    scope = {"dropsafe": dropsafe, "Session": sessionmaker(engine), "create_post": create_post}
    exec(_example(dropsafe.run_transaction), scope)  # noqa: S102
    engine.dispose()
    assert isinstance(scope["post_id"], int)
