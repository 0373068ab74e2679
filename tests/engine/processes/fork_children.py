"""Fork children after the parent used dropsafe, and report what each child saw, as JSON.

Run as a script (``python fork_children.py URL DRIVER``) so that the forks happen in a process
that has no test machinery's threads. The parent first runs a unit of work that retries once and
a checkout ping (which start the watchdog thread and draw from the jitter's generator), then
forks ``CHILDREN`` children, as a pre-fork server does with ``--preload``. Each child, after
SQLAlchemy's own after-fork step (``engine.dispose(close=False)``):

- runs a unit that fails twice with a real serialization failure (SQLSTATE 40001 raised by the
  server) and records the backoff delays it was given (`RetryScheduled` events);
- runs a unit of work with ``deadline=DEADLINE`` whose statement never ends on its own (a
  ``pg_sleep`` far longer than the deadline, the server's stand-in for a hung backend), and
  records how long it took to be given up and with which error;
- checks out a connection whose backend is stopped (SIGSTOP), and records how long the
  checkout's ping took to give up on it (``ping_timeout=PING_TIMEOUT``) and hand out a fresh one.

The parent bounds each child (``CHILD_BOUND``), kills one that overruns, and prints one JSON
line: per child the delays, the elapsed time, the error type (or "killed"), the ping's time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

import sqlalchemy as sa

import dropsafe
from dropsafe.events import RetryScheduled

CHILDREN = 4
DEADLINE = 2.0
PING_TIMEOUT = 1.0
CHILD_BOUND = 20.0
SERIALIZATION_FAILURE = sa.text(
    "DO $$ BEGIN RAISE EXCEPTION 'planted conflict' USING ERRCODE = '40001'; END $$"
)


def main(url: str) -> None:
    delays: list[float] = []

    def record(event: object) -> None:
        if isinstance(event, RetryScheduled):
            delays.append(event.delay)

    policy = dropsafe.Policy(
        unit=dropsafe.UnitPolicy(max_attempts=3, backoff_initial=0.02, backoff_max=0.02),
        pool=dropsafe.PoolPolicy(ping_after_idle=0, ping_timeout=PING_TIMEOUT),
        hooks=(record,),
    )
    engine = dropsafe.create_engine(url, policy=policy)
    failures = [0]

    def fails_twice(conn: sa.Connection) -> int:
        if failures[0] < 2:
            failures[0] += 1
            conn.execute(SERIALIZATION_FAILURE)
        return 1

    # The parent uses everything a request would: the watchdog thread, the generator, a ping.
    dropsafe.run_transaction(engine, fails_twice)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))

    readers = {}
    for number in range(CHILDREN):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 0
            try:
                child(engine, delays, failures, fails_twice, write_end)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        readers[pid] = (number, read_end)

    results: dict[int, dict[str, object]] = {}
    until = time.monotonic() + CHILD_BOUND
    for pid, (number, read_end) in readers.items():
        report: dict[str, object] = {"outcome": "crashed"}
        data = b""
        while True:
            left = max(0.0, until - time.monotonic())
            ready, _, _ = select.select([read_end], [], [], left)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                report.update(outcome="killed", elapsed=CHILD_BOUND)
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
            for line in data.decode().splitlines():
                report.update(json.loads(line))
        results[number] = report
        os.close(read_end)
        os.waitpid(pid, 0)
    engine.dispose()
    print(json.dumps([results[n] for n in range(CHILDREN)]))


def child(engine, delays, failures, fails_twice, out: int) -> None:
    """Report the backoff delays first, then the hung unit's outcome (a line each)."""
    engine.dispose(close=False)  # SQLAlchemy's after-fork step
    delays.clear()
    failures[0] = 0
    dropsafe.run_transaction(engine, fails_twice)
    os.write(out, (json.dumps({"delays": delays}) + "\n").encode())
    started = time.monotonic()
    try:
        dropsafe.run_transaction(
            engine,
            lambda conn: conn.execute(sa.text("SELECT pg_sleep(60)")),
            deadline=DEADLINE,
            max_attempts=1,
        )
        outcome = "returned"
    except Exception as exc:
        outcome = type(exc).__name__
    report = {"outcome": outcome, "elapsed": time.monotonic() - started}
    os.write(out, (json.dumps(report) + "\n").encode())
    os.write(out, (json.dumps({"ping": checkout_past_a_stopped_backend(engine)}) + "\n").encode())


def checkout_past_a_stopped_backend(engine: sa.Engine) -> float | str:
    """Stop the backend of the pooled connection; time the checkout that pings it (or why not).

    The checkout's ping meets a backend that never answers (SIGSTOP): at ``ping_timeout`` the
    watchdog shuts the socket down and the pool hands out a fresh connection.
    """
    with engine.connect() as conn:
        backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    try:
        os.kill(backend, signal.SIGSTOP)
    except PermissionError:
        return "not permitted"  # the server runs as another user and we are not root
    try:
        started = time.monotonic()
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return time.monotonic() - started
    finally:
        os.kill(backend, signal.SIGCONT)


if __name__ == "__main__":
    main(sys.argv[1])
