"""What a unit that only reads pays for its xid: ``python benchmarks/read_only_unit_cost.py``.

The xid read before COMMIT gives every transaction on a primary an xid, so that a NOTIFY queued
where no statement says so (a function, a trigger) is resolved rather than run twice
(docs/guarantees.md, "Effects at COMMIT without an xid"). A unit that wrote nothing gets its xid
with ``synchronous_commit`` off for that transaction: this script measures what that costs,
per unit, with ``pg_stat_wal`` (WAL records, bytes, writes, flushes) and the xids used, and the
latency of the unit, on a server with ``fsync`` on, for:

- ``read``: a unit of one SELECT (the case this change affects);
- ``write``: a unit of one INSERT, for scale: what a COMMIT that flushes costs here.

Run it with ``PYTHONPATH=<an older src>`` to measure an older dropsafe the same way.
``--units N`` (3000), ``--driver`` (psycopg2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import sqlalchemy as sa

import dropsafe
from dropsafe.testing import PostgresServer

ARMS = {
    "read": "SELECT v FROM t",
    "write": "INSERT INTO w VALUES (1)",
}


def _wal(server: PostgresServer) -> list[float]:
    row = server.execute("SELECT wal_records, wal_bytes, wal_write, wal_sync FROM pg_stat_wal")
    return [float(value) for value in row[0]]


def _xid(server: PostgresServer) -> int:
    return int(server.execute("SELECT pg_current_xact_id()")[0][0])


def measure(server: PostgresServer, driver: str, statement: str, units: int) -> str:
    """Run ``units`` units of ``statement``; return one line of per-unit costs."""
    engine = dropsafe.create_engine(server.url(driver), pool_size=1)
    query = sa.text(statement)
    try:
        for _ in range(200):  # warm: connections, server life, caches
            dropsafe.run_transaction(engine, lambda c: c.execute(query))
        wal_before, xid_before = _wal(server), _xid(server)
        latencies = []
        for _ in range(units):
            started = time.perf_counter()
            dropsafe.run_transaction(engine, lambda c: c.execute(query))
            latencies.append(time.perf_counter() - started)
    finally:
        engine.dispose()
    # A backend reports its WAL counters at most once a second, and when it exits: wait for it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.execute(
        "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND pid <> pg_backend_pid()"
    ):
        time.sleep(0.05)
    wal_after, xid_after = _wal(server), _xid(server)
    records, wal_bytes, writes, flushes = (
        (after - before) / units for before, after in zip(wal_before, wal_after, strict=True)
    )
    latencies.sort()
    return (
        f"median {statistics.median(latencies) * 1e6:.0f} us, "
        f"p99 {latencies[int(units * 0.99)] * 1e6:.0f} us; per unit: {records:.2f} WAL records, "
        f"{wal_bytes:.0f} bytes, {writes:.3f} writes, {flushes:.3f} flushes, "
        f"{(xid_after - xid_before - 1) / units:.2f} xids"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--driver", default="psycopg2")
    args = parser.parse_args()
    print(f"dropsafe from {dropsafe.__file__}")
    # Durable as in production: the test servers' default turns fsync off.
    with PostgresServer(settings={"fsync": "on", "full_page_writes": "on"}) as server:
        server.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1); CREATE TABLE w (v int)")
        for arm, statement in ARMS.items():
            print(f"{args.driver}, {arm}: {measure(server, args.driver, statement, args.units)}")


if __name__ == "__main__":
    main()
