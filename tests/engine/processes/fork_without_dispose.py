"""A child that skips SQLAlchemy's after-fork step: dropsafe gives what plain SQLAlchemy gives.

Run as a script (``python fork_without_dispose.py URL``). For a plain SQLAlchemy engine and a
dropsafe one in turn: the parent pools a connection, forks a child that runs a transaction on
the inherited pool (no ``engine.dispose(close=False)``) and exits normally, then the parent runs
a query. Prints one JSON line: per engine, what the child and then the parent got.
"""

from __future__ import annotations

import json
import os
import sys

import sqlalchemy as sa

import dropsafe


def _run(engine: sa.Engine, *, unit: bool) -> str:
    try:
        if unit:
            value = dropsafe.run_transaction(engine, lambda c: c.execute(sa.text("SELECT 42")))
            value = value.scalar() if hasattr(value, "scalar") else value
        else:
            with engine.begin() as conn:
                value = conn.execute(sa.text("SELECT 42")).scalar()
    except Exception as exc:
        return f"error {type(exc).__name__}"
    return "ok"


def main(url: str) -> None:
    report = {}
    for variant in ("plain", "dropsafe"):
        engine = (dropsafe.create_engine if variant == "dropsafe" else sa.create_engine)(url)
        with engine.connect() as conn:  # the parent's pooled connection
            conn.execute(sa.text("SELECT 1"))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write_end, _run(engine, unit=variant == "dropsafe").encode())
            sys.exit(0)  # a normal exit: the driver closes the inherited connection
        os.close(write_end)
        os.waitpid(pid, 0)
        child = os.read(read_end, 1000).decode()
        os.close(read_end)
        report[variant] = {"child": child, "parent_after": _run(engine, unit=False)}
        engine.dispose()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
