"""A transaction's BEGIN sent in its first statement's flight, on the engines that allow it.

The driver does it (`Driver.begin_in_first_flight`: psycopg 3's cursors, sync and async;
asyncpg's adapter, its BEGIN armed on the transport); this
turns it on for each new connection of an engine whose policy asks for it
(``PoolPolicy.begin_in_first_flight``). Why it is safe: docs/guarantees.md, "BEGIN rides the
first statement's flight".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.pool import ConnectionPoolEntry

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._drivers.base import Driver
    from dropsafe._policy import PoolPolicy

__all__ = ["FirstFlight"]


class FirstFlight:
    """Gives one engine's new connections the driver's BEGIN-in-the-first-flight."""

    def __init__(self, policy: PoolPolicy, driver: Driver | None) -> None:
        self._install = (
            driver.begin_in_first_flight
            if driver is not None and policy.begin_in_first_flight
            else None
        )

    @property
    def enabled(self) -> bool:
        """Whether this engine's connections send BEGIN with their first statement."""
        return self._install is not None

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the pool events this listens to, by name: none where it is off."""
        return {"connect": self._on_connect} if self._install is not None else {}

    def _on_connect(self, dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
        del entry
        if self._install is not None:
            self._install(dbapi_connection)
