"""The watchdog that shuts sockets down at their deadline: what it keeps between blocks."""

import socket
import subprocess
import sys
import time

import pytest

from dropsafe._socket_shutdown import _current_watchdog, shut_down_at


def test_released_deadlines_are_not_kept_until_they_pass():
    # Every bounded statement and ping registers a deadline (seconds to minutes ahead) and
    # releases it a fraction of a millisecond later. Kept until it passes, a busy process
    # holds rate x deadline of them: 1,000 units of work a second under a 60 s deadline keep
    # 60,000 entries alive, memory that grows with the load and looks like a leak.
    left, right = socket.socketpair()
    with left, right:
        far = time.monotonic() + 3600
        for _ in range(10_000):
            with shut_down_at(left.fileno(), far) as bound:
                pass
            assert not bound.expired
        kept = len(_current_watchdog()._heap)  # what the watchdog keeps is the point
    assert kept < 1_000, f"{kept} released deadlines still kept"


def test_a_deadline_that_passes_still_shuts_the_socket_down():
    # Compaction must not lose a live deadline among the released ones around it.
    left, right = socket.socketpair()
    with left, right:
        far = time.monotonic() + 3600
        for _ in range(3_000):
            with shut_down_at(left.fileno(), far):
                pass
        with shut_down_at(left.fileno(), time.monotonic() + 0.05) as bound:
            left.settimeout(10)
            assert left.recv(1) == b""  # end-of-file: shut down, not the 10 s timeout
        assert bound.expired


@pytest.mark.parametrize("deadline", [60.0, 0.05, 0.0])
def test_the_interpreter_exits_with_a_deadline_pending(deadline):
    # The watchdog is a bare thread of the interpreter (not threading's): it must never hold
    # up the exit, whether its deadline is far, passing during the exit, or passed.
    code = (
        "import socket, time\n"
        "from dropsafe._socket_shutdown import shut_down_at\n"
        "a, b = socket.socketpair()\n"
        f"shut_down_at(a.fileno(), time.monotonic() + {deadline}).__enter__()\n"
        "time.sleep(0.05)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
