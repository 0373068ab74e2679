"""A real Patroni cluster (etcd, HAProxy, three nodes) failing over under dropsafe's writers.

One cluster for the module, asynchronous replication. The long matrix (every scenario, plain,
pre_ping and dropsafe, HAProxy and multi-host URL, synchronous on and off) is
``python benchmarks/ha.py``; this is the short set CI runs.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import sqlalchemy as sa
from commit_faults import slow_commit_schema

import dropsafe
from dropsafe._bench._ha import run_scenario
from dropsafe.testing import PatroniCluster, ServerError
from dropsafe.testing._patroni import patroni_cluster_unavailable

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_planned_switchover_costs_dropsafe_no_error(patroni_cluster):
    results = run_scenario(
        patroni_cluster,
        "switchover",
        kinds=("plain", "dropsafe"),
        routes=("haproxy", "multi_host"),
        before=1.0,
        after=3.0,
    )
    by_variant = {result.variant: result for result in results}
    for route in ("haproxy", "multi_host"):
        guarded = by_variant[f"dropsafe/{route}"]
        assert (guarded.errors, guarded.unknown, guarded.lost, guarded.duplicated) == (0, 0, 0, 0)
        assert guarded.acknowledged > 20
        assert guarded.first_write_after < 30, guarded
    # What the same switchover does to a plain pool: its pooled connections died with the old
    # leader's sessions (HAProxy shuts them down), and the app sees that.
    assert by_variant["plain/haproxy"].errors >= 1


def test_a_node_crash_writes_nothing_twice(patroni_cluster):
    results = run_scenario(
        patroni_cluster,
        "node_crash",
        kinds=("dropsafe",),
        routes=("haproxy", "multi_host"),
        before=1.0,
        after=3.0,
    )
    for result in results:
        assert result.duplicated == 0, result
        # Writes resumed on the promoted node within a bound (~9 s with ttl=10 on 2 cores).
        assert result.first_write_after < 45, result


def test_a_commit_lost_in_a_failover_resolves_to_unknown_not_committed(
    patroni_cluster, kernel_blackhole
):
    """An ambiguous COMMIT, then a failover that loses it, then its xid reused and committed.

    The COMMIT completes on the leader, its reply is lost (the client is cut off from HAProxy),
    and the leader crashes before it streamed the commit (its WAL senders are stopped:
    asynchronous replication does not wait). The promoted standby hands the same xid to another
    transaction, which commits. Asked then, the new leader says "committed" for that xid: only
    the server's life (system identifier, stats_reset: the standby's own) tells that this
    "committed" is not ours. dropsafe must say unknown.
    """
    cluster = patroni_cluster
    cluster.revive()
    cluster.execute("DROP TABLE IF EXISTS lost_ledger CASCADE")
    cluster.execute(slow_commit_schema("lost_ledger"))
    cluster.wait_healthy()
    _wait_replayed(cluster)
    leader = cluster.wait_for_leader()
    policy = dropsafe.Policy(
        unit=dropsafe.UnitPolicy(deadline=120, commit_status_timeout=100, max_attempts=3)
    )
    engine = dropsafe.create_engine(cluster.url("psycopg2"), policy=policy)
    outcome: list[object] = []
    calls = []

    def unit(conn):
        calls.append(1)
        conn.execute(sa.text("SET LOCAL test.commit_sleep = '3'"))
        conn.execute(sa.text("INSERT INTO lost_ledger VALUES (42)"))

    def client():
        try:
            outcome.append(dropsafe.run_transaction(engine, unit))
        except Exception as exc:  # the test inspects it
            outcome.append(exc)

    # Nothing more reaches the standbys from here on.
    senders = [int(row[0]) for row in cluster.execute("SELECT pid FROM pg_stat_replication")]
    assert senders
    for pid in senders:
        os.kill(pid, signal.SIGSTOP)
    thread = threading.Thread(target=client, daemon=True)
    try:
        thread.start()
        xid = _wait_for_commit_running(cluster, leader)
        with kernel_blackhole(cluster.haproxy_port):
            # The COMMIT completes on the leader; its reply is dropped on the way.
            _wait_status(cluster, leader, xid, "committed")
            cluster.crash_leader_node()
            promoted = cluster.wait_for_leader(90)
            assert promoted != leader
            _reuse_xid(cluster, promoted, xid)
        thread.join(150)
        assert not thread.is_alive(), "the unit of work did not end by its deadline"
    finally:
        engine.dispose()
    assert isinstance(outcome[0], dropsafe.CommitOutcomeUnknown), outcome
    assert "failed over" in str(outcome[0])
    assert calls == [1]  # never run again: it may have committed
    # Lost indeed: the promoted node never got it.
    assert cluster.execute("SELECT count(*) FROM lost_ledger")[0][0] == "0"
    cluster.revive()


def _wait_replayed(cluster, timeout=30):
    deadline = time.monotonic() + timeout
    query = (
        "SELECT count(*) FROM pg_stat_replication "
        "WHERE replay_lsn IS DISTINCT FROM pg_current_wal_lsn()"
    )
    while cluster.execute(query)[0][0] != "0":
        assert time.monotonic() < deadline, "standbys did not replay the schema"
        time.sleep(0.05)


def _wait_for_commit_running(cluster, leader, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.execute(
            "SELECT backend_xid FROM pg_stat_activity "
            "WHERE query ILIKE 'COMMIT%' AND state = 'active' AND backend_xid IS NOT NULL",
            node=leader,
        )
        if rows:
            return int(rows[0][0])
        assert time.monotonic() < deadline, "no COMMIT was seen running"
        time.sleep(0.02)


def _wait_status(cluster, name, xid, status, timeout=30):
    deadline = time.monotonic() + timeout
    while cluster.execute(f"SELECT pg_xact_status('{xid}'::xid8)", node=name)[0][0] != status:
        assert time.monotonic() < deadline, f"xid {xid} never became {status}"
        time.sleep(0.05)


def _reuse_xid(cluster, name, xid):
    """Commit transactions on ``name`` until one of them has ``xid``; check that one did."""
    try:
        cluster.execute(
            "DO $$ DECLARE x bigint; BEGIN FOR i IN 1..100000 LOOP "
            "x := pg_current_xact_id()::text::bigint; COMMIT; "
            f"EXIT WHEN x >= {xid}; END LOOP; END $$",
            node=name,
        )
    except ServerError as exc:  # pragma: no cover - says what went wrong
        pytest.fail(f"could not reuse xid {xid}: {exc}")
    status = cluster.execute(f"SELECT pg_xact_status('{xid}'::xid8)", node=name)[0][0]
    assert status == "committed", f"xid {xid} on the promoted node: {status}"


def test_the_password_shows_in_no_log_and_no_repr(patroni_cluster):
    cluster = patroni_cluster
    assert cluster.password not in repr(cluster)
    logs = sorted(cluster.base_dir.rglob("*.log"))
    assert len(logs) >= 5  # etcd, HAProxy, three Patronis (PostgreSQL writes into them)
    for log in logs:
        assert cluster.password not in log.read_text(errors="replace"), log.name


@pytest.mark.parametrize("command", ["/usr/bin/patroni", [], ["/usr/bin/patroni", ""]])
def test_a_patroni_command_that_is_no_list_of_strings_is_refused(command):
    if (reason := patroni_cluster_unavailable()) is not None:
        if os.environ.get("DROPSAFE_REQUIRE_KERNEL_FAULTS") == "1":
            pytest.fail(f"DROPSAFE_REQUIRE_KERNEL_FAULTS=1 but {reason}")
        pytest.skip(reason)
    with pytest.raises(dropsafe.ConfigurationError, match="patroni_command"):
        PatroniCluster(patroni_command=command)
