from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import pytest

from dropsafe.testing import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Iterator

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
