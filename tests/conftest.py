from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest

from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine

pytest_plugins = ["pytester"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests marked ``last`` after all others (the leftovers check must see the end)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[PostgresServer]:
    """One TLS server for a module whose tests do not stop or break it."""
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
