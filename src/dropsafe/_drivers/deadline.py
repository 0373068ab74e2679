"""The client's last word on a wait: shut a connection's socket down when its deadline passes.

A server that hangs while its kernel still acknowledges never trips a TCP timeout, and libpq
has no per-call timeout. `bounded` hands the connection's socket to the process's shutdown
thread (`dropsafe._socket_shutdown`); the driver's blocked read then fails as on any lost
connection, for every driver, sync or async (a COMMIT, a resolution, a failover audit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dropsafe._drivers import socket_fd
from dropsafe._socket_shutdown import Bound, identity_of, shut_down_at

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._drivers.base import DBAPIConnection

__all__ = ["Bound", "bounded", "bounded_checkout"]

#: The key of a pool entry's ``info`` under which `bounded_checkout` keeps its DBAPI
#: connection's socket: ``(that connection, fd, the socket's identity)``.
_SOCKET_KEY = "dropsafe.deadline_socket"


def bounded(dbapi_connection: DBAPIConnection, deadline: float) -> AbstractContextManager[Bound]:
    """Shut ``dbapi_connection``'s socket down if the block still runs at ``deadline``.

    ``deadline`` is a `time.monotonic` value. A connection whose socket cannot be found (not
    a supported driver's, even through known wrappers) is left to its TCP timeouts. The
    `Bound` given says afterwards whether the deadline struck::

        with bounded(dbapi_connection, deadline) as bound:
            cursor.execute("COMMIT")
    """
    return shut_down_at(socket_fd(dbapi_connection), deadline)


def bounded_checkout(
    pool_connection: PoolProxiedConnection, deadline: float
) -> AbstractContextManager[Bound]:
    """`bounded` for a pool's checked-out connection: its socket found once per DBAPI connection.

    A unit of work bounds every attempt; finding the socket (the driver's lookup, an
    ``fstat`` for its identity) cost about 20 Python calls and a syscall each time. The fd and
    the identity are kept in the pool entry's ``info``, which SQLAlchemy clears when it
    replaces the entry's DBAPI connection (invalidated, recycled), with that connection itself:
    they are used only while the entry still holds the same one. A driver's connection keeps
    its socket for its life; once it is closed, the watchdog finds the identity changed and
    shuts nothing down (`dropsafe._socket_shutdown`), as for any closed socket.
    """
    dbapi_connection = pool_connection.dbapi_connection
    info = pool_connection.info
    known = info.get(_SOCKET_KEY)
    if known is None or known[0] is not dbapi_connection:
        fd = None if dbapi_connection is None else socket_fd(dbapi_connection)
        identity = None if fd is None else identity_of(fd)
        if identity is None:  # no socket found, or not open: unbounded, asked again next time
            return shut_down_at(None, deadline)
        known = info[_SOCKET_KEY] = (dbapi_connection, fd, identity)
    return shut_down_at(known[1], deadline, known[2])
