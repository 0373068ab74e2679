"""The drivers' registry: every supported DBAPI driver, and the lookups the rest of dropsafe asks.

One file per driver beside this one holds all that is particular to it (connect defaults, socket,
ping, hosts, error facts, capabilities, TLS parameters); nothing else in dropsafe names a driver.
Adding one: docs/architecture.md, "Drivers".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from dropsafe._classify import learn_driver_errors
from dropsafe._drivers.asyncpg import Asyncpg
from dropsafe._drivers.base import DBAPIConnection, Driver, Health, Server
from dropsafe._drivers.pg8000 import Pg8000
from dropsafe._drivers.psycopg import Psycopg
from dropsafe._drivers.psycopg2 import Psycopg2
from dropsafe._drivers.sockets import SentBytes, socket_fd_of, tcp_bytes_sent
from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

__all__ = [
    "DRIVERS",
    "SUPPORTED",
    "SUPPORTED_DRIVERS",
    "Driver",
    "DriverName",
    "Health",
    "SentBytes",
    "Server",
    "async_drivers",
    "bytes_sent",
    "driver_for",
    "driver_named",
    "driver_names",
    "face_of",
    "faces",
    "is_supported",
    "socket_fd",
    "socket_fd_of",
    "sync_drivers",
    "tcp_bytes_sent",
]

#: The drivers' names as a type, for signatures that take one (the bench's ``url(driver)``).
#: A test checks that it names exactly `DRIVERS`.
DriverName = Literal["psycopg2", "psycopg", "asyncpg", "pg8000"]
#: Every supported driver, in the order a URL without one prefers them (per face).
DRIVERS: tuple[Driver, ...] = (Psycopg2(), Psycopg(), Asyncpg(), Pg8000())

for _driver in DRIVERS:
    learn_driver_errors(_driver.errors)

_BY_DIALECT = {name: driver for driver in DRIVERS for name in driver.dialect_drivers}
_BY_NAME = {driver.name: driver for driver in DRIVERS}
#: The drivers' names in a URL (``postgresql+NAME``).
SUPPORTED_DRIVERS = tuple(_BY_NAME)
#: For error messages: what a URL may start with.
SUPPORTED = ", ".join(f"postgresql+{name}" for name in SUPPORTED_DRIVERS)


def sync_drivers() -> tuple[str, ...]:
    """Name the drivers with a sync face, in order of preference."""
    return tuple(driver.name for driver in DRIVERS if driver.sync)


def async_drivers() -> tuple[str, ...]:
    """Name the drivers with an asyncio face, in order of preference."""
    # asyncio-only drivers first: a sync driver's async face is its second.
    return tuple(driver.name for driver in sorted(DRIVERS, key=lambda d: d.sync) if driver.asyncio)


def driver_names(
    *, sync: bool | None = None, asyncio: bool | None = None, replays: bool | None = None
) -> tuple[str, ...]:
    """Name the drivers with (True) or without (False) a sync face, an asyncio face, replay.

    What the tests parametrize over: a test asks for what it needs, not for a list of names.
    """
    return tuple(
        driver.name
        for driver in DRIVERS
        if sync in (None, driver.sync)
        and asyncio in (None, driver.asyncio)
        and replays in (None, driver.capabilities.replays_first_statement)
    )


def faces() -> tuple[str, ...]:
    """Name every (driver, face) pair: the sync ones by the driver, then the asyncio ones.

    A driver with both faces has its asyncio one as ``NAME-async`` (`face_of` reads them).
    """
    return (*sync_drivers(), *(_async_label(_BY_NAME[name]) for name in async_drivers()))


def face_of(label: str) -> tuple[str, bool]:
    """Return the driver's name and whether it is the asyncio face, for a label of `faces`."""
    name = label.removesuffix("-async")
    driver = driver_named(name)
    return name, label != name or not driver.sync


def _async_label(driver: Driver) -> str:
    return f"{driver.name}-async" if driver.sync else driver.name


def is_supported(driver_name: str) -> bool:
    """Whether dropsafe knows SQLAlchemy's driver ``driver_name`` (psycopg_async included)."""
    return driver_name in _BY_DIALECT


def driver_named(name: str) -> Driver:
    """Return the `Driver` named ``name`` in a URL; raise `ConfigurationError` if unknown."""
    driver = _BY_NAME.get(name)
    if driver is None:
        raise ConfigurationError(f"driver must be one of {', '.join(SUPPORTED_DRIVERS)}: {name!r}")
    return driver


def driver_for(dialect: Dialect) -> Driver:
    """Return the `Driver` for an engine's dialect; raise `ConfigurationError` if unsupported."""
    if dialect.name != "postgresql":
        raise ConfigurationError(
            f"dropsafe guards PostgreSQL engines only, not {dialect.name!r}; supported: {SUPPORTED}"
        )
    driver = _BY_DIALECT.get(str(dialect.driver))
    if driver is None:
        raise ConfigurationError(f"unsupported driver {dialect.driver!r}; supported: {SUPPORTED}")
    return driver


def socket_fd(dbapi_connection: DBAPIConnection) -> int | None:
    """Return the file descriptor of any supported driver's connection (or of one it wraps).

    For code that holds a DBAPI connection but not its engine; None if no driver knows it or
    it has no socket (closed).
    """
    # A driver's own connection first (what SQLAlchemy hands out unless a creator= wraps it):
    # this runs at every bounded statement, and looking through wrappers costs more.
    for driver in DRIVERS:
        if driver.owns(dbapi_connection):
            return socket_fd_of(driver, dbapi_connection)
    for driver in DRIVERS:
        native = driver.native(dbapi_connection)
        if native is not None:
            return socket_fd_of(driver, native)
    return None


def bytes_sent(driver: Driver, native: DBAPIConnection) -> int | None:
    """Return the data bytes written so far to the connection's TCP socket; None if unknown.

    The first-statement replay compares it at checkout and before the first statement: a
    driver's connection used around SQLAlchemy in between (a session SET committed there)
    leaves no other trace a client can read without a round trip (`tcp_bytes_sent`).
    """
    fd = socket_fd_of(driver, native)
    return None if fd is None else tcp_bytes_sent(fd)
