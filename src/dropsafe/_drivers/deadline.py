"""The client's last word on a wait: shut a connection's socket down when its deadline passes.

A server that hangs while its kernel still acknowledges never trips a TCP timeout, and libpq
has no per-call timeout. `bounded` hands the connection's socket to the process's shutdown
thread (`dropsafe._socket_shutdown`); the driver's blocked read then fails as on any lost
connection, for every driver, sync or async (a COMMIT, a resolution, a failover audit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dropsafe._drivers import socket_fd
from dropsafe._socket_shutdown import Bound, shut_down_at

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from dropsafe._drivers.base import DBAPIConnection

__all__ = ["Bound", "bounded"]


def bounded(dbapi_connection: DBAPIConnection, deadline: float) -> AbstractContextManager[Bound]:
    """Shut ``dbapi_connection``'s socket down if the block still runs at ``deadline``.

    ``deadline`` is a `time.monotonic` value. A connection whose socket cannot be found (not
    a supported driver's, even through known wrappers) is left to its TCP timeouts. The
    `Bound` given says afterwards whether the deadline struck::

        with bounded(dbapi_connection, deadline) as bound:
            cursor.execute("COMMIT")
    """
    return shut_down_at(socket_fd(dbapi_connection), deadline)
