"""What the engine wing's pool tests share: holding several pooled connections at once."""

from __future__ import annotations

import sqlalchemy as sa

BACKEND_PID = sa.text("SELECT pg_backend_pid()")


def held_backend_pids(engine, count):
    """Hold ``count`` connections at once; return their backend pids (checked in afterwards).

    Holding them together is what makes the pool hand out (or open) ``count`` distinct ones.
    """
    held = [engine.connect() for _ in range(count)]
    try:
        return [connection.execute(BACKEND_PID).scalar_one() for connection in held]
    finally:
        for connection in held:
            connection.close()


__all__ = ["BACKEND_PID", "held_backend_pids"]
