"""What the engine wing's fault tests share: a ChaosProxy in front of the module's ``server``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from dropsafe.testing import ChaosProxy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dropsafe.testing import PostgresServer


@pytest.fixture(scope="module")
def proxy(server: PostgresServer) -> Iterator[ChaosProxy]:
    """A proxy to cut the module's connections with; each module defines its own ``server``."""
    with ChaosProxy(server.host, server.port) as proxy:
        yield proxy
