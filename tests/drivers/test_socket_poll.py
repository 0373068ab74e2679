"""The per-connection look at a socket the checkout check keeps: what it sees, on real sockets.

Its poll object is made once per connection; the descriptor is asked at every look, so a
connection whose descriptor changes, or that lost it, is looked at as it is now.
"""

import socket

from dropsafe._drivers import Health
from dropsafe._drivers.sockets import SocketPoll


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
