"""The public surface: what users may import. A change here is a change of API, on purpose."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import dropsafe
import dropsafe.events
import dropsafe.testing

PUBLIC = {
    "dropsafe": [
        "CommitOutcomeUnknown",
        "ConfigurationError",
        "ConnectionPolicy",
        "DropsafeError",
        "ErrorKind",
        "Policy",
        "PoolPolicy",
        "UnitPolicy",
        "classify",
        "create_async_engine",
        "create_engine",
        "harden",
        "policy_of",
        "request_unit",
        "run_transaction",
        "run_transaction_async",
        "test_mode",
        "transactional",
    ],
    "dropsafe.events": [
        "AcknowledgedCommitLost",
        "CommitResolved",
        "ConnectWaited",
        "ConnectionInvalidated",
        "DeadConnectionReplaced",
        "Event",
        "FirstStatementReplayed",
        "Hook",
        "HookFailedAfterCommit",
        "HostRetried",
        "HostSkipped",
        "LoggingHook",
        "OpenTelemetryHook",
        "PingSucceeded",
        "PrometheusHook",
        "RetriesGaveUp",
        "RetryScheduled",
        "RollbackConnectionLost",
        "TransactionReplayed",
        "format_event",
    ],
    "dropsafe.testing": [
        "ChaosProxy",
        "CutMode",
        "IdleReaper",
        "PatroniCluster",
        "PgBouncer",
        "PoolMode",
        "PostgresBinaries",
        "PostgresServer",
        "ProxyStats",
        "ServerError",
        "StopMode",
        "find_postgres_binaries",
        "idle_reaper",
        "idle_reaper_unavailable",
        "kernel_blackhole",
        "kernel_blackhole_unavailable",
        "leftover_processes",
        "multi_host_url",
    ],
}
# Modules users may import by name: the three above, and the pytest plugin's entry point.
PUBLIC_MODULES = {*PUBLIC, "dropsafe.testing.pytest_plugin"}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_the_public_names_are_exactly_these(name):
    module = importlib.import_module(name)
    assert sorted(module.__all__) == PUBLIC[name]
    for public in module.__all__:
        assert getattr(module, public) is not None


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_nothing_else_is_exported_by_accident(name):
    module = importlib.import_module(name)
    for public in module.__all__:
        getattr(module, public)  # the packages import their names on first use
    defined_here = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_") and getattr(value, "__module__", None) == name
    }
    assert defined_here <= set(module.__all__)


def test_every_other_module_is_private():
    found = {
        info.name
        for info in pkgutil.walk_packages(dropsafe.__path__, "dropsafe.")
        if not any(part.startswith("_") for part in info.name.split(".")[1:])
    }
    assert found == PUBLIC_MODULES - {"dropsafe"}


def test_names_of_version_one_that_are_gone_say_what_replaced_them():
    with pytest.raises(ImportError, match="that error itself is raised"):
        dropsafe.RetriesExhausted  # noqa: B018
    with pytest.raises(ImportError, match=r"now dropsafe\.ErrorKind"):
        from dropsafe import Kind  # noqa: F401


def test_one_exception_tree():
    for error in (dropsafe.ConfigurationError, dropsafe.CommitOutcomeUnknown):
        assert issubclass(error, dropsafe.DropsafeError)
        assert error.__module__ == "dropsafe"
    assert issubclass(dropsafe.testing.ServerError, dropsafe.DropsafeError)
    # Users already catch ValueError for bad arguments.
    assert issubclass(dropsafe.ConfigurationError, ValueError)


def test_loading_the_pytest_plugin_imports_neither_sqlalchemy_nor_the_bench():
    # pytest loads it in every run of every project that has dropsafe installed.
    probe = (
        "import sys, dropsafe.testing.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'dropsafe.'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert loaded.strip() == "['dropsafe.testing', 'dropsafe.testing.pytest_plugin']"


def test_the_version_is_public_beside_all():
    # dropsafe.__version__ is API (users and bug reports read it) without being in __all__.
    assert isinstance(dropsafe.__version__, str)
    assert "__version__" not in dropsafe.__all__
