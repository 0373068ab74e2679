"""Per-driver connect arguments and host ordering (the socket work is tested on real servers)."""

import socket

import pytest

from dropsafe import ConnectionPolicy
from dropsafe._drivers import Driver, bytes_sent, tcp_bytes_sent
from dropsafe._drivers.asyncpg import Asyncpg
from dropsafe._drivers.pg8000 import Pg8000
from dropsafe._drivers.psycopg import Psycopg
from dropsafe._drivers.psycopg2 import Psycopg2
from dropsafe._engine.hosts import rotate

LIBPQ = {"host": "10.0.0.1,10.0.0.2,10.0.0.3", "port": "5432,5433,5434"}


def test_libpq_gets_every_setting_the_user_did_not_give():
    cparams = {"host": "db", "keepalives_idle": "99"}
    added = Psycopg2().connect_defaults(ConnectionPolicy(), [], cparams)
    assert cparams["keepalives_idle"] == "99"
    assert "keepalives_idle" not in added
    assert cparams["tcp_user_timeout"] == 4_000
    assert cparams["connect_timeout"] == 5


def test_libpq_respects_settings_inside_a_dsn():
    cparams = {"dsn": "host=db tcp_user_timeout=1234 connect_timeout=3"}
    Psycopg2().connect_defaults(ConnectionPolicy(), [], cparams)
    assert "tcp_user_timeout" not in cparams
    assert "connect_timeout" not in cparams


@pytest.mark.parametrize(
    ("steps", "hosts", "ports"),
    [
        (1, "10.0.0.2,10.0.0.3,10.0.0.1", "5433,5434,5432"),
        (3, LIBPQ["host"], LIBPQ["port"]),  # a full turn: unchanged
    ],
)
def test_libpq_rotation_keeps_hosts_and_ports_paired(steps, hosts, ports):
    cparams = dict(LIBPQ)
    rotate(Psycopg2(), cparams, steps)
    assert (cparams["host"], cparams["port"]) == (hosts, ports)


def test_libpq_single_port_applies_to_every_host():
    cparams = {"host": "a,b", "port": "5432"}
    rotate(Psycopg2(), cparams, 1)
    assert (cparams["host"], cparams["port"]) == ("b,a", "5432,5432")


def test_asyncpg_rotation_and_per_host_connect_budget():
    cparams = {"host": ["a", "b"], "port": [5432, 5433]}
    driver = Asyncpg()
    driver.connect_defaults(ConnectionPolicy(connect_timeout=4), [], cparams)
    assert cparams["timeout"] == 4
    rotate(driver, cparams, 3)
    assert (cparams["host"], cparams["port"]) == (["b", "a"], [5433, 5432])
    rotate(driver, cparams, 1)
    assert (cparams["host"], cparams["port"]) == (["a", "b"], [5432, 5433])


def test_single_host_is_left_alone():
    cparams = {"host": "db", "port": 5432}
    rotate(Pg8000(), cparams, 1)
    rotate(Psycopg2(), cparams, 1)
    assert cparams == {"host": "db", "port": 5432}


def test_a_transaction_mode_pooler_turns_asyncpg_statement_caches_off_with_unique_names():
    cparams = {"host": "db", "statement_cache_size": 7}
    added = Asyncpg().connect_defaults(ConnectionPolicy(pooler="transaction"), [], cparams)
    assert cparams["statement_cache_size"] == 7  # the user's setting wins
    assert "statement_cache_size" not in added
    assert cparams["prepared_statement_cache_size"] == 0
    name = cparams["prepared_statement_name_func"]
    assert name() != name()
    assert name().startswith("__dropsafe_")


@pytest.mark.parametrize("pooler", [None, "session"])
def test_without_a_transaction_mode_pooler_statements_are_the_drivers_business(pooler):
    policy = ConnectionPolicy(pooler=pooler)
    cparams: dict[str, object] = {"host": "db"}
    Asyncpg().connect_defaults(policy, [], cparams)
    assert set(cparams) == {"host", "timeout"}
    cparams = {"host": "db"}
    Psycopg().connect_defaults(policy, [], cparams)
    assert "prepare_threshold" not in cparams


def test_a_transaction_mode_pooler_stops_psycopg_preparing_but_not_psycopg2():
    policy = ConnectionPolicy(pooler="transaction")
    cparams: dict[str, object] = {"host": "db"}
    Psycopg().connect_defaults(policy, [], cparams)
    assert cparams["prepare_threshold"] is None
    cparams = {"host": "db", "prepare_threshold": 3}
    Psycopg().connect_defaults(policy, [], cparams)
    assert cparams["prepare_threshold"] == 3
    cparams = {"host": "db"}
    Psycopg2().connect_defaults(policy, [], cparams)  # libpq would refuse the key
    assert "prepare_threshold" not in cparams


class _SocketDriver(Driver):
    """A driver whose "connection" is a socket: bytes_sent reads it by its fd."""

    def socket_fd(self, dbapi_connection):
        return dbapi_connection.fileno()


def test_bytes_sent_grows_with_what_is_sent_and_only_with_that():
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as client,
    ):
        server_side, _ = listener.accept()
        with server_side:
            before = bytes_sent(_SocketDriver(), client)
            assert before is not None
            server_side.sendall(b"x" * 50)  # received, not sent: no change
            assert client.recv(50)
            assert bytes_sent(_SocketDriver(), client) == before
            client.sendall(b"y" * 100)  # counted once written, sent or still queued
            assert bytes_sent(_SocketDriver(), client) == before + 100


def test_bytes_sent_is_unknown_without_a_tcp_socket():
    left, right = socket.socketpair()  # a Unix socket: no TCP_INFO
    with left, right:
        assert bytes_sent(_SocketDriver(), left) is None


def test_bytes_sent_of_a_closed_socket_is_unknown_not_an_error():
    # A driver that found its connection lost has closed its fd (or says -1, as asyncpg's
    # closed transport does): the replay's checkout mark must not raise from the pool's
    # checkout event (SQLAlchemy's own RealReconnectTest saw OSError EBADF there).
    with socket.socket() as sock:
        fd = sock.fileno()
    assert tcp_bytes_sent(fd) is None
    assert tcp_bytes_sent(-1) is None
