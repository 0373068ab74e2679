"""What the fork tests share: a real forked child bounded in time, a lock another thread holds."""

from __future__ import annotations

import contextlib
import os
import select
import threading

CHILD_BOUND = 10.0


def in_child(action) -> int:
    """Run ``action`` in a forked child; return its exit status (0: it returned true; -1: killed
    at the bound)."""
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


@contextlib.contextmanager
def held_by_another_thread(lock):
    """``lock`` held by another thread for the block: a fork inside it copies a held lock whose
    holder does not exist in the child."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(10)
        yield
    finally:
        release.set()
        holder.join(10)


__all__ = ["CHILD_BOUND", "held_by_another_thread", "in_child"]
