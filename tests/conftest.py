from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest

from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from dropsafe.testing._database import Database
    from dropsafe.testing._server import Driver

pytest_plugins = ["pytester"]

# The session's servers, ended before the leftovers check (tests marked last) looks.
_SESSION_SERVERS: list[PostgresServer] = []
# What a test that shares the session's server must not do to it: the next tests need it as is.
_BREAKS_THE_SERVER = frozenset(
    {"start", "stop", "restart", "close", "make_standby", "promote", "signal_backend"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests marked ``last`` after all others (the leftovers check must see the end)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """End the session's server before a ``last`` test: the leftovers check must find none."""
    if item.get_closest_marker("last"):
        while _SESSION_SERVERS:
            _SESSION_SERVERS.pop().close()


@pytest.fixture(scope="session")
def postgres_session_server() -> Iterator[PostgresServer]:
    """The plugin's session server, remembered so that it ends before the leftovers check."""
    with PostgresServer() as server:
        _SESSION_SERVERS.append(server)
        yield server


class SharedServer:
    """The session's server as one ``shares_server`` test sees it: its own database by default.

    It answers what such a test asks of `PostgresServer` (URLs, SQL, ``terminate_backends``,
    host and port, for ``chaos_proxy``), all aimed at the test's own fresh database, and
    refuses what would break the server for the tests after it (stop, restart, signals).
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.server = database.server

    def __repr__(self) -> str:
        return f"<SharedServer {self.database.name!r} on {self.server!r}>"

    def url(
        self, driver: Driver = "psycopg2", *, database: str | None = None, **params: str
    ) -> str:
        """The server's URL, to the test's own database unless told otherwise."""
        return self.server.url(driver, database=database or self.database.name, **params)

    def execute(self, sql: str, *, database: str | None = None) -> list[tuple[str, ...]]:
        """Run SQL as the superuser, in the test's own database unless told otherwise."""
        return self.server.execute(sql, database=database or self.database.name)

    def terminate_backends(self, *, database: str | None = None) -> int:
        """Terminate the client backends of the test's own database (no other test's)."""
        return self.server.terminate_backends(database=database or self.database.name)

    def __getattr__(self, name: str) -> object:
        if name in _BREAKS_THE_SERVER:
            raise AttributeError(
                f"{name}() would break the session's server for the tests after this one: "
                "a test that stops, restarts or signals its server must not be marked shares_server"
            )
        return getattr(self.server, name)


@pytest.fixture(scope="module")
def shared_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer | SharedServer]:
    """One database on the session's server for a module whose tests do not stop or break it;
    a server of the module's own where the module is marked ``own_server``."""
    if request.node.get_closest_marker("own_server"):
        with PostgresServer() as server:
            yield server
        return
    from dropsafe.testing._database import Database

    database = Database(request.getfixturevalue("postgres_session_server"))
    database.create()
    try:
        yield SharedServer(database)
    finally:
        database.drop()


@pytest.fixture
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer | SharedServer]:
    """A fresh TLS server per test; for tests marked ``shares_server``, a fresh database on the
    session's server instead (a CREATE DATABASE, not an initdb and a server start).

    ``chaos_proxy`` follows: it stands in front of whichever this gives.
    """
    if request.node.get_closest_marker("shares_server"):
        database: Database = request.getfixturevalue("postgres_database")
        yield SharedServer(database)
        return
    with PostgresServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after each test, so that a leaked socket fails the test that leaked it."""
    yield
    gc.collect()


class _Disposable(Protocol):
    def dispose(self) -> object: ...


EngineT = TypeVar("EngineT", bound=_Disposable)  # an Engine, or a bench target that disposes
AsyncEngineT = TypeVar("AsyncEngineT", bound="AsyncEngine")


@pytest.fixture
def disposing() -> Iterator[Callable[[EngineT], EngineT]]:
    """Dispose each engine handed to it when the test ends, pass or fail, the last one first.

    ``engine = disposing(dropsafe.create_engine(url))`` replaces a ``try/finally`` around the
    test. Its teardown runs before the function fixtures asked for before it (a server, a proxy)
    and before the garbage collection that catches leaked sockets. A test that disposes midway
    on purpose still calls ``dispose()`` itself (a second dispose is harmless).
    """
    with contextlib.ExitStack() as stack:

        def dispose_at_end(engine: EngineT) -> EngineT:
            stack.callback(engine.dispose)
            return engine

        yield dispose_at_end


@pytest.fixture
async def disposing_async() -> AsyncIterator[Callable[[AsyncEngineT], AsyncEngineT]]:
    """``disposing`` for async engines: each awaited ``dispose()`` on the test's event loop."""
    async with contextlib.AsyncExitStack() as stack:

        def dispose_at_end(engine: AsyncEngineT) -> AsyncEngineT:
            stack.push_async_callback(engine.dispose)
            return engine

        yield dispose_at_end
