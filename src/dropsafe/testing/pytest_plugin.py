"""pytest plugin: fixtures for real PostgreSQL servers and network faults, registered on install.

Fixtures: ``postgres_server`` (a fresh TLS server per test), ``postgres_session_server`` (one
server for the whole session) and ``postgres_database`` (a fresh, empty database on it per test,
for tests that do not stop or break the server), ``chaos_proxy`` (a proxy in front of
``postgres_server``), ``kernel_blackhole`` (drops a port's packets in the kernel),
``idle_reaper`` (a middlebox in the kernel that forgets a port's idle flows) and
``patroni_cluster`` (a three-node Patroni cluster with etcd and HAProxy per test module);
these skip where they cannot run, or fail when ``DROPSAFE_REQUIRE_KERNEL_FAULTS=1``, as in CI.
Markers:
``dropsafe_slow`` and ``dropsafe_fault``; with pytest-timeout installed (``dropsafe[testing]``
brings it), a ``dropsafe_fault`` test without its own timeout gets ``DEFAULT_FAULT_TIMEOUT``
seconds. Their names carry the prefix because the plugin is loaded into every suite: a user's
own ``slow`` or ``fault`` marker is theirs, and dropsafe neither registers nor changes it.

The ``pytest11`` entry point loads this module into every pytest run of every project that has
dropsafe installed, with whatever extras it picked. It stays loaded by default, not opt-in, so
that ``pip install 'dropsafe[testing]'`` is all a user does to get the fixtures. So loading it
must stay cheap and must not fail: it imports nothing beyond pytest and the standard library
(the servers, the proxy and the kernel faults are imported by the fixtures, when a test asks for
one), and it only uses pytest-timeout's ``timeout`` marker when that plugin is there: with
``--strict-markers`` an unregistered marker would break collection of the user's whole suite.
Python imports the packages ``dropsafe`` and ``dropsafe.testing`` first: both import their names
on first use, so loading the plugin imports neither SQLAlchemy nor the bench (measured: about
80 ms, pytest's own import included, against 0.7 s or more when ``import dropsafe`` loaded
SQLAlchemy; tests/unit/test_public_api.py checks it).

Nothing outlives a test, even a killed run: servers die with the test process, and their temp
folders and the blackholes' kernel rules are named after it, so the next start sweeps those of
a run that is gone (never those of a live one: two suites may run at once). On SIGTERM the
process removes its own first, then calls the handler that was there before ours (if any).
"""

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
    from dropsafe.testing._server import PostgresServer  # see the module doc

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_session_server() -> Iterator[PostgresServer]:
    """Give the whole session one PostgreSQL server with TLS on, removed at its end.

    For tests that do not stop, restart or break the server; each gets its own database from
    ``postgres_database``. A test that does break it takes ``postgres_server`` instead.
    """
    from dropsafe.testing._server import PostgresServer  # see the module doc

    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_database(postgres_session_server: PostgresServer) -> Iterator[Database]:
    """Give each test a fresh, empty database on the session's server, dropped after the test.

    ``.url(driver)`` reaches it; a test costs a CREATE and a DROP DATABASE, not a server start.
    """
    from dropsafe.testing._database import Database  # see the module doc

    database = Database(postgres_session_server)
    database.create()
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
def chaos_proxy(postgres_server: PostgresServer) -> Iterator[ChaosProxy]:
    """Put a `ChaosProxy` in front of ``postgres_server``; route URLs with ``.route``."""
    from dropsafe.testing._proxy import ChaosProxy  # see the module doc

    with ChaosProxy(postgres_server.host, postgres_server.port) as proxy:
        yield proxy


@pytest.fixture
def kernel_blackhole() -> Callable[[int], AbstractContextManager[None]]:
    """`dropsafe.testing.kernel_blackhole`, or a skip saying why it cannot run here."""
    from dropsafe.testing import _kernel  # see the module doc

    reason = _kernel.kernel_blackhole_unavailable()
    if reason is not None:
        if os.environ.get("DROPSAFE_REQUIRE_KERNEL_FAULTS") == "1":
            pytest.fail(f"DROPSAFE_REQUIRE_KERNEL_FAULTS=1 but {reason}")
        pytest.skip(reason)
    return _kernel.kernel_blackhole


@pytest.fixture
def idle_reaper() -> Callable[[int, float], AbstractContextManager[IdleReaper]]:
    """`dropsafe.testing.idle_reaper`, or a skip saying why it cannot run here."""
    from dropsafe.testing import _middlebox  # see the module doc

    reason = _middlebox.idle_reaper_unavailable()
    if reason is not None:
        if os.environ.get("DROPSAFE_REQUIRE_KERNEL_FAULTS") == "1":
            pytest.fail(f"DROPSAFE_REQUIRE_KERNEL_FAULTS=1 but {reason}")
        pytest.skip(reason)
    return _middlebox.idle_reaper


@pytest.fixture(scope="module")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """Give each test module a three-node `PatroniCluster` (asynchronous replication).

    Module-scoped: it bootstraps in ~10 s. A test that fails a node over leaves the cluster to
    the next one as it is: call ``revive()`` first to have all three nodes streaming again.
    """
    from dropsafe.testing import _patroni  # see the module doc

    reason = _patroni.patroni_cluster_unavailable()
    if reason is not None:
        if os.environ.get("DROPSAFE_REQUIRE_KERNEL_FAULTS") == "1":
            pytest.fail(f"DROPSAFE_REQUIRE_KERNEL_FAULTS=1 but {reason}")
        pytest.skip(reason)
    with _patroni.PatroniCluster() as cluster:
        yield cluster
