"""gevent in any import order: the watchdog ends a greenlet's wait, the socket look sees a FIN.

In a fresh interpreter each (tests/unit/gevent_order.py). Before the fix, dropsafe imported
before ``monkey.patch_all()`` made the watchdog's Condition with a real lock and one of three
greenlets got ``RuntimeError: cannot release un-acquired lock``; and in every order gevent's
own ``select.poll`` said DATA_WAITING of a connection whose peer had closed (a ping each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gevent")

SCRIPT = Path(__file__).with_name("gevent_order.py")


@pytest.mark.parametrize("order", ["before", "used-before", "after"])
def test_gevent_in_any_import_order(order):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), order],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert all(isinstance(elapsed, float) and elapsed < 5 for elapsed in report["deadline"]), report
    assert report["quiet"] == "QUIET"
    assert report["hangup"] == "CLOSED"
