"""The leftovers check fails a run that leaves a server or proxy alive, split over workers or not.

Under pytest-xdist each worker's servers are its own children, out of the controller's sight:
the suite's conftest (copied into the inner run) has each worker report what it left, and the
controller fails the run. A clean run must pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dropsafe.testing._kernel import kernel_blackhole_unavailable, sweep_blackholes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CONFTEST = (Path(__file__).parents[1] / "conftest.py").read_text()

INI = """
[pytest]
markers =
    last: the leftovers check
    shares_server: unused here
    own_server: unused here
"""

TESTS = """
import pytest
from dropsafe.testing import ChaosProxy, PostgresServer, kernel_blackhole, leftover_processes
from dropsafe.testing._leftovers import leftover_rules

LEAK = {leak!r}
KEPT = []  # a reference, or the garbage collector's finalizer would close what leaks


def test_a():
    pass


def test_b():
    pass


def test_c(postgres_session_server):
    postgres_session_server.execute("SELECT 1")


def test_maybe_leaves_something():
    if LEAK == "server":
        KEPT.append(PostgresServer())
        KEPT[-1].start()  # never closed
    elif LEAK == "proxy":
        KEPT.append(ChaosProxy("127.0.0.1", 9))
        KEPT[-1].start()  # never stopped
    elif LEAK == "rule":
        KEPT.append(kernel_blackhole(9))
        KEPT[-1].__enter__()  # never left


@pytest.mark.last
def test_no_leftovers():
    assert leftover_processes() + leftover_rules() == []
"""


@pytest.mark.parametrize(
    ("leak", "args", "fails"),
    [
        ("server", ["-n", "2"], True),
        ("proxy", ["-n", "2"], True),
        ("rule", ["-n", "2"], True),
        ("nothing", ["-n", "2"], False),
        ("server", ["-p", "no:xdist"], True),
    ],
)
def test_a_run_that_leaves_something_fails(pytester, leak, args, fails):
    if leak == "rule":
        reason = kernel_blackhole_unavailable()
        if reason is not None:
            pytest.skip(reason)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(test_leaky=TESTS.format(leak=leak))
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=150)
    finally:
        sweep_blackholes()  # the rule a dead worker left
    output = result.stdout.str()
    if fails:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, output
        what = {"server": "dropsafe-pg-", "proxy": "thread dropsafe-chaos-proxy"}.get(
            leak, "dropsafe_blackhole_9_"
        )
        assert what in output, output
    else:
        assert result.ret == pytest.ExitCode.OK, output
