"""A Jepsen-style ledger: writers tag rows with op ids while a nemesis breaks connections.

Used by dropsafe's tests and benchmarks. The table has no unique constraint, so a unit of
work that runs twice leaves two rows; a deferred constraint trigger makes COMMIT slow, so that
cuts land while COMMITs are in flight. The audit compares what was acknowledged with what the
server holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import dropsafe
from dropsafe._errors import CommitOutcomeUnknown
from dropsafe.events import CommitResolved, Event
from dropsafe.testing._runtime import wait_until
from dropsafe.testing._server import ServerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from dropsafe.testing._proxy import ChaosProxy
    from dropsafe.testing._server import PostgresServer

__all__ = [
    "CHAOS_UNIT",
    "INSERT",
    "NAIVE_ATTEMPTS",
    "NAIVE_BACKOFF",
    "WORKERS",
    "Faults",
    "HookWritingSession",
    "Ledger",
    "Nemesis",
    "failover_faults",
    "guarded_writers",
    "guarded_writers_async",
    "insert_naively",
    "prepare",
    "run_async",
    "run_sync",
    "server_faults",
]

WORKERS = 4
COMMIT_SLEEP = 0.05
MAX_OPS_PER_WORKER = 100_000
INSERT = sa.text("INSERT INTO ledger (op_id) VALUES (:op_id)")
SCHEMA = f"""
CREATE TABLE ledger (op_id text NOT NULL, written_at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep({COMMIT_SLEEP}); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
#: The naive loop's attempts, and its backoff after a failed connect (doubling, capped).
NAIVE_ATTEMPTS = 30
NAIVE_BACKOFF = (0.05, 0.5)
# What a policy facing many faults a second, for seconds, needs.
CHAOS_UNIT = dropsafe.UnitPolicy(max_attempts=30, deadline=60, backoff_max=0.5)

_Unit = TypeVar("_Unit")

# name -> (action, the most times it may run or None, its weight in the draw)
Faults = dict[str, tuple["Callable[[], object]", "int | None", int]]


@dataclass
class Ledger:
    """What the writers attempted and what was acknowledged; what the nemesis did."""

    attempted: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: Ops whose COMMIT outcome the server could not tell (`CommitOutcomeUnknown`).
    unknown: list[str] = field(default_factory=list)
    resolved: list[CommitResolved] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @contextlib.contextmanager
    def writing(self, op_id: str) -> Iterator[None]:
        """Count ``op_id`` as attempted, then as the ``with`` block's write of it ended.

        Safe from several threads; what the app sees of an error is what is counted.
        """
        with self._lock:
            self.attempted.append(op_id)
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:  # the op's outcome, as the app saw it
            error = exc
        with self._lock:
            self.note(op_id, error)

    def note(self, op_id: str, error: BaseException | None) -> None:
        """Count one op: acknowledged (no error), unknown, or failed."""
        if error is None:
            self.acknowledged.append(op_id)
        elif isinstance(error, CommitOutcomeUnknown):
            self.unknown.append(op_id)
        else:
            self.failed.append(op_id)

    def hook(self, event: Event) -> None:
        """Record resolved commits (a policy hook)."""
        if isinstance(event, CommitResolved):
            self.resolved.append(event)

    def audit(self, server: PostgresServer) -> tuple[list[str], list[str]]:
        """Return the acknowledged ops missing on ``server``, and the ops written twice."""
        rows = Counter(
            {
                op: int(n)
                for op, n in server.execute("SELECT op_id, count(*) FROM ledger GROUP BY 1")
            }
        )
        lost = [op for op in self.acknowledged if rows[op] == 0]
        duplicated = [op for op, n in rows.items() if n > 1]
        return lost, duplicated

    def summary(self, lost: list[str], duplicated: list[str]) -> str:
        """One line saying what happened."""
        outcomes = Counter(event.outcome for event in self.resolved)
        return (
            f"attempted {len(self.attempted)}, acknowledged {len(self.acknowledged)}, "
            f"unknown {len(self.unknown)}, failed {len(self.failed)}, "
            f"lost {len(lost)}, duplicated {len(duplicated)}, resolved {dict(outcomes)}, "
            f"faults {dict(self.faults)}"
        )


class Nemesis(threading.Thread):
    """Injects faults on a seeded schedule until told to stop; bounded in time and count."""

    def __init__(self, faults: Faults, ledger: Ledger, seed: int, seconds: float) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.faults, self.ledger, self.seconds = faults, ledger, seconds
        self.rng = random.Random(seed)  # a fault schedule, not cryptography
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Draw and inject faults every 0.15-0.35 s."""
        names = [name for name, (_, _, weight) in self.faults.items() for _ in range(weight)]
        deadline = time.monotonic() + 2 * self.seconds
        try:
            # The pause paces the fault schedule; it synchronises nothing.
            while not self.stop.wait(self.rng.uniform(0.15, 0.35)):
                if time.monotonic() > deadline:
                    break
                name = self.rng.choice(names)
                action, limit, _ = self.faults[name]
                if limit is not None and self.ledger.faults[name] >= limit:
                    continue
                action()
                self.ledger.faults[name] += 1
        except Exception as exc:
            self.error = exc


def server_faults(server: PostgresServer, proxy: ChaosProxy) -> Faults:
    """Cuts mid-COMMIT, terminations, fast, immediate and crash restarts.

    A crash restart is a backend SIGKILLed, as the OOM killer does: the postmaster resets
    every backend and replays WAL, and xids whose WAL was lost are handed out again.
    """
    return {
        "cut-rst": (lambda: proxy.cut("rst"), None, 4),
        "cut-fin": (lambda: proxy.cut("fin"), None, 4),
        "terminate": (lambda: server.terminate_backends(database="postgres"), None, 2),
        "restart-fast": (lambda: server.restart("fast"), 1, 1),
        "restart-immediate": (lambda: server.restart("immediate"), 1, 1),
        "crash": (lambda: crash_a_backend(server), 2, 1),
    }


def crash_a_backend(server: PostgresServer) -> None:
    """SIGKILL one client backend, as the OOM killer would: a crash restart of the server."""
    rows = server.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND pid <> pg_backend_pid() LIMIT 1"
    )
    if rows:
        if not server.signal_backend(int(rows[0][0]), signal.SIGKILL):
            return  # it ended meanwhile
        # The nemesis waits out the recovery, so that its next fault meets a running server.
        wait_until(lambda: _answers(server), timeout=30, what="crash recovery")


def _answers(server: PostgresServer) -> bool:
    try:
        server.execute("SELECT 1")
    except ServerError:
        return False
    return True


def failover_faults(primary: PostgresServer, standby: PostgresServer, proxy: ChaosProxy) -> Faults:
    """Cuts and terminations, and once a failover behind the proxy.

    The primary crashes and its synchronous standby is promoted behind the same endpoint, as a
    managed database fails over.
    """
    current = [primary]

    def fail_over() -> None:
        primary.stop("immediate")
        standby.promote()
        proxy.upstream_port = standby.port
        proxy.cut("rst")
        current[0] = standby

    return {
        "cut-rst": (lambda: proxy.cut("rst"), None, 4),
        "terminate": (lambda: current[0].terminate_backends(database="postgres"), None, 2),
        "failover": (fail_over, 1, 4),
    }


class HookWritingSession(Session):
    """A Session whose ``before_commit`` hook writes the op (as audit and outbox hooks do)."""


@sa.event.listens_for(HookWritingSession, "before_commit")
def _write_op_at_commit(session: Session) -> None:
    op_id = session.info.get("ledger_op")
    if op_id is not None:
        session.execute(INSERT, {"op_id": op_id})


def guarded_writers(
    url: str,
    engines: list[sa.Engine],
    *,
    write_at_commit: bool = False,
    **engine_kwargs: Any,  # noqa: ANN401 - create_engine's
) -> Callable[[Ledger], Callable[[str], object]]:
    """Return the unit-of-work factory for `run_sync`: dropsafe's engine and run_transaction.

    With ``write_at_commit`` the unit only reads and a ``before_commit`` hook writes the op.
    Each engine made is appended to ``engines``, for the caller to dispose of.
    """

    def factory(ledger: Ledger) -> Callable[[str], object]:
        policy = dropsafe.Policy(unit=CHAOS_UNIT, hooks=(ledger.hook,))
        engine = dropsafe.create_engine(
            url, policy=policy, pool_size=WORKERS, max_overflow=WORKERS, **engine_kwargs
        )
        engines.append(engine)
        session_factory = cast(
            "sessionmaker[Session]", sessionmaker(engine, class_=HookWritingSession)
        )

        def unit(session: Session, op_id: str) -> None:
            if write_at_commit:
                session.info["ledger_op"] = op_id
                session.execute(sa.text("SELECT 1"))
            else:
                session.execute(INSERT, {"op_id": op_id})

        return lambda op_id: dropsafe.run_transaction(
            session_factory, lambda session: unit(session, op_id)
        )

    return factory


def guarded_writers_async(
    url: str,
    engines: list[AsyncEngine],
    **engine_kwargs: Any,  # noqa: ANN401
) -> Callable[[Ledger], Callable[[str], Awaitable[object]]]:
    """`guarded_writers` for `run_async`: dropsafe's async engine and run_transaction_async."""

    def factory(ledger: Ledger) -> Callable[[str], Awaitable[object]]:
        policy = dropsafe.Policy(unit=CHAOS_UNIT, hooks=(ledger.hook,))
        engine = dropsafe.create_async_engine(
            url, policy=policy, pool_size=WORKERS, max_overflow=WORKERS, **engine_kwargs
        )
        engines.append(engine)
        session_factory = async_sessionmaker(engine)

        async def insert(session: AsyncSession, op_id: str) -> None:
            await session.execute(INSERT, {"op_id": op_id})

        return lambda op_id: dropsafe.run_transaction_async(
            session_factory, lambda session: insert(session, op_id)
        )

    return factory


def insert_naively(engine: sa.Engine, op_id: str) -> None:
    """Insert one op as careful teams do today; with pre_ping, the ledger's baseline.

    A connect that fails (refused, or the server starting up or shutting down) sent nothing, so
    it is tried again after a short backoff; a unit cut by a disconnect is run again at once.
    The second is what duplicates ops: nothing here asks whether the lost COMMIT happened.
    """
    for attempt in range(NAIVE_ATTEMPTS):
        try:
            connection = engine.connect()
        except sa.exc.OperationalError:
            first, most = NAIVE_BACKOFF
            time.sleep(min(first * 2**attempt, most))
            continue
        try:
            with connection, Session(connection) as session, session.begin():
                session.execute(INSERT, {"op_id": op_id})
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                continue
            raise
        return
    msg = f"gave up after {NAIVE_ATTEMPTS} attempts"
    raise RuntimeError(msg)


def _set_up(
    faults: Faults, unit_of_work_factory: Callable[[Ledger], _Unit], seed: int, seconds: float
) -> tuple[Ledger, _Unit, Nemesis, float]:
    """Make a run's ledger, the writers' unit of work and the nemesis (not started).

    The run starts now: the last item is when the writers stop (monotonic).
    """
    ledger = Ledger()
    unit_of_work = unit_of_work_factory(ledger)
    nemesis = Nemesis(faults, ledger, seed, seconds)
    return ledger, unit_of_work, nemesis, time.monotonic() + seconds


def _op_ids(seed: int, worker: int, stop_at: float) -> Iterator[str]:
    """Give a writer's op ids, unique across the run, until ``stop_at`` (monotonic)."""
    for n in range(MAX_OPS_PER_WORKER):
        if time.monotonic() > stop_at:
            return
        yield f"{seed}-{worker}-{n}"


def prepare(server: PostgresServer) -> None:
    """Create the ledger table and its slow-COMMIT trigger."""
    server.execute(SCHEMA)


def run_sync(
    faults: Faults,
    unit_of_work_factory: Callable[[Ledger], Callable[[str], object]],
    seed: int,
    *,
    seconds: float = 6.0,
    workers: int = WORKERS,
) -> Ledger:
    """Run writer threads for ``seconds`` under the nemesis; return the ledger."""
    ledger, unit_of_work, nemesis, stop_at = _set_up(faults, unit_of_work_factory, seed, seconds)

    def worker(number: int) -> None:
        for op_id in _op_ids(seed, number, stop_at):
            with ledger.writing(op_id):
                unit_of_work(op_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    nemesis.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    nemesis.stop.set()
    nemesis.join(timeout=60)
    ledger.seconds = time.monotonic() - (stop_at - seconds)
    if nemesis.error is not None:
        raise nemesis.error
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a ledger writer did not stop in time")
    return ledger


async def run_async(
    faults: Faults,
    unit_of_work_factory: Callable[[Ledger], Callable[[str], Awaitable[object]]],
    seed: int,
    *,
    seconds: float = 6.0,
    workers: int = WORKERS,
) -> Ledger:
    """`run_sync` with writer tasks on the running event loop."""
    ledger, unit_of_work, nemesis, stop_at = _set_up(faults, unit_of_work_factory, seed, seconds)

    async def worker(number: int) -> None:
        for op_id in _op_ids(seed, number, stop_at):
            with ledger.writing(op_id):
                await unit_of_work(op_id)

    nemesis.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(workers))), seconds + 120)
    finally:
        nemesis.stop.set()
        await asyncio.to_thread(nemesis.join, 60)
    ledger.seconds = time.monotonic() - (stop_at - seconds)
    if nemesis.error is not None:
        raise nemesis.error
    return ledger
