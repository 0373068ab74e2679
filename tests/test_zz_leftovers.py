"""After the whole suite: nothing that dropsafe.testing started is still alive."""

import pytest

from dropsafe.testing import leftover_processes


@pytest.mark.last
def test_no_server_process_or_proxy_thread_outlives_the_suite():
    assert leftover_processes() == []
