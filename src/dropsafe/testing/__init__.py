"""Real PostgreSQL servers and real network faults, for dropsafe's tests and for yours.

Install with ``pip install 'dropsafe[testing]'``; the pytest plugin offers the fixtures
``postgres_server``, ``chaos_proxy``, ``kernel_blackhole``, ``idle_reaper`` and
``patroni_cluster``.

The names below are imported on first use, not with the package: pytest imports this package
in every run of every project that has dropsafe installed (to load the plugin,
``dropsafe.testing.pytest_plugin``), and those runs must not pay for servers and proxies they
never start. The first name asked for imports them all, so the package then looks as if they
had been imported eagerly.
"""

from __future__ import annotations

import importlib
import typing

# typing.TYPE_CHECKING, not a bare name: the package exports nothing but its __all__.
if typing.TYPE_CHECKING:
    from dropsafe.testing._binaries import PostgresBinaries, find_postgres_binaries
    from dropsafe.testing._kernel import kernel_blackhole, kernel_blackhole_unavailable
    from dropsafe.testing._leftovers import leftover_processes
    from dropsafe.testing._middlebox import IdleReaper, idle_reaper, idle_reaper_unavailable
    from dropsafe.testing._patroni import PatroniCluster
    from dropsafe.testing._pgbouncer import PgBouncer, PoolMode
    from dropsafe.testing._proxy import ChaosProxy, CutMode, ProxyStats
    from dropsafe.testing._server import PostgresServer, ServerError, StopMode, multi_host_url

__all__ = [
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
]

# Where each public name lives.
_HOMES = {
    "dropsafe.testing._binaries": ("PostgresBinaries", "find_postgres_binaries"),
    "dropsafe.testing._kernel": ("kernel_blackhole", "kernel_blackhole_unavailable"),
    "dropsafe.testing._leftovers": ("leftover_processes",),
    "dropsafe.testing._middlebox": ("IdleReaper", "idle_reaper", "idle_reaper_unavailable"),
    "dropsafe.testing._patroni": ("PatroniCluster",),
    "dropsafe.testing._pgbouncer": ("PgBouncer", "PoolMode"),
    "dropsafe.testing._proxy": ("ChaosProxy", "CutMode", "ProxyStats"),
    "dropsafe.testing._server": ("PostgresServer", "ServerError", "StopMode", "multi_host_url"),
}


def __getattr__(name: str) -> object:
    """Import every public name on the first use of one (see the module doc)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module_name, names in _HOMES.items():
        module = importlib.import_module(module_name)
        globals().update({public: getattr(module, public) for public in names})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
