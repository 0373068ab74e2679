"""After the whole suite: nothing that dropsafe.testing started is still alive.

Split over xdist workers, each worker checks itself once its session ends instead of running
the ``last`` test (tests/conftest.py; tests/bench/test_leftovers_xdist.py shows both fail).
"""

import pytest

from dropsafe.testing import PostgresServer, leftover_processes
from dropsafe.testing._leftovers import leftover_rules


def test_leftover_check_sees_a_running_server():
    with PostgresServer() as server:
        assert any(str(server.pid) in line for line in leftover_processes())


@pytest.mark.last
def test_no_server_process_or_proxy_thread_outlives_the_suite():
    assert leftover_processes() + leftover_rules() == []
