"""Requests failed through restarts: ``python benchmarks/restart_wait.py [--restarts 6]``.

4 client threads each run short requests (a checkout, ``SELECT 1``, the connection back to the
pool) on one engine, back to back, while the server is restarted again and again, alternately
``fast`` and ``immediate`` (a crash: the next start runs crash recovery). Variants: a plain
engine, ``pool_pre_ping=True``, the URL flag with ``dropsafe_connect_wait=0`` (dropsafe before
issue 27) and the URL flag alone (``connect_wait`` at its default). Prints one line per
variant: requests served, requests failed, the longest request, restarts, and how long the
restarts kept the server away.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from dropsafe.testing import PostgresServer

CLIENTS = 4
VARIANTS = {
    "plain": ("", {}),
    "pool_pre_ping": ("", {"pool_pre_ping": True}),
    "flag, connect_wait=0": ("plugin=dropsafe&dropsafe_connect_wait=0", {}),
    "flag": ("plugin=dropsafe", {}),
}


@dataclass
class Tally:
    """What the clients saw during one variant's restarts."""

    served: int = 0
    failed: int = 0
    longest: float = 0.0
    outages: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(engine: sa.Engine, stop: threading.Event, tally: Tally) -> None:
    """Run requests until ``stop``; count each one served or failed."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            ok = True
        except sa.exc.SQLAlchemyError:
            ok = False
        took = time.monotonic() - started
        with tally.lock:
            tally.served += ok
            tally.failed += not ok
            tally.longest = max(tally.longest, took)


def one_variant(
    server: PostgresServer, query: str, kwargs: dict[str, object], restarts: int
) -> Tally:
    """Restart the server ``restarts`` times under 4 clients; return what they saw."""
    url = server.url("psycopg2")
    url += ("&" if "?" in url else "?") + query if query else ""
    engine = sa.create_engine(url, pool_size=CLIENTS, max_overflow=0, **kwargs)
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client, args=(engine, stop, tally)) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        for number in range(restarts):
            stop.wait(1.0)  # the load runs between restarts
            started = time.monotonic()
            server.restart("fast" if number % 2 == 0 else "immediate")
            tally.outages.append(time.monotonic() - started)
        stop.wait(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        engine.dispose()
    return tally


def main() -> None:
    """Run each variant once and print its line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=6)
    arguments = parser.parse_args()
    if not 1 <= arguments.restarts <= 100:
        parser.error("--restarts must be 1..100")
    with PostgresServer() as server:
        for name, (query, kwargs) in VARIANTS.items():
            tally = one_variant(server, query, kwargs, arguments.restarts)
            print(
                f"{name:22} served {tally.served:6}  failed {tally.failed:4}  "
                f"longest request {tally.longest:5.2f} s  restarts {arguments.restarts} "
                f"(each restart took {min(tally.outages):.2f}-{max(tally.outages):.2f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
