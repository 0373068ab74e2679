"""Round trips on the wire per request shape and driver: plain, pre_ping, psycopg_pool, dropsafe.

Issue 28's first must-show. Every byte between the pool and a throwaway server passes through a
counting proxy (`dropsafe._bench._flights.FlightProxy`): a *flight* is what a client sends after
the server last spoke on that link, so each flight is one round trip the client began. Each
flight is also named by its first protocol message (``Q BEGIN``, ``P SELECT 1``, ...), so the
table says which statements made the round trips. Shapes:

- ``query``: a single query in a Session (``with Session() as s: s.execute(SELECT 1)``);
- ``unit``: one INSERT in a unit of work, ``unverified`` and ``verified`` for dropsafe
  (``dropsafe.run_transaction``), ``with Session.begin()`` for the others;
- ``orm5``: a 5-statement ORM request in one transaction (get by key, a filtered query, an
  INSERT, an UPDATE and a DELETE flushed by the ORM, COMMIT).

``--rtt-ms 10`` also times single-query requests through a `ChaosProxy` that delays each
direction by half that, one client on a pool of 4 warmed connections, for the plain pool,
``pool_pre_ping`` and dropsafe, also with ``begin_in_first_flight`` off and with
``defer_checkin_rollback`` off, variants interleaved (best of ``--rounds``): what BEGIN in the
first statement's flight, and a request that does not wait for its ROLLBACK, each gain.

psycopg_pool (psycopg 3 only) runs the same statements on its own connections with its
``check`` (``check_connection``, a round trip at every getconn). Connecting is not counted (the
pool is warmed first); a pool's closing ``terminate`` is not a round trip. Example::

    python benchmarks/round_trips.py --write    # the table into docs/benchmarks.md and results
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import dropsafe
from dropsafe._bench._flights import Flight, FlightProxy
from dropsafe.testing import ChaosProxy, PostgresServer

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ROUND_TRIPS.md"
DOC = ROOT / "docs" / "benchmarks.md"
DRIVERS = ("psycopg2", "psycopg", "asyncpg")
VARIANTS = ("plain", "pre_ping", "psycopg_pool check", "dropsafe")
SHAPES = ("query", "unit unverified", "unit verified", "orm5")
SELECT_ONE = sa.text("SELECT 1")
INSERT = sa.text("INSERT INTO rt_bench (v) VALUES (1)")
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rt_bench (v int)",
    "CREATE TABLE IF NOT EXISTS rt_item (id serial PRIMARY KEY, name text, n int)",
    "INSERT INTO rt_item (id, name, n) VALUES (0, 'zero', 0) ON CONFLICT DO NOTHING",
)
_BEGIN, _END = "<!-- round-trips:begin -->", "<!-- round-trips:end -->"
#: Seconds to wait for the proxy to have seen a pool's goodbye.
_DEADLINE = 10.0


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "rt_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    n: Mapped[int]


@dataclass
class Count:
    """Round trips per request (the mean over the counted requests) and one request's names."""

    per_request: float
    labels: list[str]


def _orm5(session: Session) -> None:
    session.get(Item, 0)
    session.scalars(sa.select(Item).where(Item.n >= 0).limit(1)).all()
    item = Item(name="new", n=1)
    session.add(item)
    session.flush()
    item.n = 2
    session.flush()
    session.delete(item)
    session.flush()


async def _orm5_async(session: AsyncSession) -> None:
    await session.get(Item, 0)
    (await session.scalars(sa.select(Item).where(Item.n >= 0).limit(1))).all()
    item = Item(name="new", n=1)
    session.add(item)
    await session.flush()
    item.n = 2
    await session.flush()
    await session.delete(item)
    await session.flush()


def _policy(shape: str) -> dropsafe.Policy:
    return dropsafe.Policy(unit=dropsafe.UnitPolicy(verify_commits=shape != "unit unverified"))


def sync_request(
    variant: str, shape: str, url: str
) -> tuple[Callable[[], object], Callable[[], None], Callable[[], None]]:
    """Return one request of ``shape`` on a new pool of ``variant``, and the pool's close.

    Also what makes sure every flight of the requests so far reached the proxy (``settle``).
    """
    if variant == "psycopg_pool check":
        return (*_psycopg_pool_request(shape, url), _nothing)
    if variant == "dropsafe":
        engine = dropsafe.create_engine(url, policy=_policy(shape), pool_size=1)
    else:
        engine = sa.create_engine(url, pool_size=1, pool_pre_ping=variant == "pre_ping")
    factory = sessionmaker(engine)

    def request() -> object:
        if shape == "query":
            with factory() as session:
                return session.execute(SELECT_ONE).scalar()
        if shape.startswith("unit") and variant == "dropsafe":
            return dropsafe.run_transaction(factory, lambda s: s.execute(INSERT))
        with factory() as session, session.begin():
            if shape == "orm5":
                return _orm5(session)
            return session.execute(INSERT)

    def settle() -> None:
        # A checkout reads a ROLLBACK's reply that its request did not wait for (dropsafe on
        # psycopg 3) and sends nothing: the ROLLBACK reached the proxy before its reply came.
        if variant == "dropsafe":  # a pre_ping engine would ping here: a flight
            with engine.connect():
                pass

    def close() -> None:
        settle()  # the pool's goodbye is then a flight of its own
        engine.dispose()

    return request, close, settle


def _nothing() -> None:
    """Settle nothing: a pool whose requests wait for every reply."""


def _psycopg_pool_request(shape: str, url: str) -> tuple[Callable[[], object], Callable[[], None]]:
    import psycopg_pool

    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = psycopg_pool.ConnectionPool(
        conninfo,
        min_size=1,
        max_size=1,
        check=psycopg_pool.ConnectionPool.check_connection,
        open=True,
    )
    pool.wait(timeout=30.0)
    statements = {
        "query": ["SELECT 1"],
        "orm5": [
            "SELECT id, name, n FROM rt_item WHERE id = 0",
            "SELECT id, name, n FROM rt_item WHERE n >= 0 LIMIT 1",
            "INSERT INTO rt_item (name, n) VALUES ('new', 1) RETURNING id",
            "UPDATE rt_item SET n = 2 WHERE id = %(id)s",
            "DELETE FROM rt_item WHERE id = %(id)s",
        ],
    }.get(shape, [str(INSERT)])

    def request() -> object:
        # The pool's connection() commits on the way out (or rolls back on an error).
        with pool.connection() as connection:
            row: Any = None
            for statement in statements:
                cursor = connection.execute(statement, {"id": row[0]} if row else None)
                if statement.endswith("RETURNING id"):
                    row = cursor.fetchone()
            return row

    return request, pool.close


def count_sync(proxy: FlightProxy, variant: str, shape: str, url: str, requests: int) -> Count:
    request, close, settle = sync_request(variant, shape, url)
    try:
        request()  # connects and warms: not counted
        settle()  # its ROLLBACK, not awaited, counted before the count starts (not in it)
        start = len(proxy.flights)
        for _ in range(requests):
            request()
    finally:
        close()
    return _counted(proxy, start, requests)


async def _count_async(
    proxy: FlightProxy, shape: str, url: str, variant: str, requests: int
) -> Count:
    if variant == "dropsafe":
        engine = dropsafe.create_async_engine(url, policy=_policy(shape), pool_size=1)
    else:
        engine = create_async_engine(url, pool_size=1, pool_pre_ping=variant == "pre_ping")
    factory = async_sessionmaker(engine)

    async def insert(session: AsyncSession) -> None:
        await session.execute(INSERT)

    async def request() -> object:
        if shape == "query":
            async with factory() as session:
                return (await session.execute(SELECT_ONE)).scalar()
        if shape.startswith("unit") and variant == "dropsafe":
            return await dropsafe.run_transaction_async(factory, insert)
        async with factory() as session, session.begin():
            if shape == "orm5":
                return await _orm5_async(session)
            return await session.execute(INSERT)

    try:
        await request()  # connects and warms: not counted
        if variant == "dropsafe":  # its ROLLBACK, not awaited, read (as in sync_request)
            async with engine.connect():
                pass
        start = len(proxy.flights)
        for _ in range(requests):
            await request()
    finally:
        if variant == "dropsafe":  # as in sync_request's close
            async with engine.connect():
                pass
        await engine.dispose()
    return _counted(proxy, start, requests)


def count(
    proxy: FlightProxy, driver: str, variant: str, shape: str, url: str, *, requests: int
) -> Count:
    """Round trips per request of ``shape`` on ``variant``, counted on ``proxy``."""
    if driver == "asyncpg":
        return asyncio.run(_count_async(proxy, shape, url, variant, requests))
    return count_sync(proxy, variant, shape, url, requests)


def _counted(proxy: FlightProxy, start: int, requests: int) -> Count:
    """Count the flights since ``start``, once the pool's goodbye shows all of them arrived.

    A flight the client did not wait for (a ROLLBACK sent at checkin) may reach the proxy after
    the request returned; the closing ``terminate`` follows it on the same link.
    """
    deadline = time.monotonic() + _DEADLINE
    while not any(flight.label == "terminate" for flight in proxy.flights[start:]):
        if time.monotonic() > deadline:
            msg = "the proxy never saw the pool close its connection"
            raise TimeoutError(msg)
        time.sleep(0.005)  # polling a condition, with a deadline
    flights: list[Flight] = [
        flight
        for flight in proxy.flights[start:]
        if not flight.startup and flight.label != "terminate"
    ]
    last = flights[-(len(flights) // requests) :] if flights else []
    return Count(len(flights) / requests, [flight.label for flight in last])


TIMED = (
    "plain",
    "pre_ping",
    "dropsafe",
    "dropsafe, BEGIN alone",
    "dropsafe, ROLLBACK awaited",
)


def _timed_engine(variant: str, url: str) -> sa.Engine:
    if variant == "plain" or variant == "pre_ping":  # noqa: PLR1714 - two names, one shape
        return sa.create_engine(url, pool_size=4, pool_pre_ping=variant == "pre_ping")
    pool = dropsafe.PoolPolicy(
        defer_checkin_rollback=variant != "dropsafe, ROLLBACK awaited",
        begin_in_first_flight=variant != "dropsafe, BEGIN alone",
    )
    return dropsafe.create_engine(url, pool_size=4, policy=dropsafe.Policy(pool=pool))


def requests_per_second(url: str, variant: str, seconds: float) -> float:
    """Single-query requests in a Session, back to back, one client, 4 connections warmed."""
    engine = _timed_engine(variant, url)
    factory = sessionmaker(engine)
    try:
        sessions = [factory() for _ in range(4)]
        for session in sessions:
            session.execute(SELECT_ONE)
        for session in sessions:
            session.close()
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            with factory() as session:
                session.execute(SELECT_ONE).scalar()
            done += 1
        return done / (time.perf_counter() - started)
    finally:
        engine.dispose()


def _timed_async_engine(variant: str, url: str) -> AsyncEngine:
    if variant == "plain" or variant == "pre_ping":  # noqa: PLR1714 - two names, one shape
        return create_async_engine(url, pool_size=4, pool_pre_ping=variant == "pre_ping")
    pool = dropsafe.PoolPolicy(
        defer_checkin_rollback=variant != "dropsafe, ROLLBACK awaited",
        begin_in_first_flight=variant != "dropsafe, BEGIN alone",
    )
    return dropsafe.create_async_engine(url, pool_size=4, policy=dropsafe.Policy(pool=pool))


async def _requests_per_second_async(url: str, variant: str, seconds: float) -> float:
    """`requests_per_second` on an asyncio engine (asyncpg), in one task."""
    engine = _timed_async_engine(variant, url)
    factory = async_sessionmaker(engine)
    try:
        sessions = [factory() for _ in range(4)]
        for session in sessions:
            await session.execute(SELECT_ONE)
        for session in sessions:
            await session.close()
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            async with factory() as session:
                (await session.execute(SELECT_ONE)).scalar()
            done += 1
        return done / (time.perf_counter() - started)
    finally:
        await engine.dispose()


def timed(server: PostgresServer, driver: str, rtt_ms: float, rounds: int) -> dict[str, float]:
    """Time each of `TIMED` at ``rtt_ms``: requests per second, the best of ``rounds``."""
    best = dict.fromkeys(TIMED, 0.0)
    with ChaosProxy(server.host, server.port) as proxy:
        proxy.latency(rtt_ms / 2)
        url = proxy.route(server.url(driver))  # type: ignore[arg-type]
        for _ in range(rounds):
            for variant in TIMED:
                if driver == "asyncpg":
                    rate = asyncio.run(_requests_per_second_async(url, variant, 3.0))
                else:
                    rate = requests_per_second(url, variant, 3.0)
                best[variant] = max(best[variant], rate)
    return best


def timed_table(drivers: list[str], rtt_ms: float, rounds: int) -> str:
    """Markdown: requests per second of each of `TIMED` per driver, and over plain."""
    title = (
        f"Single-query requests per second at {rtt_ms:g} ms RTT (one client, pool of 4, "
        f"best of {rounds}), and over plain:"
    )
    lines = [
        "",
        "",
        title,
        "",
        "| driver | " + " | ".join(TIMED) + " |",
        "| --- | " + " | ".join("---:" for _ in TIMED) + " |",
    ]
    with PostgresServer() as server:
        for driver in drivers:
            rates = timed(server, driver, rtt_ms, rounds)
            cells = [f"{rates[v]:.1f} ({rates[v] / rates['plain']:.2f}x)" for v in TIMED]
            lines.append(f"| {driver} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def table(counts: dict[tuple[str, str, str], Count]) -> str:
    """Markdown: one row per driver and shape, one column per variant."""
    lines = [
        "| driver | request | " + " | ".join(VARIANTS) + " | dropsafe's round trips |",
        "| --- | --- | " + " | ".join("---:" for _ in VARIANTS) + " | --- |",
    ]
    for driver in DRIVERS:
        for shape in SHAPES:
            cells = []
            for variant in VARIANTS:
                found = counts.get((driver, variant, shape))
                cells.append("-" if found is None else f"{found.per_request:g}")
            mine = counts.get((driver, "dropsafe", shape))
            named = ", ".join(_short(label) for label in mine.labels) if mine else ""
            lines.append(f"| {driver} | {shape} | " + " | ".join(cells) + f" | {named} |")
    return "\n".join(lines)


def _short(label: str) -> str:
    if label.startswith("P BEGIN"):
        # BEGIN in the extended protocol: sent in a pipeline with the statement that follows
        # it in the same flight (psycopg 3 with dropsafe); a driver's own BEGIN is "Q BEGIN".
        return "BEGIN+statement"
    words = re.sub(r"^[QP] ", "", label).split()
    return " ".join(words[:2]) if words else label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5, help="requests counted per cell")
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--write", action="store_true", help="write docs and results")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="also time requests at it")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; best kept")
    args = parser.parse_args()
    counts: dict[tuple[str, str, str], Count] = {}
    # Plaintext: the proxy names each flight by its first protocol message.
    with PostgresServer(tls=False) as server:
        for statement in SCHEMA:
            server.execute(statement)
        with FlightProxy(server.port) as proxy:
            for driver in args.drivers.split(","):
                url = sa.make_url(server.url(driver)).set(host="127.0.0.1", port=proxy.port)
                rendered = url.render_as_string(hide_password=False)
                for variant in VARIANTS:
                    if variant == "psycopg_pool check" and driver != "psycopg":
                        continue
                    for shape in SHAPES:
                        if shape == "unit verified" and variant != "dropsafe":
                            continue  # only dropsafe verifies; the plain unit is "unverified"
                        found = count(
                            proxy, driver, variant, shape, rendered, requests=args.requests
                        )
                        counts[driver, variant, shape] = found
                        print(
                            f"{driver:9} {variant:19} {shape:16} {found.per_request:5.2f}  "
                            + ", ".join(found.labels)
                        )
    text = table(counts)
    if args.rtt_ms:
        text += timed_table(args.drivers.split(","), args.rtt_ms, args.rounds)
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Round trips per request, counted on the wire\n\n"
            "Written by `python benchmarks/round_trips.py --write`.\n\n" + text + "\n"
        )
        doc = DOC.read_text()
        if _BEGIN in doc:
            head, _, rest = doc.partition(_BEGIN)
            _, _, tail = rest.partition(_END)
            DOC.write_text(f"{head}{_BEGIN}\n{text}\n{_END}{tail}")


if __name__ == "__main__":
    main()
