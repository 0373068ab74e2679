"""The examples in the API reference run as written (the reference page shows each one)."""

from __future__ import annotations

import asyncio
import re
import textwrap

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

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


# Examples that need more than one server and a table: each says where it is run instead.
NOT_RUN_HERE = {
    "dropsafe.request_unit": "a FastAPI app: examples/fastapi_crud and its tests",
    "dropsafe.run_transaction_async": "awaited: test_run_transaction_async_example_runs above",
    "dropsafe.events.LoggingHook": "a log line, not code",
    "dropsafe.testing.PatroniCluster": "three nodes: tests/units/test_patroni.py",
    "dropsafe.testing.PgBouncer": "PgBouncer: tests/units/test_pgbouncer.py",
    "dropsafe.testing.multi_host_url": "a standby: tests/engine/test_host_order.py",
}


def _public_examples() -> dict[str, str]:
    """Every public name's ``Example::`` block (and its module's), as the reference shows it."""
    import importlib  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    found = {}
    for module_name in ("dropsafe", "dropsafe.events", "dropsafe.testing"):
        module = importlib.import_module(module_name)
        named = [(module_name, module)]
        named += [(f"{module_name}.{name}", getattr(module, name)) for name in module.__all__]
        for name, obj in named:
            doc = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
            match = re.search(r"^Example[^\n]*::\n\n((?:[ ]{4}.*\n|\n)+)", doc + "\n", re.MULTILINE)
            if match:
                found[name] = textwrap.dedent(match.group(1)).strip() + "\n"
    return found


def test_every_public_example_runs_or_says_where_it_does(posts, tmp_path):
    examples = _public_examples()
    assert set(NOT_RUN_HERE) <= set(examples)
    url = posts.url("psycopg2")
    engine = dropsafe.create_engine(url)

    class Base(DeclarativeBase):
        pass

    class Post(Base):
        __tablename__ = "docstring_published"
        id: Mapped[int] = mapped_column(primary_key=True)
        published: Mapped[bool] = mapped_column(default=False)

    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO docstring_published (id, published) VALUES (42, false)"))
    session_factory = sessionmaker(engine)

    def create_post(session, title="hello"):
        insert = sa.text("INSERT INTO docstring_posts (title) VALUES (:t) RETURNING id")
        return session.execute(insert, {"t": title}).scalar_one()

    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    ran = []
    for name, example in sorted(examples.items()):
        if name in NOT_RUN_HERE:
            continue
        with session_factory() as session:
            scope = {
                "dropsafe": dropsafe,
                "sqlalchemy": sa,
                "sessionmaker": sessionmaker,
                "url": url,
                "engine": engine,
                "server": posts,
                "Session": session_factory,
                "session": session,
                "create_post": create_post,
                "fn": lambda s: s.scalar(sa.text("SELECT 1")),
                "run_transaction": dropsafe.run_transaction,
                "Post": Post,
                "ErrorKind": dropsafe.ErrorKind,
                "metrics": None,
                **{n: getattr(dropsafe.events, n) for n in dropsafe.events.__all__},
                **{n: getattr(dropsafe.testing, n) for n in dropsafe.testing.__all__},
                "create_engine": sa.create_engine,
            }
            if name == "dropsafe.events.PrometheusHook":
                # One per registry: the example's own, not the process's global one.
                registry = CollectorRegistry()
                scope["registry"] = registry
            code = example.replace("PrometheusHook()", "PrometheusHook(registry)")
            # The examples' host is a placeholder: the test server instead (loopback only).
            code = code.replace('"postgresql+psycopg2://app@db.example/app"', repr(url))
            exec(compile(code, f"<{name} example>", "exec"), scope)  # noqa: S102
        ran.append(name)
    engine.dispose()
    # 17 of the 23 when this was written; a new example runs here or says where it does.
    assert sorted(ran) == sorted(set(examples) - set(NOT_RUN_HERE))
    assert len(ran) >= 17
