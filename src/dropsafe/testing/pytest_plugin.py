"""pytest plugin: fixtures for real PostgreSQL servers and network faults, registered on install.

Fixtures: ``postgres_server`` (a fresh TLS server per test), ``chaos_proxy`` (a proxy in front
of it) and ``kernel_blackhole`` (drops a port's packets in the kernel; skips where it cannot
run, or fails when ``DROPSAFE_REQUIRE_KERNEL_FAULTS=1``, as in CI). Markers: ``slow`` and
``fault``; a ``fault`` test without its own timeout gets ``DEFAULT_FAULT_TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from dropsafe.testing._kernel import kernel_blackhole as _kernel_blackhole
from dropsafe.testing._kernel import kernel_blackhole_unavailable
from dropsafe.testing._proxy import ChaosProxy
from dropsafe.testing._server import PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

DEFAULT_FAULT_TIMEOUT = 120


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers."""
    config.addinivalue_line("markers", "slow: takes seconds or more")
    config.addinivalue_line(
        "markers", f"fault: injects a real fault; bounded by {DEFAULT_FAULT_TIMEOUT}s by default"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Bound every fault test in time unless it sets its own timeout."""
    for item in items:
        if item.get_closest_marker("fault") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(DEFAULT_FAULT_TIMEOUT))


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """Give each test a fresh PostgreSQL server with TLS on, removed after the test."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def chaos_proxy(postgres_server: PostgresServer) -> Iterator[ChaosProxy]:
    """Put a `ChaosProxy` in front of ``postgres_server``; route URLs with ``.route``."""
    with ChaosProxy(postgres_server.host, postgres_server.port) as proxy:
        yield proxy


@pytest.fixture
def kernel_blackhole() -> Callable[[int], AbstractContextManager[None]]:
    """`dropsafe.testing.kernel_blackhole`, or a skip saying why it cannot run here."""
    reason = kernel_blackhole_unavailable()
    if reason is not None:
        if os.environ.get("DROPSAFE_REQUIRE_KERNEL_FAULTS") == "1":
            pytest.fail(f"DROPSAFE_REQUIRE_KERNEL_FAULTS=1 but {reason}")
        pytest.skip(reason)
    return _kernel_blackhole
