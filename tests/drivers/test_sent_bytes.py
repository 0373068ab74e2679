"""`SentBytes`: a connection's TCP_INFO counter, its socket object kept between reads.

The first-statement replay reads a connection's sent bytes twice per request; the counter
keeps one socket object on the driver's fd instead of making one per read (issue 28). What it
must never do: close the driver's fd (when released, when collected, also in a cycle), or read
another fd than the one it is given.
"""

from __future__ import annotations

import gc
import socket

import pytest

from dropsafe._drivers import SentBytes, tcp_bytes_sent


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
