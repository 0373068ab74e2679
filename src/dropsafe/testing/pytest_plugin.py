"""pytest plugin: the bench's fixtures and markers, loaded into every run once installed.

Fixtures: ``postgres_server`` (per test), ``postgres_session_server`` and ``postgres_database``
(a fresh database per test on a shared server), ``chaos_proxy``, ``kernel_blackhole``,
``idle_reaper``, ``patroni_cluster`` (per module); they skip where they cannot run, or fail
with ``DROPSAFE_REQUIRE_KERNEL_FAULTS=1``. Markers ``dropsafe_slow`` and ``dropsafe_fault``
(prefixed: a user's own ``slow`` is theirs); with pytest-timeout a fault test gets
``DEFAULT_FAULT_TIMEOUT`` seconds unless it sets its own.

Loaded into every suite of every project that has dropsafe installed, so loading must be cheap
and must not fail: it imports only pytest and the standard library (about 80 ms with pytest's
own import; tests/base/test_public_api.py checks it), and uses pytest-timeout's marker only
when that plugin is there (``--strict-markers`` would otherwise break the user's collection).
"""

# The fixtures import the bench when they run, never when pytest loads this plugin (above).

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

    from dropsafe.testing._database import Database
    from dropsafe.testing._middlebox import IdleReaper
    from dropsafe.testing._patroni import PatroniCluster
    from dropsafe.testing._proxy import ChaosProxy
    from dropsafe.testing._server import PostgresServer

DEFAULT_FAULT_TIMEOUT = 120
# The markers' names: prefixed, so that they never meet a user's own.
FAULT = "dropsafe_fault"
SLOW = "dropsafe_slow"

# The name pytest-timeout registers itself under (its pytest11 entry point).
_TIMEOUT_PLUGIN = "timeout"


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers."""
    config.addinivalue_line("markers", f"{SLOW}: takes seconds or more (dropsafe's marker)")
    bound = (
        f"bounded by {DEFAULT_FAULT_TIMEOUT}s by default"
        if config.pluginmanager.hasplugin(_TIMEOUT_PLUGIN)
        else "install pytest-timeout to bound it in time"
    )
    config.addinivalue_line("markers", f"{FAULT}: injects a real fault; {bound}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Bound every fault test in time unless it sets its own timeout (needs pytest-timeout)."""
    if not config.pluginmanager.hasplugin(_TIMEOUT_PLUGIN):
        return
    for item in items:
        if item.get_closest_marker(FAULT) and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(DEFAULT_FAULT_TIMEOUT))


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """Give each test a fresh PostgreSQL server with TLS on, removed after the test.

    Only its URLs let one in: they carry the server's generated password (``.password``).
    """
    from dropsafe.testing._server import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_session_server() -> Iterator[PostgresServer]:
    """Give the whole session one PostgreSQL server with TLS on, removed at its end.

    For tests that do not stop, restart or break the server; each gets its own database from
    ``postgres_database``. A test that does break it takes ``postgres_server`` instead.
    """
    from dropsafe.testing._server import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_database(postgres_session_server: PostgresServer) -> Iterator[Database]:
    """Give each test a fresh, empty database on the session's server, dropped after the test.

    ``.url(driver)`` reaches it; a test costs a CREATE and a DROP DATABASE, not a server start.
    """
    from dropsafe.testing._database import Database

    database = Database(postgres_session_server)
    database.create()
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
def chaos_proxy(postgres_server: PostgresServer) -> Iterator[ChaosProxy]:
    """Put a `ChaosProxy` in front of ``postgres_server``; route URLs with ``.route``."""
    from dropsafe.testing._proxy import ChaosProxy

    with ChaosProxy(postgres_server.host, postgres_server.port) as proxy:
        yield proxy


@pytest.fixture
def kernel_blackhole() -> Callable[[int], AbstractContextManager[None]]:
    """`dropsafe.testing.kernel_blackhole`, or a skip saying why it cannot run here."""
    from dropsafe.testing import _kernel

    _skip_if_unavailable(_kernel.kernel_blackhole_unavailable())
    return _kernel.kernel_blackhole


@pytest.fixture
def idle_reaper() -> Callable[[int, float], AbstractContextManager[IdleReaper]]:
    """`dropsafe.testing.idle_reaper`, or a skip saying why it cannot run here."""
    from dropsafe.testing import _middlebox

    _skip_if_unavailable(_middlebox.idle_reaper_unavailable())
    return _middlebox.idle_reaper


def _skip_if_unavailable(reason: str | None) -> None:
    """Skip a fault's test, saying why it cannot run here; fail it where faults must run."""
    if reason is not None:
        if os.environ.get("DROPSAFE_REQUIRE_KERNEL_FAULTS") == "1":
            pytest.fail(f"DROPSAFE_REQUIRE_KERNEL_FAULTS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """Give each test module a three-node `PatroniCluster` (asynchronous replication).

    Module-scoped: it bootstraps in ~10 s. A test that fails a node over leaves the cluster to
    the next one as it is: call ``revive()`` first to have all three nodes streaming again.
    """
    from dropsafe.testing import _patroni

    _skip_if_unavailable(_patroni.patroni_cluster_unavailable())
    with _patroni.PatroniCluster() as cluster:
        yield cluster
