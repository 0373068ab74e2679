"""`SentBytes`: a connection's TCP_INFO counter, its socket object kept between reads.

The first-statement replay reads a connection's sent bytes twice per request; the counter
keeps one socket object on the driver's fd instead of making one per read (issue 28). What it
must never do: close the driver's fd (when released, when collected, also in a cycle), or read
another fd than the one it is given.
"""

from __future__ import annotations

import gc
import socket
import struct

import pytest

from dropsafe._drivers import SentBytes, tcp_bytes_sent
from dropsafe._drivers.sockets import TCP_COUNTS_AT, unpack_counts


@pytest.fixture
def pair():
    """A connected TCP pair on loopback: (client, server side)."""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as client,
    ):
        server_side, _ = listener.accept()
        with server_side:
            yield client, server_side


def _still_open(sock: socket.socket, peer: socket.socket) -> bool:
    sock.sendall(b"z")
    return peer.recv(1) == b"z"


def test_it_reads_what_tcp_bytes_sent_reads_and_grows_only_with_what_is_sent(pair):
    client, server_side = pair
    counter = SentBytes()
    fd = client.fileno()
    before = counter(fd)
    assert before is not None
    assert before == tcp_bytes_sent(fd)
    server_side.sendall(b"x" * 50)  # received, not sent: no change
    assert client.recv(50)
    assert counter(fd) == before
    client.sendall(b"y" * 100)
    assert counter(fd) == before + 100 == tcp_bytes_sent(fd)


def test_released_or_collected_it_leaves_the_drivers_fd_open(pair):
    client, server_side = pair
    counter = SentBytes()
    assert counter(client.fileno()) is not None
    counter.release()
    assert _still_open(client, server_side)
    assert counter(client.fileno()) is not None
    del counter  # collected holding its socket object: the finalizer detaches it
    gc.collect()
    assert _still_open(client, server_side)
    cycle: list[object] = [SentBytes()]
    cycle.append(cycle)
    cycle[0](client.fileno())  # type: ignore[operator]
    del cycle
    gc.collect()  # ended by the cycle collector, in any order
    assert _still_open(client, server_side)


def test_another_fd_is_read_as_that_fd(pair):
    client, server_side = pair
    counter = SentBytes()
    assert counter(client.fileno()) == tcp_bytes_sent(client.fileno())
    server_side.sendall(b"w" * 7)
    assert counter(server_side.fileno()) == tcp_bytes_sent(server_side.fileno())
    assert counter(server_side.fileno()) != counter(client.fileno())


def test_a_closed_a_negative_or_a_unix_fd_is_unknown_not_an_error():
    counter = SentBytes()
    with socket.socket() as sock:
        fd = sock.fileno()
    assert counter(fd) is None
    assert counter(-1) is None
    left, right = socket.socketpair()
    with left, right:
        assert counter(left.fileno()) is None


def _inlined_read(counter: SentBytes, fd: int) -> int | None:
    """What the checkout check and the first statement's refusal do, without a call of it."""
    if fd != counter.fd:
        return counter(fd)
    try:
        queued, sent, retransmitted = unpack_counts(counter.tcp_info(), TCP_COUNTS_AT)
    except (OSError, struct.error):
        return None
    return sent - retransmitted + queued


def test_the_inlined_read_reads_what_a_call_reads_and_nothing_once_released(pair):
    client, server_side = pair
    counter = SentBytes()
    fd = client.fileno()
    assert counter.fd == -1
    with pytest.raises(OSError):  # holding no socket: never a number
        counter.tcp_info()
    first = _inlined_read(counter, fd)  # not held yet: the call, which makes the object
    assert first is not None
    assert counter.fd == fd
    client.sendall(b"q" * 300)
    assert _inlined_read(counter, fd) == first + 300 == tcp_bytes_sent(fd) == counter(fd)
    assert server_side.recv(300, socket.MSG_WAITALL) == b"q" * 300
    server_side.sendall(b"r" * 40)  # received, not sent: no change
    assert client.recv(40)
    assert _inlined_read(counter, fd) == first + 300
    counter.release()
    assert counter.fd == -1
    with pytest.raises(OSError):
        counter.tcp_info()
    assert _inlined_read(counter, -1) is None  # asyncpg's closed transport says -1
    assert _still_open(client, server_side)


def test_the_inlined_read_of_a_closed_or_unix_socket_is_unknown():
    counter = SentBytes()
    left, right = socket.socketpair()
    with left, right:
        assert _inlined_read(counter, left.fileno()) is None  # made, then refused: not TCP
        assert counter.fd == left.fileno()
        assert _inlined_read(counter, left.fileno()) is None  # the inlined path refuses too
    with socket.socket() as sock:  # a TCP socket, connected to nothing, then closed
        fd = sock.fileno()
        assert _inlined_read(counter, fd) is not None
    assert _inlined_read(counter, fd) is None  # closed under the held object: EBADF
    counter.release()
