"""No false alarm on a slow, loaded link (issue 27 item 4): only a dead peer is cut.

The link: a ChaosProxy with 50 ms each way (100 ms round trip) and a 16 Mbit/s limit. The
timeouts shrunk to 1 s (tcp_user_timeout, keepalive idle and interval), so that every
operation below outlasts them: a 3 MB result (server to client) and a 3 MB parameter (client
to server: the client's bytes wait in its socket for 1.5 s, longer than the timeout, behind the
proxy's full receive window), and a 2 s query, through the link and directly (the server
computes; only keepalives cross, answered by the server's kernel). Each must succeed. The
defaults' run (32 MB, 4 s timeout, every driver): benchmarks/detection.py.

What this cannot show: the proxy's kernel acknowledges at once whatever it reads (latency is
added in userspace; tc netem does not work here), so unacknowledged data never ages by the
round trip itself; a slow sender meets a zero window instead, which TCP probes and the
proxy answers.
"""

from __future__ import annotations

import pytest

import dropsafe
from dropsafe._bench._detection import slow_link_run

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(120)]

SHRUNK = dropsafe.Policy(
    connection=dropsafe.ConnectionPolicy(
        tcp_user_timeout=1, keepalive_idle=1, keepalive_interval=1, keepalive_count=1
    )
)
MEGABYTES = 3
KBPS = 16_000  # 2 MB/s: each 3 MB transfer takes about 1.5 s, past the timeout
SLEEP = 2.0


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's server (nothing here breaks it), behind the module's proxy."""
    return shared_server


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg", "asyncpg", "pg8000"])
def test_a_slow_link_and_a_long_query_are_not_taken_for_a_dead_peer(server, proxy, driver):
    proxy.latency(50)
    proxy.bandwidth(KBPS)
    try:
        run = slow_link_run(
            proxy.route(server.url(driver)),
            driver,
            policy=SHRUNK,
            megabytes=MEGABYTES,
            sleep=SLEEP,
            direct_url=server.url(driver),
            connect_args=server.connect_args(driver),
        )
    finally:
        proxy.heal()
    print(driver, {name: round(seconds, 2) for name, seconds in run.seconds.items()})
    assert run.errors == {}
    # Each transfer outlasted the timeout: had it counted the transfer, it would have fired.
    assert run.seconds["large_result"] > 1.2
    assert run.seconds["large_upload"] > 1.2
