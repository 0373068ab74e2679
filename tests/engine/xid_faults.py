"""What the tests of the xid read in flight share: a COMMIT's packets dropped by the kernel."""

from __future__ import annotations

import contextlib
import os
import socket

import sqlalchemy as sa

from dropsafe.testing import kernel_blackhole
from dropsafe.testing._runtime import wait_until


def client_port(conn) -> int:
    """The local port of ``conn``'s (a sync SQLAlchemy Connection's) socket."""
    fd = conn.connection.dbapi_connection.fileno()
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def lost_at_commit(engine, direction):
    """The COMMIT's packets dropped by the kernel from the moment it is sent (``direction``
    "to": the reply lost, the COMMIT done; "both": the COMMIT never reaches the server)."""
    holes = contextlib.ExitStack()

    def cut(conn):
        if not holes._exit_callbacks:
            holes.enter_context(kernel_blackhole(client_port(conn), direction=direction))

    sa.event.listen(engine, "commit", cut)
    try:
        with holes:
            yield
    finally:
        sa.event.remove(engine, "commit", cut)


def wait_committed(server, pid: int) -> None:
    """Wait (20 s at most) until backend ``pid`` is idle: its COMMIT is done on the server."""
    wait_until(
        lambda: bool(
            server.execute(f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND state = 'idle'")
        ),
        timeout=20,
        what="the COMMIT to be done",
    )
