"""A WSGI app as gunicorn ``--preload`` runs it: the engine made, and used, before the fork.

``DATABASE_URL`` names the server. At import (in gunicorn's master, with ``--preload``) it runs a
unit of work, which starts the watchdog thread and draws from the jitter's generator, as an app
that warms up or migrates at import does. Each worker then runs SQLAlchemy's after-fork step.

``GET /hang`` runs a unit of work with ``deadline=2`` whose statement never ends on its own (a
hung backend, as the client sees it) and answers 503 with the time it took and the error's type;
``GET /ok`` runs ``SELECT 1``. Under ``-k gevent``, psycopg2 waits through psycogreen.
"""

from __future__ import annotations

import json
import os
import time

import sqlalchemy as sa

import dropsafe

if os.environ.get("GEVENT_PSYCOPG") == "1":
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()

DEADLINE = 2.0
engine = dropsafe.create_engine(os.environ["DATABASE_URL"])
dropsafe.run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT 1")).scalar())
# SQLAlchemy's after-fork step: a worker must not use the master's pooled connections.
os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))


def app(environ, start_response):
    """Serve /hang and /ok (see the module's doc)."""
    started = time.monotonic()
    status, body = "200 OK", {"pid": os.getpid()}
    try:
        if environ["PATH_INFO"] == "/hang":
            dropsafe.run_transaction(
                engine,
                lambda conn: conn.execute(sa.text("SELECT pg_sleep(60)")),
                deadline=DEADLINE,
            )
        else:
            dropsafe.run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT 1")))
    except Exception as exc:
        status, body["error"] = "503 Service Unavailable", type(exc).__name__
    body["elapsed"] = time.monotonic() - started
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json")])
    return [data]
