"""ChaosProxy against a real TCP echo server: each fault, and the counters."""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time

import pytest
from sqlalchemy.engine import make_url

from dropsafe import ConfigurationError
from dropsafe.testing import ChaosProxy

pytestmark = pytest.mark.fault


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass  # the proxy cut this connection on purpose


@pytest.fixture
def echo_port():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo_port):
    with ChaosProxy("127.0.0.1", echo_port) as proxy:
        yield proxy


def _connect(proxy, timeout=5.0):
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_forwards_both_ways_and_counts(proxy):
    with _connect(proxy) as sock:
        sock.sendall(b"hello")
        assert _recv_exactly(sock, 5) == b"hello"
    stats = proxy.stats
    assert stats.connections_total == 1
    assert stats.bytes_to_server == 5
    assert stats.bytes_to_client == 5


def test_counters_include_every_byte_a_peer_has_received(proxy):
    # The proxy thread may lose the GIL right after forwarding: switch threads very often,
    # so that a counter updated after its bytes are forwarded is caught out.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with _connect(proxy) as sock:
            for sent in range(1, 301):
                sock.sendall(b"x")
                assert _recv_exactly(sock, 1) == b"x"
                stats = proxy.stats
                assert stats.bytes_to_server >= sent
                assert stats.bytes_to_client >= sent
    finally:
        sys.setswitchinterval(previous)


def test_latency_delays_each_direction(proxy):
    proxy.latency(50)
    with _connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
        # 50 ms to the server and 50 ms back.
        assert time.monotonic() - started >= 0.1


def test_bandwidth_limits_throughput(proxy):
    proxy.bandwidth(800)  # 100 kB/s
    payload = b"y" * 20_000
    with _connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
        # 20 kB at 100 kB/s cannot cross in less than 0.2 s (the two ways overlap).
        assert time.monotonic() - started >= 0.18


def test_cut_fin_closes_cleanly(proxy):
    with _connect(proxy) as sock:
        sock.sendall(b"a")
        assert _recv_exactly(sock, 1) == b"a"
        assert proxy.cut("fin") == 1
        assert sock.recv(1) == b""
    assert proxy.stats.connections_open == 0


def test_cut_rst_resets(proxy):
    with _connect(proxy) as sock:
        sock.sendall(b"a")
        assert _recv_exactly(sock, 1) == b"a"
        assert proxy.cut("rst") == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_blackhole_holds_data_until_heal(proxy):
    with _connect(proxy, timeout=0.5) as sock:
        proxy.blackhole()
        sock.sendall(b"lost?")
        with pytest.raises(TimeoutError):
            sock.recv(5)
        assert proxy.stats.connections_open == 1
        proxy.heal()
        sock.settimeout(5)
        assert _recv_exactly(sock, 5) == b"lost?"


def test_refuse_rejects_new_connections_but_keeps_open_ones(proxy):
    with _connect(proxy) as sock:
        sock.sendall(b"up")  # a round trip proves the proxy accepted this connection
        assert _recv_exactly(sock, 2) == b"up"
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
        sock.sendall(b"still")
        assert _recv_exactly(sock, 5) == b"still"
        proxy.heal()
        with _connect(proxy) as again:
            again.sendall(b"ok")
            assert _recv_exactly(again, 2) == b"ok"


def test_die_after_cuts_mid_stream(proxy):
    proxy.die_after(10)
    with _connect(proxy) as sock:
        sock.sendall(b"0123456789abcdef")
        # The first 10 bytes reach the server; its echo of them is cut at once.
        received = b""
        with pytest.raises(ConnectionResetError):  # noqa: PT012 - read until the reset
            while chunk := sock.recv(100):
                received += chunk
        assert len(received) < 16
    assert proxy.stats.bytes_to_server == 10


def test_unreachable_upstream_resets_the_client():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    with (
        ChaosProxy("127.0.0.1", dead_port) as proxy,
        _connect(proxy) as sock,
        pytest.raises(ConnectionResetError),
    ):
        sock.recv(1)


def test_route_keeps_the_form_and_the_password(proxy):
    text = "postgresql+psycopg2://app:s3cret@db.example:5432/app?sslmode=require"
    routed = proxy.route(text)
    assert isinstance(routed, str)
    assert routed == f"postgresql+psycopg2://app:s3cret@127.0.0.1:{proxy.port}/app?sslmode=require"
    url = proxy.route(make_url(text))
    assert (url.host, url.port, url.password) == ("127.0.0.1", proxy.port, "s3cret")


async def test_driven_from_async_code(proxy):
    proxy.latency(1)
    proxy.cut("fin")
    proxy.heal()
    assert proxy.stats.connections_open == 0


def test_bad_arguments_are_refused(echo_port):
    with pytest.raises(ConfigurationError, match="upstream_port"):
        ChaosProxy("127.0.0.1", 0)
    with ChaosProxy("127.0.0.1", echo_port) as proxy:
        with pytest.raises(ConfigurationError, match="cut mode"):
            proxy.cut("boom")
        with pytest.raises(ConfigurationError, match="jitter_ms"):
            proxy.latency(5, jitter_ms=10)
        with pytest.raises(ConfigurationError, match="kbps"):
            proxy.bandwidth(0)


def test_warns_when_not_on_loopback(echo_port):
    with pytest.warns(UserWarning, match="not a loopback address"):
        ChaosProxy("127.0.0.1", echo_port, listen_host="0.0.0.0")  # noqa: S104 - never started


def test_close_leaves_no_thread(echo_port):
    proxy = ChaosProxy("127.0.0.1", echo_port)
    proxy.start()
    name = f"dropsafe-chaos-proxy:{proxy.port}"
    assert any(t.name == name for t in threading.enumerate())
    proxy.close()
    proxy.close()
    assert not any(t.name == name for t in threading.enumerate())
