"""High-availability scenarios on a Patroni cluster: writers of each kind, one event, an audit.

Every variant (plain pool, ``pool_pre_ping=True``, dropsafe; through HAProxy or a multi-host
URL) writes tagged rows from its own thread, all at once, while one event strikes the leader:
a planned switchover, the postmaster SIGKILLed, the node crashed, the leader hung (SIGSTOP) or
cut off in the kernel, etcd lost. The audit then compares what each acknowledged with what the
new leader holds: acknowledged writes lost, rows written twice. Unavailability is the longest
gap between two acknowledged writes after the event; errors are the ones the app saw.

Writers are bounded in count and time; a write that hangs (a plain pool on a hung server has no
timeout) ends when the event is undone, which the scenario does after a bounded hold.
"""

from __future__ import annotations

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
    from collections.abc import Callable

    from dropsafe.events import Event, Hook
    from dropsafe.testing._patroni import PatroniCluster

__all__ = [
    "KINDS",
    "ROUTES",
    "SCENARIOS",
    "Outcome",
    "VariantResult",
    "Writer",
    "run_scenario",
]

Kind = Literal["plain", "pre_ping", "dropsafe"]
Route = Literal["haproxy", "multi_host"]
KINDS: tuple[Kind, ...] = ("plain", "pre_ping", "dropsafe")
ROUTES: tuple[Route, ...] = ("haproxy", "multi_host")
# The hung leader last: a Patroni that was stopped mid-loop may take its leader key back from
# the node promoted meanwhile, and leave the cluster unable to record a synchronous standby.
SCENARIOS = (
    "switchover",
    "postmaster_kill",
    "node_crash",
    "leader_cut",
    "etcd_lost",
    "leader_hung",
)

TABLE = "ha_ledger"
INSERT = sa.text(f"INSERT INTO {TABLE} (op_id) VALUES (:op_id)")  # noqa: S608 - a constant
_INTERVAL = 0.05  # between two writes of one writer
_MAX_OPS = 20_000
# dropsafe's unit of work: a deadline that ends every unit, whatever the server does.
UNIT_DEADLINE = 15.0
# How long a fault that lasts (hang, cut, etcd down) is held before it is undone.
HOLD = {"leader_hung": 20.0, "leader_cut": 25.0, "etcd_lost": 25.0}


@dataclass
class Outcome:
    """One write: when it started and ended, and what the app got."""

    op_id: str
    started: float
    ended: float
    result: Literal["ack", "error", "unknown"]
    error: str = ""


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
    # dropsafe's AcknowledgedCommitLost events: acknowledged writes it reported a failover lost.
    reported_lost: int = 0


class Writer(threading.Thread):
    """Writes one tagged row at a time through one engine, until told to stop."""

    def __init__(self, name: str, kind: Kind, url: str, stop_at: float) -> None:
        super().__init__(name=f"ha-writer-{name}", daemon=True)
        self.variant, self.kind, self.stop_at = name, kind, stop_at
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.reported_lost = 0
        self.engine = _engine(kind, url, self._count_report)
        self._write = _writer(kind, self.engine)

    def _count_report(self, event: Event) -> None:
        if isinstance(event, AcknowledgedCommitLost):
            self.reported_lost += 1

    def run(self) -> None:
        """Write until stopped, ``stop_at``, or ``_MAX_OPS`` writes."""
        for number in range(_MAX_OPS):
            if self.stop.is_set() or time.monotonic() > self.stop_at:
                return
            op_id = f"{self.variant}-{number}"
            started = time.monotonic()
            try:
                self._write(op_id)
            except CommitOutcomeUnknown as exc:
                self.outcomes.append(
                    Outcome(op_id, started, time.monotonic(), "unknown", describe_error(exc))
                )
            except Exception as exc:  # noqa: BLE001 - what the app sees is what we count
                self.outcomes.append(
                    Outcome(op_id, started, time.monotonic(), "error", type(exc).__name__)
                )
            else:
                self.outcomes.append(Outcome(op_id, started, time.monotonic(), "ack"))
            # Paces the writes; it synchronises nothing.
            self.stop.wait(_INTERVAL)


def _engine(kind: Kind, url: str, hook: Hook | None = None) -> sa.Engine:
    if kind == "dropsafe":
        policy = dropsafe.Policy(
            unit=dropsafe.UnitPolicy(deadline=UNIT_DEADLINE, max_attempts=50),
            hooks=(*dropsafe.Policy().hooks, *([hook] if hook else [])),
        )
        return dropsafe.create_engine(url, policy=policy)
    return sa.create_engine(url, pool_pre_ping=kind == "pre_ping")


def _writer(kind: Kind, engine: sa.Engine) -> Callable[[str], None]:
    if kind == "dropsafe":

        def guarded(op_id: str) -> None:
            dropsafe.run_transaction(engine, lambda conn: conn.execute(INSERT, {"op_id": op_id}))

        return guarded

    def naive(op_id: str) -> None:
        with engine.begin() as conn:
            conn.execute(INSERT, {"op_id": op_id})

    return naive


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
    before: float = 2.0,
    after: float = 15.0,
    limit: float = 90.0,
    hold: float | None = None,
) -> list[VariantResult]:
    """Run every variant's writer through ``scenario``; return each one's figures.

    Writers start ``before`` seconds ahead of the event and run until ``after`` seconds past
    the later of the event's end and the cluster's recovery, ``limit`` seconds at most. A
    fault that lasts is held ``hold`` seconds (default: `HOLD`'s).
    """
    cluster.revive()
    cluster.execute(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (op_id text NOT NULL)")
    urls = {"haproxy": cluster.url("psycopg2"), "multi_host": cluster.multi_host_url("psycopg2")}
    stop_at = time.monotonic() + before + limit
    writers = [
        Writer(f"{kind}/{route}", kind, urls[route], stop_at) for route in routes for kind in kinds
    ]
    try:
        for writer in writers:
            writer.start()
        _wait_for_first_writes(writers, before)
        event_at = time.monotonic()
        undo = _event(cluster, scenario)
        if hold is None:
            hold = HOLD.get(scenario, 0.0)
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
    counted = cluster.execute(f"SELECT op_id, count(*) FROM {TABLE} GROUP BY 1")  # noqa: S608
    rows = Counter({op: int(n) for op, n in counted})
    results = [_figures(writer, event_at, rows) for writer in writers]
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.engine.dispose()
    return results


def _wait_for_first_writes(writers: list[Writer], timeout: float) -> None:
    deadline = time.monotonic() + max(timeout, 30.0)
    while not all(any(o.result == "ack" for o in w.outcomes) for w in writers):
        if time.monotonic() > deadline:
            raise TimeoutError("a writer could not write before the event")
        time.sleep(0.05)
    # A steady pace before the event: `timeout` more seconds of writes.
    time.sleep(timeout)


def _figures(writer: Writer, event_at: float, rows: Counter[str]) -> VariantResult:
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
    if recovered is None:  # nothing acknowledged after the event: down to the end
        gap = (outcomes[-1].ended if outcomes else event_at) - event_at
    acked = [o.op_id for o in outcomes if o.result == "ack"]
    mine = [op for op in rows if op.startswith(writer.variant + "-")]
    return VariantResult(
        variant=writer.variant,
        attempted=len(outcomes),
        acknowledged=len(acked),
        errors=sum(1 for o in outcomes if o.result == "error"),
        unknown=sum(1 for o in outcomes if o.result == "unknown"),
        lost=sum(1 for op in acked if rows[op] == 0),
        duplicated=sum(1 for op in mine if rows[op] > 1),
        unavailable=gap,
        first_write_after=(recovered - event_at) if recovered is not None else float("nan"),
        longest_write=max((o.ended - o.started for o in outcomes), default=0.0),
        error_kinds=dict(Counter(o.error for o in outcomes if o.result == "error")),
        reported_lost=writer.reported_lost,
    )
