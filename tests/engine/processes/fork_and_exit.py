"""Start a PostgresServer, fork a child that exits normally, and say whether the server lived.

A forked child inherits the parent's objects, their finalizers included: at a normal exit
(``sys.exit``, as a gunicorn worker or a forked test helper ends) the child ran them, killed
the parent's server and removed its data folder. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import sqlalchemy as sa

from dropsafe.testing import PostgresServer


def main() -> None:
    server = PostgresServer()
    server.start()
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: atexit handlers and finalizers run
    os.waitpid(pid, 0)
    try:
        engine = sa.create_engine(server.url("psycopg2"), connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            alive = True
        except sa.exc.OperationalError as exc:
            print(exc, file=sys.stderr)
            alive = False
        finally:
            engine.dispose()
        print(json.dumps({"alive": alive, "folder_kept": server.base_dir.exists()}))
    finally:
        server.close()


if __name__ == "__main__":
    main()
