"""Behind PgBouncer in transaction mode, a transaction is not replayed past its first statement.

A pooler's sessions are its own: the server connection a fresh client connection lands on, and
whether the lost one's server transaction has ended, are not proven. The connection between the
app and PgBouncer is cut by a ChaosProxy between a read and a write: the write must raise the
original error, with nothing written, and the event must say why.
"""

from __future__ import annotations

import shutil

import pytest
import sqlalchemy as sa
from replay_faults import prepared_server

import dropsafe
from dropsafe.events import TransactionReplayed
from dropsafe.testing import ChaosProxy, PgBouncer

pytestmark = [
    pytest.mark.fault,
    pytest.mark.skipif(
        shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") is None,
        reason="PgBouncer is not installed (apt-get install pgbouncer)",
    ),
]


@pytest.fixture(scope="module")
def server():
    with prepared_server("CREATE TABLE pooled_items (n int PRIMARY KEY)") as server:
        yield server


@pytest.fixture(scope="module")
def bouncer_proxy(server):
    with (
        PgBouncer(server, pool_mode="transaction") as bouncer,
        ChaosProxy(bouncer.host, bouncer.port) as proxy,
    ):
        yield bouncer, proxy


def _read_cut_write(engine, proxy):
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT count(*) FROM pooled_items")).all()
        assert proxy.cut("rst") >= 1
        conn.execute(sa.text("INSERT INTO pooled_items VALUES (1)"))


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_behind_a_transaction_pooler_the_replay_is_refused(server, bouncer_proxy, driver):
    bouncer, proxy = bouncer_proxy
    events = []
    engine = dropsafe.create_engine(
        proxy.route(bouncer.url(driver)),
        policy=dropsafe.Policy(
            connection=dropsafe.ConnectionPolicy(pooler="transaction"),
            pool=dropsafe.PoolPolicy(replay_transaction=True),
            hooks=(events.append,),
        ),
        pool_size=1,
        max_overflow=0,
    )
    try:
        with pytest.raises(sa.exc.DBAPIError):
            _read_cut_write(engine, proxy)
    finally:
        engine.dispose()
    assert server.execute("SELECT count(*) FROM pooled_items") == [("0",)]
    (refused,) = [e for e in events if isinstance(e, TransactionReplayed)]
    assert refused.outcome == "refused"
    assert "pooler" in refused.reason
