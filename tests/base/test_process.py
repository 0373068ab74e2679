"""A forked child gets fresh per-process resources, whatever its parent did before the fork.

Each test forks a real child, which reports through its exit status; the parent bounds it.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time

import pytest

from dropsafe._process import renew_lock_in_child, reseed_in_child
from dropsafe._socket_shutdown import shut_down_at

# Python 3.12+ warns that forking a process with threads may deadlock the child: that is what
# these tests fork on purpose, and what dropsafe's renewal is for.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")

CHILD_BOUND = 10.0


def _in_child(action) -> int:
    """Run ``action`` in a forked child; return its exit status (-1: killed at the bound)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        status = 1
        try:
            status = 0 if action() else 2
        finally:
            os._exit(status)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], CHILD_BOUND)  # EOF when the child exits
    os.close(read_end)
    if not ready:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if ready else -1


class _Owner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        renew_lock_in_child(self)


def test_a_lock_another_thread_holds_at_the_fork_is_free_in_the_child():
    owner, taken, release = _Owner(), threading.Event(), threading.Event()

    def hold():
        with owner._lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:
        assert _in_child(lambda: owner._lock.acquire(timeout=2)) == 0
    finally:
        release.set()
        holder.join(10)


def test_children_draw_different_numbers():
    rng = reseed_in_child(random.Random(42))
    read_end, write_end = os.pipe()
    for _ in range(4):
        _in_child(lambda: os.write(write_end, f"{rng.random()!r}\n".encode()) > 0)
    os.close(write_end)
    with os.fdopen(read_end) as drawn:
        numbers = drawn.read().split()
    assert len(numbers) == 4
    assert len(set(numbers)) == 4


def test_the_watchdog_works_in_a_child_forked_after_it_started():
    left, right = socket.socketpair()
    # The parent's thread starts.
    with left, right, shut_down_at(left.fileno(), time.monotonic() + 0.05):
        left.settimeout(5)
        assert left.recv(1) == b""

    def child_wait() -> bool:
        a, b = socket.socketpair()
        with a, b, shut_down_at(a.fileno(), time.monotonic() + 0.2) as bound:
            a.settimeout(CHILD_BOUND * 2)  # the bound kills the child first
            return a.recv(1) == b"" and bound.expired

    assert _in_child(child_wait) == 0


def test_what_an_engine_registers_goes_with_it():
    # Every engine registers its locks and its lifetime generator for renewal after a fork:
    # held weakly, so 1,000 engines made and dropped leave nothing behind.
    import gc  # noqa: PLC0415 - only here

    import dropsafe  # noqa: PLC0415
    from dropsafe import _process  # noqa: PLC0415

    url = "postgresql+psycopg2://app@127.0.0.1:1/app"
    dropsafe.create_engine(url).dispose()  # what the first engine loads, once per process
    gc.collect()
    before = (len(_process._LOCKED), len(_process._GENERATORS))
    for _ in range(1000):
        dropsafe.create_engine(url).dispose()
    gc.collect()
    assert (len(_process._LOCKED), len(_process._GENERATORS)) == before
