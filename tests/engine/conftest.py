"""What the engine wing's tests share: a ChaosProxy in front of the module's ``server``, and
one of a test's own in front of its ``shared_server``; a flight-counting proxy in front of its
``shared_server``; psycopg2's checkin ROLLBACK deferred however quick."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from dropsafe._bench._flights import FlightProxy
from dropsafe.testing import ChaosProxy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dropsafe.testing import PostgresServer, SharedServer


@pytest.fixture(scope="module")
def proxy(server: PostgresServer) -> Iterator[ChaosProxy]:
    """A proxy to cut the module's connections with; each module defines its own ``server``."""
    with ChaosProxy(server.host, server.port) as proxy:
        yield proxy


@pytest.fixture
def shared_server_proxy(shared_server: PostgresServer | SharedServer) -> Iterator[ChaosProxy]:
    """A proxy of the test's own in front of the module's ``shared_server``: its latency and
    cuts end with the test."""
    with ChaosProxy(shared_server.host, shared_server.port) as proxy:
        yield proxy


@pytest.fixture
def every_rollback_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every psycopg2 ROLLBACK at checkin deferred, however quick (its own heuristic's tests
    set the threshold back)."""
    from dropsafe._drivers import psycopg2_rollback

    monkeypatch.setattr(psycopg2_rollback, "SLOW_ROLLBACK_S", 0.0)


@pytest.fixture(scope="module")
def flights(shared_server: PostgresServer | SharedServer) -> Iterator[FlightProxy]:
    """A flight-counting proxy in front of the module's server (plaintext: it reads messages)."""
    with FlightProxy(shared_server.port) as proxy:
        yield proxy
