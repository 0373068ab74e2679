"""High-availability scenarios on a Patroni cluster: writers of each kind, one event, an audit.

Every variant (plain pool, ``pool_pre_ping=True``, dropsafe; through HAProxy or a multi-host
URL) writes tagged rows from its own thread, all at once, while one event strikes the leader:
a planned switchover, the postmaster SIGKILLed, the node crashed, the leader hung (SIGSTOP) or
cut off in the kernel, etcd lost. The audit then compares what each acknowledged with what the
new leader holds: acknowledged writes lost, rows written twice. Unavailability is the longest
gap between two acknowledged writes after the event; errors are the ones the app saw.

Writers are bounded in count and time; a write that hangs (a plain pool on a hung server has no
timeout) ends when the event is undone, which the scenario does after a bounded hold.

dropsafe writes through psycopg2 and, with ``drivers``, through psycopg 3 and asyncpg on
asyncio (``create_async_engine`` + ``run_transaction_async``, one event loop per writer thread);
the plain and pre-ping baselines use psycopg2. Each write returns its transaction id, so the
audit can name the acknowledged writes a failover lost (`VariantResult.lost_writes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa

import dropsafe
from dropsafe._errors import CommitOutcomeUnknown
from dropsafe._redaction import describe_error
from dropsafe.events import AcknowledgedCommitLost
from dropsafe.testing._server import ServerError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from dropsafe.events import Event, Hook
    from dropsafe.testing._patroni import PatroniCluster

__all__ = [
    "DRIVERS",
    "KINDS",
    "ROUTES",
    "SCENARIOS",
    "Outcome",
    "VariantResult",
    "Writer",
    "hold_of",
    "run_scenario",
]

Kind = Literal["plain", "pre_ping", "dropsafe"]
Route = Literal["haproxy", "multi_host"]
KINDS: tuple[Kind, ...] = ("plain", "pre_ping", "dropsafe")
ROUTES: tuple[Route, ...] = ("haproxy", "multi_host")
Driver = Literal["psycopg2", "psycopg", "asyncpg"]
# psycopg 3 and asyncpg run on asyncio, for dropsafe only (the baselines need no second driver).
DRIVERS: tuple[Driver, ...] = ("psycopg2", "psycopg", "asyncpg")
# The hung leader last: Debian's Patroni 3.0.2, stopped mid-loop, may take its leader key back
# from the node promoted meanwhile, and leave the cluster unable to record a synchronous standby.
SCENARIOS = (
    "switchover",
    "postmaster_kill",
    "node_crash",
    "leader_cut",
    "etcd_lost",
    "leader_hung",
)

TABLE = "ha_ledger"
# The transaction id comes back with the acknowledgement: a lost write can be named by it.
INSERT = sa.text(
    f"INSERT INTO {TABLE} (op_id) VALUES (:op_id) RETURNING pg_current_xact_id()::text"
)
_INTERVAL = 0.05  # between two writes of one writer
_MAX_OPS = 20_000
# dropsafe's unit of work: a deadline that ends every unit, whatever the server does. Longer
# than a failover under Patroni 4 (ttl 20 s at least, then a promotion): an app that gives a
# unit less sees the failover as an error.
UNIT_DEADLINE = 30.0
# The faults that last (hang, cut, etcd down), held ttl + HOLD_PAST_TTL seconds before they are
# undone: long enough for the leader key to expire and a standby to take writes.
LASTING = ("leader_hung", "leader_cut", "etcd_lost")
HOLD_PAST_TTL = 10.0


def hold_of(scenario: str, ttl: float) -> float:
    """Return how long ``scenario``'s fault is held under ``ttl`` (0: it does not last)."""
    return ttl + HOLD_PAST_TTL if scenario in LASTING else 0.0


@dataclass
class Outcome:
    """One write: when it started and ended, and what the app got."""

    op_id: str
    started: float
    ended: float
    result: Literal["ack", "error", "unknown"]
    error: str = ""
    xid: str = ""  # the transaction id the server gave an acknowledged write


@dataclass
class VariantResult:
    """What one variant saw around one event."""

    variant: str
    attempted: int
    acknowledged: int
    errors: int
    unknown: int
    lost: int
    duplicated: int
    unavailable: float  # the longest gap between two acknowledged writes after the event
    first_write_after: float  # from the event to the write that ended that gap
    longest_write: float  # the slowest single write (a unit of work ends by its deadline)
    error_kinds: dict[str, int] = field(default_factory=dict)
    # Each acknowledged write the audit did not find (op_id, xid, when it was acknowledged).
    lost_writes: list[Outcome] = field(default_factory=list)
    # dropsafe's AcknowledgedCommitLost events: acknowledged writes it reported a failover lost.
    reported_lost: int = 0
    # When the event began (``time.monotonic()``, as each write's ``started`` and ``ended``).
    event_at: float = float("nan")
    # When the fault was wholly in place: a hang's SIGSTOPs go out one process at a time, and
    # a write the old leader acknowledged meanwhile may not have streamed (its walsender
    # stopped first).
    event_in_place_at: float = float("nan")


def variant_name(kind: Kind, driver: Driver, route: Route) -> str:
    """Name a writer: ``dropsafe/haproxy`` (psycopg2), ``dropsafe-asyncpg/multi_host``."""
    return f"{kind}/{route}" if driver == "psycopg2" else f"{kind}-{driver}/{route}"


class Writer(threading.Thread):
    """Writes one tagged row at a time through one engine, until told to stop.

    A psycopg 3 or asyncpg writer runs an event loop of its own in this thread; its engine is
    made and disposed of in that loop (asyncpg's connections belong to the loop they were made
    in). Every writer disposes of its engine when it ends.
    """

    def __init__(
        self, name: str, kind: Kind, url: str, stop_at: float, driver: Driver = "psycopg2"
    ) -> None:
        super().__init__(name=f"ha-writer-{name}", daemon=True)
        if driver != "psycopg2" and kind != "dropsafe":
            raise ValueError(f"only dropsafe writes through {driver}: {kind!r}")
        self.variant, self.kind, self.driver, self.stop_at = name, kind, driver, stop_at
        self.url = url
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.finished_at: float | None = None  # when it stopped writing
        self.reported_lost = 0

    def _count_report(self, event: Event) -> None:
        if isinstance(event, AcknowledgedCommitLost):
            self.reported_lost += 1

    def run(self) -> None:
        """Write until stopped, ``stop_at``, or ``_MAX_OPS`` writes."""
        try:
            self._run()
        finally:
            self.finished_at = time.monotonic()

    def _run(self) -> None:
        if self.driver != "psycopg2":
            asyncio.run(self._run_async())
            return
        engine = _engine(self.kind, self.url, self._count_report)
        write = _writer(self.kind, engine)
        try:
            for op_id, started in self._ops():
                try:
                    xid = write(op_id)
                except Exception as exc:  # what the app sees is what we count
                    self._failed(op_id, started, exc)
                else:
                    self._acknowledged(op_id, started, xid)
                # Paces the writes; it synchronises nothing.
                self.stop.wait(_INTERVAL)
        finally:
            with contextlib.suppress(Exception):
                engine.dispose()

    async def _run_async(self) -> None:
        engine = _async_engine(self.url, self._count_report)
        try:
            for op_id, started in self._ops():
                try:
                    xid = await _write_async(engine, op_id)
                except Exception as exc:  # what the app sees is what we count
                    self._failed(op_id, started, exc)
                else:
                    self._acknowledged(op_id, started, xid)
                await asyncio.sleep(_INTERVAL)  # paces the writes
        finally:
            with contextlib.suppress(Exception):
                await engine.dispose()

    def _ops(self) -> Iterator[tuple[str, float]]:
        """Give each op to write and when it started, until stopped, ``stop_at`` or ``_MAX_OPS``."""
        for number in range(_MAX_OPS):
            if self.stop.is_set() or time.monotonic() > self.stop_at:
                return
            yield f"{self.variant}-{number}", time.monotonic()

    def _acknowledged(self, op_id: str, started: float, xid: str) -> None:
        self.outcomes.append(Outcome(op_id, started, time.monotonic(), "ack", xid=xid))

    def _failed(self, op_id: str, started: float, exc: Exception) -> None:
        if isinstance(exc, CommitOutcomeUnknown):
            self.outcomes.append(
                Outcome(op_id, started, time.monotonic(), "unknown", describe_error(exc))
            )
        else:
            self.outcomes.append(
                Outcome(op_id, started, time.monotonic(), "error", type(exc).__name__)
            )


def _policy(hook: Hook | None) -> dropsafe.Policy:
    return dropsafe.Policy(
        unit=dropsafe.UnitPolicy(deadline=UNIT_DEADLINE, max_attempts=50),
        hooks=(*dropsafe.Policy().hooks, *([hook] if hook else [])),
    )


def _engine(kind: Kind, url: str, hook: Hook | None = None) -> sa.Engine:
    if kind == "dropsafe":
        return dropsafe.create_engine(url, policy=_policy(hook))
    return sa.create_engine(url, pool_pre_ping=kind == "pre_ping")


def _async_engine(url: str, hook: Hook | None = None) -> AsyncEngine:
    return dropsafe.create_async_engine(url, policy=_policy(hook))


def _writer(kind: Kind, engine: sa.Engine) -> Callable[[str], str]:
    if kind == "dropsafe":

        def guarded(op_id: str) -> str:
            return dropsafe.run_transaction(
                engine, lambda conn: str(conn.execute(INSERT, {"op_id": op_id}).scalar_one())
            )

        return guarded

    def naive(op_id: str) -> str:
        with engine.begin() as conn:
            return str(conn.execute(INSERT, {"op_id": op_id}).scalar_one())

    return naive


async def _write_async(engine: AsyncEngine, op_id: str) -> str:
    async def unit(conn: AsyncConnection) -> str:
        return str((await conn.execute(INSERT, {"op_id": op_id})).scalar_one())

    return await dropsafe.run_transaction_async(engine, unit)


def _event(cluster: PatroniCluster, scenario: str) -> Callable[[], None]:
    """Strike, and return what undoes a fault that lasts (or nothing to do)."""
    if scenario == "switchover":
        cluster.switchover()
    elif scenario == "postmaster_kill":
        cluster.kill_postmaster()
    elif scenario == "node_crash":
        cluster.crash_leader_node()
    elif scenario == "leader_hung":
        cluster.hang_leader()
        return cluster.resume
    elif scenario == "leader_cut":
        cluster.cut_leader()
        return cluster.resume
    elif scenario == "etcd_lost":
        cluster.stop_etcd()
        return cluster.start_etcd
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return lambda: None


def run_scenario(
    cluster: PatroniCluster,
    scenario: str,
    *,
    kinds: tuple[Kind, ...] = KINDS,
    routes: tuple[Route, ...] = ROUTES,
    drivers: tuple[Driver, ...] = ("psycopg2",),
    before: float = 2.0,
    after: float = UNIT_DEADLINE + 5,
    limit: float = 120.0,
    hold: float | None = None,
) -> list[VariantResult]:
    """Run every variant's writer through ``scenario``; return each one's figures.

    Writers start ``before`` seconds ahead of the event and run until ``after`` seconds past
    the later of the event's end and the cluster's recovery (long enough by default for a unit
    of work that began as the event ended to reach its deadline), ``limit`` seconds at most. A
    fault that lasts is held ``hold`` seconds (default: `hold_of` the cluster's ttl). Writers
    go through psycopg2 (every kind) and the other ``drivers`` (dropsafe only).
    """
    cluster.revive()
    cluster.execute(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (op_id text NOT NULL)")
    stop_at = time.monotonic() + before + limit
    writers = [
        Writer(
            variant_name(kind, driver, route), kind, _url(cluster, driver, route), stop_at, driver
        )
        for route in routes
        for driver in drivers
        for kind in kinds
        if driver == "psycopg2" or kind == "dropsafe"
    ]
    try:
        for writer in writers:
            writer.start()
        _wait_for_first_writes(writers, before)
        event_at = time.monotonic()
        undo = _event(cluster, scenario)
        event_in_place_at = time.monotonic()
        if hold is None:
            hold = hold_of(scenario, cluster.ttl)
        if hold:
            time.sleep(hold)  # the fault lasts this long: it is the scenario, not a wait
        undo()
        cluster.wait_for_leader(limit)
        end = min(time.monotonic() + after, stop_at)
        while time.monotonic() < end:
            time.sleep(0.2)  # writers keep writing: the scenario's tail, not a wait
    finally:
        for writer in writers:
            writer.stop.set()
        cluster.resume()
        cluster.start_etcd()
        for writer in writers:
            writer.join(timeout=UNIT_DEADLINE + 120)
    # Audit on the leader, once every node that lives streams again. After a hung leader came
    # back, Patroni 3.0.2 may never record a synchronous standby again: the audit then reads
    # the leader as it is.
    try:
        cluster.wait_healthy(60)
    except ServerError:
        cluster.wait_for_leader(limit)
    counted = cluster.execute(f"SELECT op_id, count(*) FROM {TABLE} GROUP BY 1")
    rows = Counter({op: int(n) for op, n in counted})
    return [_figures(writer, event_at, rows, event_in_place_at) for writer in writers]


def _url(cluster: PatroniCluster, driver: Driver, route: Route) -> str:
    return cluster.url(driver) if route == "haproxy" else cluster.multi_host_url(driver)


def _wait_for_first_writes(writers: list[Writer], timeout: float) -> None:
    deadline = time.monotonic() + max(timeout, 30.0)
    while not all(any(o.result == "ack" for o in w.outcomes) for w in writers):
        if time.monotonic() > deadline:
            raise TimeoutError("a writer could not write before the event")
        time.sleep(0.05)
    # A steady pace before the event: `timeout` more seconds of writes.
    time.sleep(timeout)


def _figures(
    writer: Writer, event_at: float, rows: Counter[str], event_in_place_at: float
) -> VariantResult:
    outcomes = list(writer.outcomes)
    acks = sorted(o.ended for o in outcomes if o.result == "ack")
    before = [t for t in acks if t <= event_at]
    after = [t for t in acks if t > event_at]
    previous = before[-1] if before else event_at
    gap, recovered = 0.0, None
    for moment in after:
        if moment - previous > gap:
            gap, recovered = moment - previous, moment
        previous = moment
    # Down from its last acknowledged write to the end of the run (a writer stuck on a node
    # that never came back), when that is the longest gap: it never recovered.
    end = max([previous, *(o.ended for o in outcomes), writer.finished_at or previous])
    if end - previous > max(gap, 1.0):
        gap, recovered = end - previous, None
    acked = [o for o in outcomes if o.result == "ack"]
    lost = [o for o in acked if rows[o.op_id] == 0]
    mine = [op for op in rows if op.startswith(writer.variant + "-")]
    return VariantResult(
        variant=writer.variant,
        attempted=len(outcomes),
        acknowledged=len(acked),
        errors=sum(1 for o in outcomes if o.result == "error"),
        unknown=sum(1 for o in outcomes if o.result == "unknown"),
        lost=len(lost),
        duplicated=sum(1 for op in mine if rows[op] > 1),
        unavailable=gap,
        first_write_after=(recovered - event_at) if recovered is not None else float("nan"),
        longest_write=max((o.ended - o.started for o in outcomes), default=0.0),
        error_kinds=dict(Counter(o.error for o in outcomes if o.result == "error")),
        lost_writes=lost,
        reported_lost=writer.reported_lost,
        event_at=event_at,
        event_in_place_at=event_in_place_at,
    )
