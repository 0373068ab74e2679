from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, settings

from dropsafe.testing import PostgresServer, leftover_processes
from dropsafe.testing._leftovers import leftover_rules

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine
    from xdist.workermanage import WorkerController

    from dropsafe.testing._database import Database
    from dropsafe.testing._server import Driver

pytest_plugins = ["pytester"]

# The session's servers, ended before the leftovers check (tests marked last) looks.
_SESSION_SERVERS: list[PostgresServer] = []
# What a test that shares the session's server must not do to it: the next tests need it as is.
_BREAKS_THE_SERVER = frozenset(
    {"start", "stop", "restart", "close", "make_standby", "promote", "signal_backend"}
)


# The property tests assert what a function gives, never how fast: Hypothesis's default 200 ms
# deadline per example failed one (317 ms) on a loaded 2-core machine, as the suite runs in CI.
# Speed is measured in benchmarks/.
settings.register_profile("dropsafe", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dropsafe")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, have the controller gather each worker's leftovers (see below)."""
    if config.pluginmanager.hasplugin("xdist") and not _is_worker(config):
        config.pluginmanager.register(_WorkersLeftovers(), "dropsafe-workers-leftovers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests marked ``last`` after all others (the leftovers check must see the end).

    An xdist worker drops them instead: one worker's ``last`` test would run while the others
    still work, see only its own processes, and end the server its later tests need. Each
    worker checks its own leftovers once its session has ended (`pytest_sessionfinish`).
    """
    if _is_worker(config):
        last = [item for item in items if item.get_closest_marker("last")]
        if last:
            config.hook.pytest_deselected(items=last)
            items[:] = [item for item in items if not item.get_closest_marker("last")]
        return
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """In an xdist worker, once its fixtures are torn down: hand its leftovers to the controller."""
    if _is_worker(session.config):
        output: dict[str, object] = session.config.workeroutput  # type: ignore[attr-defined]
        output[_LEFTOVERS_KEY] = leftover_processes() + leftover_rules()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


_LEFTOVERS_KEY = "dropsafe_leftovers"


class _WorkersLeftovers:
    """The leftovers check of a run split over xdist workers: it fails the run if any worker
    ended with a server process, proxy thread or kernel rule of dropsafe.testing still alive.

    Each worker's servers are its own children (they die with it), so only the worker can see
    them, after its last test (`pytest_sessionfinish` above); this gathers what they saw.
    """

    def __init__(self) -> None:
        self.found: list[str] = []

    def pytest_testnodedown(self, node: WorkerController) -> None:
        """Keep what a finished worker left (a crashed one sends nothing; its crash fails)."""
        output = getattr(node, "workeroutput", {})
        worker = node.gateway.id
        self.found.extend(f"{worker}: {line}" for line in output.get(_LEFTOVERS_KEY, ()))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Fail the run when a worker left something alive."""
        if self.found:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Name what was left, as the serial run's leftovers test would."""
        if self.found:
            terminalreporter.section("dropsafe leftovers after the workers ended", red=True)
            for line in self.found:
                terminalreporter.line(line, red=True)


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
