"""HostOrder: where multi-host connects start (pure logic; the real thing: test_host_order.py)."""

import threading
from types import SimpleNamespace

import sqlalchemy as sa

from dropsafe._drivers import driver_for
from dropsafe._engine.hosts import HostOrder


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
