"""HostOrder: where multi-host connects start (pure logic; the real thing: test_host_order.py)."""

import threading
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from dropsafe._drivers import driver_for
from dropsafe._engine import hosts
from dropsafe._engine.hosts import SKIP_FOR, HostOrder
from dropsafe.events import HostRetried, HostSkipped, format_event


def _order():
    engine = sa.create_engine(
        "postgresql+psycopg2://", module=SimpleNamespace(paramstyle="pyformat")
    )
    return HostOrder(driver_for(engine.dialect))


def _cparams():
    return {"host": "a,b,c", "port": "5432,5433,5434"}


def _start(order):
    cparams = _cparams()
    order.before_connect(cparams)
    return cparams["host"].split(",")[0]


def _in_thread(fn):
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join(timeout=10)
    return result[0]


class OperationalError(Exception):
    """A driver's error: only its text and cause matter here."""


def _caused_by(error, cause):
    error.__cause__ = cause
    return error


def _reached(host, port):
    return SimpleNamespace(info=SimpleNamespace(host=host, port=port))


def test_connects_in_flight_do_not_move_the_start():
    order = _order()
    starts = [_in_thread(lambda: _start(order)) for _ in range(5)]  # none reports back
    assert starts == ["a"] * 5


def test_a_failed_connect_moves_the_start_past_its_host_once():
    order = _order()
    assert _start(order) == "a"
    # The same thread connects again without its first connect having succeeded: it failed.
    assert _start(order) == "b"
    order.connected(_reached("b", 5433))
    assert _start(order) == "b"


def test_concurrent_failures_from_one_start_move_it_one_host():
    order = _order()
    barrier = threading.Barrier(3, timeout=10)

    def fail_twice():
        first = _start(order)
        barrier.wait()  # all three first connects ran from the same start
        order.connect_failed()
        return first

    threads = [threading.Thread(target=fail_twice) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert _start(order) == "b"


def test_the_host_that_answered_goes_first():
    order = _order()
    _start(order)
    order.connected(_reached("c", 5434))
    assert _start(order) == "c"
    order.connected(_reached("elsewhere", 1))  # not one of ours: changes nothing
    assert _start(order) == "c"


def test_a_host_whose_connection_timed_out_is_skipped_by_the_next_connects():
    order = _order()
    assert _start(order) == "a"
    order.connected(_reached("a", 5432))
    order.timed_out(_reached("a", 5432))  # TCP gave up on an open connection to a
    assert _in_thread(lambda: _start(order)) == "b"
    order.timed_out(_reached("c", 5434))  # not where connects start: nothing moves
    assert _in_thread(lambda: _start(order)) == "b"


# -- hosts left out for a while (issue 27 item 4) ------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _skipping_order(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(hosts, "_now", clock)
    events = []
    engine = sa.create_engine(
        "postgresql+psycopg2://", module=SimpleNamespace(paramstyle="pyformat")
    )
    return HostOrder(driver_for(engine.dialect), (events.append,), "postgresql://db"), clock, events


def _hosts_of_next_connect(order):
    def connect():
        cparams = _cparams()
        order.before_connect(cparams)
        return cparams["host"]

    return _in_thread(connect)


LIBPQ_TIMEOUT = (
    'connection to server at "a", port 5432 failed: timeout expired\n'
    'connection to server at "b", port 5433 failed: server is in recovery'
)


def test_a_host_a_connect_timed_out_at_is_left_out_then_tried_again(monkeypatch):
    order, clock, events = _skipping_order(monkeypatch)
    _start(order)
    order.connect_failed(OperationalError(LIBPQ_TIMEOUT))
    assert _hosts_of_next_connect(order) == "b,c"  # a is left out, not merely moved last
    assert events == [HostSkipped("postgresql://db", "a", 5432, "connect_timed_out", SKIP_FOR)]
    assert format_event(events[0]) == (
        "dropsafe.host_skipped url=postgresql://db host=a port=5432 cause=connect_timed_out "
        "seconds=10"
    )
    clock.now += SKIP_FOR
    assert _hosts_of_next_connect(order) == "b,c,a"  # back, after the host that answers next
    assert events[1] == HostRetried("postgresql://db", "a", 5432, SKIP_FOR)


def test_a_driver_that_names_no_host_had_its_timeout_at_the_first_host(monkeypatch):
    order, _, events = _skipping_order(monkeypatch)
    _start(order)  # a first: asyncpg spends its one timeout there
    order.connect_failed(_caused_by(OperationalError("connect failed"), TimeoutError()))
    assert [event.host for event in events] == ["a"]


def test_a_refused_connect_leaves_no_host_out(monkeypatch):
    order, _, events = _skipping_order(monkeypatch)
    _start(order)
    order.connect_failed(ConnectionRefusedError("connection refused"))
    assert events == []
    assert _hosts_of_next_connect(order) == "b,c,a"  # moved past, as before; none left out


def test_when_every_host_times_out_connects_try_them_all_in_order(monkeypatch):
    order, _, events = _skipping_order(monkeypatch)
    everyone = "\n".join(
        f'connection to server at "{host}", port {port} failed: timeout expired'
        for host, port in (("a", 5432), ("b", 5433), ("c", 5434))
    )
    _start(order)
    order.connect_failed(OperationalError(everyone))  # slow, not gone
    assert events == []
    assert order.skipped() == set()
    assert _hosts_of_next_connect(order).split(",") == ["b", "c", "a"]


def test_hosts_timing_out_one_by_one_never_leave_none(monkeypatch):
    order, _, _ = _skipping_order(monkeypatch)
    order.before_connect(_cparams())
    order.timed_out(_reached("a", 5432))
    order.timed_out(_reached("b", 5433))
    assert order.skipped() == {("a", "5432"), ("b", "5433")}
    order.timed_out(_reached("c", 5434))  # the last one too: all slow, try them in order
    assert order.skipped() == set()
    assert sorted(_hosts_of_next_connect(order).split(",")) == ["a", "b", "c"]


def test_an_open_connection_that_timed_out_leaves_its_host_out(monkeypatch):
    order, _, events = _skipping_order(monkeypatch)
    _start(order)
    order.connected(_reached("a", 5432))
    order.timed_out(_reached("a", 5432))
    assert _hosts_of_next_connect(order) == "b,c"
    assert [(event.host, event.cause) for event in events] == [("a", "connection_timed_out")]


@pytest.mark.parametrize(
    "text",
    [
        # psycopg2 (libpq), as printed for a blackholed 59999 and a closed 59998
        (
            'connection to server at "127.0.0.1", port 59999 failed: timeout expired\n'
            'connection to server at "127.0.0.1", port 59998 failed: Connection refused\n'
        ),
        # psycopg 3.3, which connects to each host itself
        (
            'connection failed: connection to server at "127.0.0.1", port 59998 failed: '
            "Connection refused\nMultiple connection attempts failed. All failures were:\n"
            "- host: '127.0.0.1', port: '59999', hostaddr: '127.0.0.1': connection timeout "
            "expired\n- host: '127.0.0.1', port: '59998', hostaddr: '127.0.0.1': connection "
            "failed: connection to server at"
            ' "127.0.0.1", port 59998 failed: Connection refused'
        ),
    ],
    ids=["psycopg2", "psycopg"],
)
def test_the_drivers_texts_name_the_host_that_timed_out(text):
    assert hosts._hosts_timed_out(OperationalError(text)) == {("127.0.0.1", "59999")}
