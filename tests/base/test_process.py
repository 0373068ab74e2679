"""A forked child gets fresh per-process resources, whatever its parent did before the fork.

Each test forks a real child, which reports through its exit status; the parent bounds it.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
from forking import CHILD_BOUND, held_by_another_thread, in_child

from dropsafe._process import renew_lock_in_child, reseed_in_child
from dropsafe._socket_shutdown import shut_down_at

# Python 3.12+ warns that forking a process with threads may deadlock the child: that is what
# these tests fork on purpose, and what dropsafe's renewal is for.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")


class _Owner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        renew_lock_in_child(self)


def test_a_lock_another_thread_holds_at_the_fork_is_free_in_the_child():
    owner = _Owner()
    with held_by_another_thread(owner._lock):
        assert in_child(lambda: owner._lock.acquire(timeout=2)) == 0


def test_children_draw_different_numbers():
    rng = reseed_in_child(random.Random(42))
    read_end, write_end = os.pipe()
    for _ in range(4):
        in_child(lambda: os.write(write_end, f"{rng.random()!r}\n".encode()) > 0)
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

    assert in_child(child_wait) == 0


def test_what_an_engine_registers_goes_with_it():
    # Every engine registers its locks and its lifetime generator for renewal after a fork:
    # held weakly, so 1,000 engines made and dropped leave nothing behind.
    import gc  # only here

    import dropsafe
    from dropsafe import _process

    url = "postgresql+psycopg2://app@127.0.0.1:1/app"
    dropsafe.create_engine(url).dispose()  # what the first engine loads, once per process
    gc.collect()
    before = (len(_process._LOCKED), len(_process._GENERATORS))
    for _ in range(1000):
        dropsafe.create_engine(url).dispose()
    gc.collect()
    assert (len(_process._LOCKED), len(_process._GENERATORS)) == before
