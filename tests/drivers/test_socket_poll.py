"""The per-connection look at a socket the checkout check keeps: what it sees, on real sockets.

Its poll object is made once per connection; the descriptor is asked at every look, so a
connection whose descriptor changes, or that lost it, is looked at as it is now.
"""

import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import pytest

from dropsafe._drivers import Health, sockets
from dropsafe._drivers.sockets import SocketPoll, poll, readable


@pytest.fixture(params=["libc", "select"])
def each_poll(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way to look: libc's poll with the GIL held, and the interpreter's (its fallback)."""
    if request.param == "select":
        monkeypatch.setattr(sockets, "_c_poll", None)
    else:
        assert sockets._c_poll is not None, "libc's poll could not be had here"
    return str(request.param)


pytestmark = pytest.mark.usefixtures("each_poll")


class _Source:
    """A connection as the look sees one: ``fileno()`` of whatever socket it holds now."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def fileno(self) -> int:
        if self.sock is None:
            raise OSError("no socket")  # what a driver says of a connection that lost it
        return self.sock.fileno()


def test_quiet_then_data_then_hangup():
    left, right = socket.socketpair()
    with left, right:
        look = SocketPoll(_Source(left))
        assert look() is Health.QUIET
        assert look() is Health.QUIET  # the same poll object, asked again
        right.send(b"E")
        assert look() is Health.DATA_WAITING
        left.recv(1)
        assert look() is Health.QUIET
        right.close()
        assert look() in (Health.CLOSED, Health.DATA_WAITING)  # EOF: readable, or a hangup


def test_a_new_descriptor_is_looked_at_not_the_old_one():
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    with first, first_peer, second, second_peer:
        source = _Source(first)
        look = SocketPoll(source)
        assert look() is Health.QUIET
        first_peer.send(b"x")  # the old socket has data, the new one none
        source.sock = second
        assert look() is Health.QUIET
        second_peer.send(b"y")
        assert look() is Health.DATA_WAITING


def test_a_connection_without_a_socket_is_closed():
    look = SocketPoll(_Source(None))
    assert look() is Health.CLOSED


class _Fd:
    """A source that says a descriptor it was given: -1 (a closed transport), or a closed one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_a_negative_or_closed_descriptor_is_closed():
    # poll(2) skips a negative fd (0 ready: it would read quiet); a closed one is POLLNVAL.
    assert SocketPoll(_Fd(-1))() is Health.CLOSED
    assert poll(_Fd(-1)) is Health.CLOSED
    left, right = socket.socketpair()
    closed = left.detach()
    right.close()
    os.close(closed)
    assert SocketPoll(_Fd(closed))() is Health.CLOSED
    assert poll(_Fd(closed)) is Health.CLOSED


def test_the_one_off_poll_sees_what_the_kept_one_does():
    left, right = socket.socketpair()
    with left, right:
        assert poll(left) is Health.QUIET
        right.send(b"E")
        assert poll(left) is Health.DATA_WAITING
        left.recv(1)
        right.shutdown(socket.SHUT_WR)
        assert poll(left) in (Health.CLOSED, Health.DATA_WAITING)


class _Flagged(_Source):
    """A libpq driver's connection: its ``closed`` and ``broken`` flags beside its socket."""

    closed = 0
    broken = False


def test_a_connection_that_says_it_is_closed_or_broken_is_closed_though_its_socket_is_quiet():
    # The libpq drivers' look (no wrapper since issue 28's cuts): the flags come first.
    left, right = socket.socketpair()
    with left, right:
        source = _Flagged(left)
        look = SocketPoll(source, ("closed", "broken"))
        assert look() is Health.QUIET
        source.broken = True
        assert look() is Health.CLOSED
        source.broken, source.closed = False, 2  # psycopg2's "closed by the driver"
        assert look() is Health.CLOSED
        source.closed = 0
        assert SocketPoll(source, ("closed",))() is Health.QUIET
        source.broken = True  # psycopg2 has no broken flag: not read without "broken"
        assert SocketPoll(source, ("closed",))() is Health.QUIET


def _other_thread_ran_during(look: Callable[[], object], looks: int, *, expected: object) -> int:
    """Return how often a thread waiting for the GIL ran while ``look`` was asked ``looks`` times.

    The other thread gives the GIL back at once each time it runs (``time.sleep(0)``); the
    switch interval is raised so that only a release by this thread lets it run.
    """
    ran = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ran[0] += 1
            time.sleep(0)  # waits for the GIL again right away

    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    spinner = threading.Thread(target=spin, daemon=True)
    try:
        spinner.start()
        deadline = time.monotonic() + 10
        while ran[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ran[0] > 0, "the other thread never ran"
        before = ran[0]
        for _ in range(looks):
            assert look() == expected
        return ran[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        spinner.join(10)


@pytest.mark.parametrize("each_poll", ["libc"], indirect=True)
def test_a_look_keeps_the_gil():
    # A zero-timeout look cannot block, yet select.poll gives the GIL up around it: with other
    # threads waiting for the GIL (a pool's other requests), the checking thread then waits
    # for its turn again at every checkout, about 50-90 us of CPU a request at 4 threads
    # (benchmarks/unit_throughput.py). libc's poll is called with the GIL held instead.
    left, right = socket.socketpair()
    with left, right:
        assert (
            _other_thread_ran_during(SocketPoll(_Source(left)), 20_000, expected=Health.QUIET) == 0
        )


@pytest.mark.parametrize("each_poll", ["libc"], indirect=True)
def test_the_look_at_a_requests_end_keeps_the_gil():
    # psycopg's ROLLBACK not awaited asks first whether the server spoke: select.select gave
    # the GIL up there, at the end of every request that ends in the pool's ROLLBACK.
    left, right = socket.socketpair()
    with left, right:
        fd = left.fileno()
        assert _other_thread_ran_during(lambda: readable(fd), 20_000, expected=False) == 0


def test_readable_answers_as_select_does():
    left, right = socket.socketpair()
    with left, right:
        assert readable(left.fileno()) is False
        right.send(b"N")  # a notice, an error, a goodbye
        assert readable(left.fileno()) is True
        left.recv(1)
        assert readable(left.fileno()) is False
        right.shutdown(socket.SHUT_WR)  # end-of-file
        assert readable(left.fileno()) is True
    assert readable(-1) is True  # its reader finds out why
    left, right = socket.socketpair()
    closed = left.detach()
    right.close()
    os.close(closed)
    assert readable(closed) is True
