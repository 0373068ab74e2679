"""``Policy.ping_timeout`` bounds the checkout ping on every driver, even on a hung backend.

Fault: the backend behind a pooled connection is stopped with SIGSTOP. Its kernel still
acknowledges every packet, so neither keepalives nor tcp_user_timeout ever fire: only the client
can end the wait. Checked: a checkout that pings (the connection sat idle longer than
``ping_after_idle``) returns within ``ping_timeout`` plus a margin, with a fresh connection to
another backend that answers.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe._drivers import face_of, faces
from dropsafe.events import DeadConnectionReplaced

# shared_server: a server of this module's own: it stops backends with SIGSTOP.
pytestmark = [pytest.mark.fault, pytest.mark.own_server]

DRIVERS = faces()
PING_TIMEOUT = 1.0
# A fresh TLS connection and a loaded machine (2 cores shared with other test runs).
MARGIN = 1.5
# The old code waited forever here: the test gives up (and resumes the backend) after this.
HANG_LIMIT = 15.0
BACKEND_PID = sa.text("SELECT pg_backend_pid()")


def _checkout_sync(engine):
    with engine.connect() as conn:
        return conn.execute(BACKEND_PID).scalar()


def _checkout_async(engine):
    async def checkout():
        async with engine.connect() as conn:
            return (await conn.execute(BACKEND_PID)).scalar()

    return checkout()


class Scenario:
    """Check out once, wait for the go (the backend is stopped then), check out again, timed."""

    def __init__(self, server, driver, policy):
        self.server = server
        self.driver, self.is_async = face_of(driver)
        self.policy = policy
        self.ready = threading.Event()
        self.go = threading.Event()
        self.outcome: dict[str, object] = {}

    def run(self):
        if self.is_async:
            asyncio.run(self._run_async())
            return
        engine = dropsafe.create_engine(
            self.server.url(self.driver),
            policy=self.policy,
            connect_args=self.server.connect_args(self.driver),
            pool_size=1,
            max_overflow=0,
        )
        try:
            self.outcome["old"] = _checkout_sync(engine)
            self.ready.set()
            self.go.wait(timeout=HANG_LIMIT)
            started = time.monotonic()
            try:
                self.outcome["new"] = _checkout_sync(engine)
            except Exception as exc:
                self.outcome["error"] = exc
            self.outcome["elapsed"] = time.monotonic() - started
        finally:
            engine.dispose()

    async def _run_async(self):
        engine = dropsafe.create_async_engine(
            self.server.url(self.driver), policy=self.policy, pool_size=1, max_overflow=0
        )
        try:
            self.outcome["old"] = await _checkout_async(engine)
            self.ready.set()
            await asyncio.to_thread(self.go.wait, HANG_LIMIT)
            started = time.monotonic()
            try:
                self.outcome["new"] = await _checkout_async(engine)
            except Exception as exc:
                self.outcome["error"] = exc
            self.outcome["elapsed"] = time.monotonic() - started
        finally:
            await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
def test_ping_timeout_bounds_a_checkout_on_a_stopped_backend(shared_server, driver):
    events = []
    policy = dropsafe.Policy(
        pool=dropsafe.PoolPolicy(ping_after_idle=0, ping_timeout=PING_TIMEOUT),
        hooks=(events.append,),
    )
    scenario = Scenario(shared_server, driver, policy)
    outcome = scenario.outcome
    stopped: list[int] = []
    worker = threading.Thread(target=scenario.run, daemon=True)
    worker.start()
    try:
        assert scenario.ready.wait(timeout=30), "the first checkout did not happen"
        pid = int(outcome["old"])
        assert shared_server.signal_backend(pid, signal.SIGSTOP)
        stopped.append(pid)
        scenario.go.set()
        worker.join(timeout=HANG_LIMIT)
        hung = worker.is_alive()
    finally:
        for pid in stopped:
            shared_server.signal_backend(pid, signal.SIGCONT)  # also frees a checkout that hung
        scenario.go.set()
        worker.join(timeout=30)
    assert not hung, f"the checkout was still blocked after {HANG_LIMIT}s"
    print(f"{driver}: checkout on a stopped backend took {outcome['elapsed']:.2f}s")
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome["elapsed"] <= PING_TIMEOUT + MARGIN, outcome["elapsed"]
    assert outcome["new"] != outcome["old"], "the stopped backend's connection was reused"
    replaced = [e for e in events if isinstance(e, DeadConnectionReplaced)]
    assert len(replaced) == 1
    # Found by the ping, or (psycopg 3) by reading the reply of the ROLLBACK sent at checkin.
    assert "ping failed" in replaced[0].reason or "ROLLBACK at checkin" in replaced[0].reason
