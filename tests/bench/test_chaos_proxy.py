"""ChaosProxy against a real TCP echo server: each fault, and the counters."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dropsafe import ConfigurationError
from dropsafe.testing import ChaosProxy
from dropsafe.testing._runtime import closed_port, wait_until

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
    # The reset can arrive before the client's connect() has returned (the proxy accepts in
    # the kernel's backlog, fails upstream and resets at once: a loaded machine may not have
    # run the client in between), or after, at its first read: either way, reset.
    with (
        closed_port("127.0.0.1") as dead_port,
        ChaosProxy("127.0.0.1", dead_port) as proxy,
        pytest.raises(ConnectionResetError),
        _connect(proxy) as sock,
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


class _Sink(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while self.request.recv(1 << 18):
                pass
        except OSError:
            pass


def _rss_bytes():
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def test_blackhole_holds_back_the_sender_not_memory():
    # Fault: a blackholed link while a client keeps pushing. Outcome: the proxy stops reading
    # (backpressure), so the sender blocks and memory stays bounded; healed, every byte arrives.
    sink = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, args=(0.05,), daemon=True).start()
    pushed = 0
    chunk = b"z" * (1 << 20)
    try:
        with (
            ChaosProxy("127.0.0.1", sink.server_address[1]) as proxy,
            _connect(proxy) as sock,
        ):
            sock.sendall(b"x")  # the link is up before the blackhole
            wait_until(
                lambda: proxy.stats.bytes_to_server == 1, timeout=30, what="the first byte crossed"
            )
            proxy.blackhole()
            before = _rss_bytes()
            # A blocked send ends the push: 2 s without progress (200 MiB at most).
            sock.settimeout(2)
            with contextlib.suppress(TimeoutError):
                while pushed < 200 << 20:
                    sock.sendall(chunk)
                    pushed += len(chunk)
            grown = _rss_bytes() - before
            proxy.heal()
            wait_until(
                lambda: proxy.stats.bytes_to_server >= pushed + 1,
                timeout=30,
                what="the held bytes crossed",
            )
    finally:
        sink.shutdown()
        sink.server_close()
    assert pushed < 200 << 20, f"the sender was never held back (grew {grown >> 20} MiB)"
    assert grown < 48 << 20, f"the process grew by {grown >> 20} MiB during the blackhole"


def test_controls_from_many_threads_leave_a_consistent_proxy(proxy):
    # Fault: heal/refuse/blackhole/cut/latency called at once from several threads (any thread
    # may call them). Outcome: no call fails, and the proxy obeys the last call made.
    errors = []
    controls = [
        proxy.heal,
        proxy.refuse,
        proxy.blackhole,
        lambda: proxy.cut("fin"),
        lambda: proxy.latency(1),
        lambda: proxy.bandwidth(100_000),
    ]

    def hammer(seed):
        rng = random.Random(seed)
        try:
            for _ in range(150):
                rng.choice(controls)()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy).close()
    proxy.heal()
    with _connect(proxy) as sock:
        sock.sendall(b"consistent")
        assert _recv_exactly(sock, 10) == b"consistent"
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy).close()


def test_bandwidth_is_near_its_target_one_way():
    # A loose sanity bound only (the rates are measured in benchmarks/proxy_bandwidth.py):
    # 4 MiB at 80 Mbit/s takes 0.42 s; never less, and not many times more.
    sink = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, args=(0.05,), daemon=True).start()
    payload = b"b" * (4 << 20)
    try:
        with ChaosProxy("127.0.0.1", sink.server_address[1]) as proxy:
            proxy.bandwidth(80_000)
            with _connect(proxy) as sock:
                started = time.monotonic()
                sock.sendall(payload)
                wait_until(
                    lambda: proxy.stats.bytes_to_server == len(payload),
                    timeout=30,
                    what="all crossed",
                )
                elapsed = time.monotonic() - started
    finally:
        sink.shutdown()
        sink.server_close()
    assert 0.38 <= elapsed < 4, elapsed
