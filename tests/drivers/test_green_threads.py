"""gevent and eventlet in any import order: the watchdog ends a wait, the socket look sees a FIN.

In a fresh interpreter each (tests/drivers/green_order.py). Before the fix, dropsafe imported
before gevent's ``monkey.patch_all()`` made the watchdog's Condition with a real lock and one of
three greenlets got ``RuntimeError: cannot release un-acquired lock``; in every order gevent's
own ``select.poll`` said DATA_WAITING of a connection whose peer had closed (a ping each); and
under eventlet, which removes ``select.poll``, the socket look raised AttributeError.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from children import json_report

SCRIPT = Path(__file__).with_name("green_order.py")


@pytest.mark.parametrize("order", ["before", "used-before", "after"])
@pytest.mark.parametrize("library", ["gevent", "eventlet"])
def test_green_threads_in_any_import_order(library, order):
    # Never imported here: importing eventlet into the test process changes what it runs on.
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed (pip install -e '.[dev]')")
    report = json_report(sys.executable, str(SCRIPT), library, order, timeout=60)
    assert all(isinstance(elapsed, float) and elapsed < 5 for elapsed in report["deadline"]), report
    assert report["quiet"] == "QUIET"
    assert report["hangup"] == "CLOSED"
