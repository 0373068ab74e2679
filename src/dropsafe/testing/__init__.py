"""Real PostgreSQL servers and real network faults, for dropsafe's tests and for yours.

Install with ``pip install 'dropsafe[testing]'``; the pytest plugin offers the fixtures
``postgres_server``, ``chaos_proxy`` and ``kernel_blackhole``.
"""

from __future__ import annotations

from dropsafe.testing._binaries import PostgresBinaries, find_postgres_binaries
from dropsafe.testing._kernel import kernel_blackhole, kernel_blackhole_unavailable
from dropsafe.testing._leftovers import leftover_processes
from dropsafe.testing._pgbouncer import PgBouncer, PoolMode
from dropsafe.testing._proxy import ChaosProxy, CutMode, ProxyStats
from dropsafe.testing._server import PostgresServer, ServerError, StopMode, multi_host_url

__all__ = [
    "ChaosProxy",
    "CutMode",
    "PgBouncer",
    "PoolMode",
    "PostgresBinaries",
    "PostgresServer",
    "ProxyStats",
    "ServerError",
    "StopMode",
    "find_postgres_binaries",
    "kernel_blackhole",
    "kernel_blackhole_unavailable",
    "leftover_processes",
    "multi_host_url",
]
