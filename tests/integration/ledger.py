"""The ledger harness: writers, a seeded fault schedule, and the audit (see test_ledger.py)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import sqlalchemy as sa

from dropsafe.events import CommitResolved

WORKERS = 4
RUN_SECONDS = 6.0
MAX_OPS_PER_WORKER = 400
COMMIT_SLEEP = 0.05
INSERT = sa.text("INSERT INTO ledger (op_id) VALUES (:op_id)")
SCHEMA = f"""
CREATE TABLE ledger (op_id text NOT NULL, written_at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep({COMMIT_SLEEP}); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
# The chaos a policy for this test tolerates: many faults a second, for seconds.
CHAOS_POLICY = {"max_attempts": 30, "deadline": 60, "backoff_max": 0.5}


@dataclass
class Ledger:
    attempted: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    resolved: list[CommitResolved] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)

    def hook(self, event):
        if isinstance(event, CommitResolved):
            self.resolved.append(event)

    def audit(self, server):
        rows = Counter(
            {
                op: int(n)
                for op, n in server.execute("SELECT op_id, count(*) FROM ledger GROUP BY 1")
            }
        )
        lost = [op for op in self.acknowledged if rows[op] == 0]
        duplicated = [op for op, n in rows.items() if n > 1]
        return lost, duplicated


class Nemesis(threading.Thread):
    """Injects faults on a seeded schedule until told to stop; bounded in time and count.

    ``faults`` maps a name to (an action, how often it may run at most, its weight).
    """

    def __init__(self, faults, ledger, seed):
        super().__init__(name="nemesis", daemon=True)
        self.faults, self.ledger = faults, ledger
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.error = None

    def run(self):
        names = [name for name, (_, _, weight) in self.faults.items() for _ in range(weight)]
        deadline = time.monotonic() + 2 * RUN_SECONDS
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


def server_faults(server, proxy):
    """Cuts (FIN and RST) mid-COMMIT, terminated backends, one fast and one crash restart."""
    return {
        "cut-rst": (lambda: proxy.cut("rst"), None, 4),
        "cut-fin": (lambda: proxy.cut("fin"), None, 4),
        "terminate": (lambda: server.terminate_backends(database="postgres"), None, 2),
        "restart-fast": (lambda: server.restart("fast"), 1, 1),
        "restart-immediate": (lambda: server.restart("immediate"), 1, 1),
    }


def prepare(server):
    server.execute(SCHEMA)


def run_sync(faults, unit_of_work_factory, seed):
    ledger = Ledger()
    unit_of_work = unit_of_work_factory(ledger)
    nemesis = Nemesis(faults, ledger, seed)
    stop_at = time.monotonic() + RUN_SECONDS
    lock = threading.Lock()

    def worker(number):
        for n in range(MAX_OPS_PER_WORKER):
            if time.monotonic() > stop_at:
                return
            op_id = f"{seed}-{number}-{n}"
            with lock:
                ledger.attempted.append(op_id)
            try:
                unit_of_work(op_id)
            except Exception:
                with lock:
                    ledger.failed.append(op_id)
            else:
                with lock:
                    ledger.acknowledged.append(op_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    nemesis.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    nemesis.stop.set()
    nemesis.join(timeout=60)
    assert nemesis.error is None, nemesis.error
    assert not any(thread.is_alive() for thread in threads)
    return ledger


async def run_async(faults, unit_of_work_factory, seed):
    ledger = Ledger()
    unit_of_work = unit_of_work_factory(ledger)
    nemesis = Nemesis(faults, ledger, seed)
    stop_at = time.monotonic() + RUN_SECONDS

    async def worker(number):
        for n in range(MAX_OPS_PER_WORKER):
            if time.monotonic() > stop_at:
                return
            op_id = f"{seed}-{number}-{n}"
            ledger.attempted.append(op_id)
            try:
                await unit_of_work(op_id)
            except Exception:
                ledger.failed.append(op_id)
            else:
                ledger.acknowledged.append(op_id)

    nemesis.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(WORKERS))), 120)
    finally:
        nemesis.stop.set()
        await asyncio.to_thread(nemesis.join, 60)
    assert nemesis.error is None, nemesis.error
    return ledger


def summary(ledger, lost, duplicated):
    outcomes = Counter(event.outcome for event in ledger.resolved)
    return (
        f"attempted {len(ledger.attempted)}, acknowledged {len(ledger.acknowledged)}, "
        f"lost {len(lost)}, duplicated {len(duplicated)}, resolved {dict(outcomes)}, "
        f"faults {dict(ledger.faults)}"
    )


def assert_safe(ledger, server):
    lost, duplicated = ledger.audit(server)
    print(summary(ledger, lost, duplicated))  # shown with -s, and in the log of a failure
    assert sum(ledger.faults.values()) >= 10, ledger.faults
    assert lost == [], f"acknowledged ops missing: {lost[:10]}"
    assert duplicated == [], f"ops written twice: {duplicated[:10]}"
    assert len(ledger.acknowledged) >= 0.99 * len(ledger.attempted), (
        f"{len(ledger.acknowledged)} of {len(ledger.attempted)} acknowledged; "
        f"failed: {ledger.failed[:5]}"
    )
    outcomes = Counter(event.outcome for event in ledger.resolved)
    assert outcomes["committed"] > 0, f"no ambiguous COMMIT met and resolved: {outcomes}"
