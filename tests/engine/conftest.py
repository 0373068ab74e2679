"""What the engine wing's tests share: a ChaosProxy in front of the module's ``server``; a
flight-counting proxy in front of its ``shared_server``."""

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


@pytest.fixture(scope="module")
def flights(shared_server: PostgresServer | SharedServer) -> Iterator[FlightProxy]:
    """A flight-counting proxy in front of the module's server (plaintext: it reads messages)."""
    with FlightProxy(shared_server.port) as proxy:
        yield proxy
