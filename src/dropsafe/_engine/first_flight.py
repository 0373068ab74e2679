"""A transaction's BEGIN sent in its first statement's flight, on the engines that allow it.

The driver does it (`Driver.begin_in_first_flight`: psycopg 3's cursors, sync and async;
asyncpg's adapter, its BEGIN armed on the transport; psycopg2's connection class, given at
connect by `Driver.first_flight_connect_args`); this
turns it on for each new connection of an engine whose policy asks for it
(``PoolPolicy.begin_in_first_flight``). Why it is safe: docs/guarantees.md, "BEGIN rides the
first statement's flight".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect
    from sqlalchemy.pool import ConnectionPoolEntry

    from dropsafe._dbapi import DBAPIConnection
    from dropsafe._drivers.base import ConnectArgs, Driver
    from dropsafe._policy import PoolPolicy

__all__ = ["FirstFlight"]


class FirstFlight:
    """Gives one engine's new connections the driver's BEGIN-in-the-first-flight."""

    def __init__(self, policy: PoolPolicy, driver: Driver | None) -> None:
        wanted = driver if policy.begin_in_first_flight else None
        self._install = wanted.begin_in_first_flight if wanted is not None else None
        self._connect_args = wanted.first_flight_connect_args if wanted is not None else None

    @property
    def enabled(self) -> bool:
        """Whether this engine's connections send BEGIN with their first statement."""
        return self._install is not None

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the pool events this listens to, by name: none where it is off."""
        if self._install is None:
            return {}
        return {"do_connect": self._on_do_connect, "connect": self._on_connect}

    def _on_do_connect(
        self, dialect: Dialect, entry: object, cargs: list[object], cparams: ConnectArgs
    ) -> None:
        del dialect, entry, cargs
        if self._connect_args is not None:
            self._connect_args(cparams)

    def _on_connect(self, dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
        del entry
        if self._install is not None:
            self._install(dbapi_connection)
