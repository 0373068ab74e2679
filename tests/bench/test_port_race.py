"""Fault: another process or thread binds a bench service's port between its probe and its bind.

A port that is merely free when probed can be bound by anyone before the service binds it
(a parallel run's server, a client's ephemeral port): the service then fails to start, or a
client's URL reaches the other process (PgBouncer's 400-of-400 refusals under a parallel run).
Proved here: every service keeps its port from the moment it has it until it is closed, so a
grab in that window, stopped phases included, is refused and the service starts on its port.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import pytest

from dropsafe.testing import ChaosProxy, PatroniCluster, PgBouncer, PostgresServer
from dropsafe.testing._patroni import patroni_cluster_unavailable
from dropsafe.testing._runtime import closed_port

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

# Binds the port without SO_REUSEADDR, as a plain server would, says whether it got it, and
# keeps it until its stdin closes.
_GRABBER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family)
try:
    sock.bind((sys.argv[1], int(sys.argv[2])))
    sock.listen()
except OSError:
    print("refused", flush=True)
else:
    print("taken", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _grab_in_process(host: str, port: int) -> Iterator[bool]:
    """Have another process bind and listen on ``port``; yield whether it got it."""
    grabber = subprocess.Popen(
        [sys.executable, "-c", _GRABBER, host, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with selectors.DefaultSelector() as selector:
            assert grabber.stdout is not None
            selector.register(grabber.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), "the grabber did not answer within 30 s"
            answer = grabber.stdout.readline().strip()
        assert answer in ("taken", "refused"), answer
        yield answer == "taken"
    finally:
        assert grabber.stdin is not None
        grabber.stdin.close()
        grabber.wait(timeout=30)
        grabber.stdout.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def _grab_in_thread(host: str, port: int) -> Iterator[bool]:
    """Have another thread of this process bind and listen on ``port``; yield whether it did."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    outcome: list[bool] = []

    def grab() -> None:
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            outcome.append(False)
        else:
            outcome.append(True)

    thread = threading.Thread(target=grab)
    thread.start()
    thread.join(timeout=30)
    try:
        yield outcome == [True]
    finally:
        sock.close()


GRABBERS = {"process": _grab_in_process, "thread": _grab_in_thread}


@pytest.mark.parametrize("grabber", sorted(GRABBERS))
def test_postgres_server_keeps_its_port_from_probe_to_start(grabber):
    server = PostgresServer(tls=False)
    try:
        with GRABBERS[grabber](server.host, server.port) as taken:
            server.start()  # failed here: "could not bind ... Address already in use"
            assert not taken
            assert server.execute("SELECT 1") == [("1",)]
    finally:
        server.close()


def test_postgres_server_keeps_its_port_while_stopped():
    # A restart keeps its port (clients hold its URL): the stopped phase must not free it.
    with PostgresServer(tls=False) as server:
        server.stop()
        with _grab_in_process(server.host, server.port) as taken:
            server.start()
            assert not taken
            assert server.execute("SELECT 1") == [("1",)]


def test_pgbouncer_keeps_the_port_its_url_named_before_start(shared_server):
    # A URL taken before start must reach this PgBouncer: the old start traded a taken port
    # for another, and such a URL then reached the grabber.
    bouncer = PgBouncer(shared_server)
    try:
        url = bouncer.url("psycopg2")
        with _grab_in_process(bouncer.host, bouncer.port) as taken:
            bouncer.start()
            assert not taken
            assert bouncer.url("psycopg2") == url
            assert bouncer.console("SHOW VERSION")
    finally:
        bouncer.close()


def test_chaos_proxy_keeps_its_port_while_refusing():
    upstream = socket.create_server(("127.0.0.1", 0))
    try:
        with ChaosProxy("127.0.0.1", upstream.getsockname()[1]) as proxy:
            proxy.refuse()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
            with _grab_in_process(proxy.host, proxy.port) as taken:
                proxy.heal()  # failed here: the grabber listened on the proxy's port
                assert not taken
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    finally:
        upstream.close()


@pytest.mark.skipif(bool(patroni_cluster_unavailable()), reason="needs Patroni, etcd, HAProxy")
def test_patroni_cluster_keeps_every_port_from_construction():
    # Not started (that takes ~20 s, test_patroni.py does it): a grab of any of its ports
    # between construction and start must be refused.
    cluster = PatroniCluster()
    try:
        ports = [cluster.etcd_peer_port, cluster.haproxy_port, cluster.replica_port]
        for node in cluster.nodes:
            ports += [node.pg_port, node.rest_port, node.etcd_port]
        for port in ports:
            with _grab_in_process(cluster.host, port) as taken:
                assert not taken, port
    finally:
        cluster.close()


@pytest.mark.parametrize("grabber", sorted(GRABBERS))
def test_a_closed_port_stays_closed_until_its_block_ends(grabber):
    # A port only probed as closed was listened on by another process meanwhile: a connect
    # meant to be refused reached it (test_chaos_proxy's unreachable upstream then timed out).
    with closed_port("127.0.0.1") as port:
        with GRABBERS[grabber]("127.0.0.1", port) as taken:
            assert not taken
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
