"""A process forked after its parent used dropsafe keeps every promise (issue 31).

Fault: a statement that never ends on its own (``pg_sleep(60)``: a hung backend, as the client
sees it) in children forked after the parent ran a unit of work and a checkout ping, as
gunicorn ``--preload``, uWSGI and Celery's prefork pool do. Checked, in real forked processes
(tests/engine/processes/fork_children.py): each child's unit with ``deadline=2`` gives up
within a few seconds (before the fix the watchdog thread existed only in the parent: killed at
15 s), a checkout's ping of a stopped backend gives up at ``ping_timeout=1`` and hands out a
fresh connection, and the children's backoff delays differ (before: one sequence for all).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from children import json_report
from dropsafe._drivers import sync_drivers

pytestmark = pytest.mark.fault

SCRIPT = Path(__file__).parent / "processes" / "fork_children.py"
DRIVERS = sync_drivers()
# The children's deadline is 2 s; a loaded machine (2 cores shared with other runs) adds some.
BOUND = 6.0


@pytest.fixture(scope="module", params=DRIVERS)
def children(request, shared_server):
    driver = request.param
    return json_report(sys.executable, str(SCRIPT), shared_server.url(driver), timeout=90)


def test_a_forked_child_gives_up_at_its_deadline(children):
    for report in children:
        assert report["outcome"] not in ("killed", "crashed", "returned"), children
        assert report["elapsed"] < BOUND, children


def test_a_forked_childs_checkout_ping_gives_up_at_its_timeout(children):
    pings = [report.get("ping") for report in children]
    if all(ping == "not permitted" for ping in pings):
        pytest.skip("stopping the server's backend needs root or the server's user")
    assert all(isinstance(ping, float) and ping < BOUND for ping in pings), children


def test_forked_children_back_off_differently(children):
    sequences = {tuple(report["delays"]) for report in children}
    assert all(len(report["delays"]) == 2 for report in children), children
    assert len(sequences) == len(children), children


def test_a_forked_child_leaves_its_parents_servers_alone():
    # Fault: a child forked while the parent runs a PostgresServer exits normally.
    report = json_report(sys.executable, str(SCRIPT.parent / "fork_and_exit.py"), timeout=120)
    assert report == {"alive": True, "folder_kept": True}


def test_a_child_without_the_after_fork_step_is_no_worse_than_plain(shared_server):
    # Fault: a child uses the connection its parent pooled, then exits (closing it). Plain
    # SQLAlchemy: the child's transaction works, the parent's next query fails on the closed
    # connection. dropsafe must do no worse in either process.
    script = SCRIPT.parent / "fork_without_dispose.py"
    report = json_report(sys.executable, str(script), shared_server.url(), timeout=120)
    plain, guarded = report["plain"], report["dropsafe"]
    for process in ("child", "parent_after"):
        assert guarded[process] == "ok" or guarded[process] == plain[process], report
