"""The promise under a failover to a standby that shares the old primary's statistics.

A standby made by copying a cleanly stopped primary's data folder (a cold copy, a storage
snapshot of a stopped server, a restored file backup with ``standby.signal``) restores the
primary's statistics file: its ``pg_stat_bgwriter.stats_reset`` is the primary's. Promoted, it
hands out again the xids the old primary gave after the copy. The resolver must not take a
newcomer's commit there for ours: a promotion moves the timeline, which every life compares.
"""

from __future__ import annotations

import contextlib

import psycopg2
import pytest
from commit_faults import (
    SLOW_COMMIT_SCHEMA,
    acknowledged_when_struck_at_commit,
    committing_xid,
    rows,
)

from dropsafe.testing import ChaosProxy, PostgresServer

DRIVERS = ["psycopg2", "psycopg", "asyncpg", "pg8000"]

pytestmark = pytest.mark.fault


class _ColdCopy(PostgresServer):
    """A standby made by copying its primary's data folder while the primary is stopped."""

    def _clone_primary(self, primary: PostgresServer) -> None:
        self._owner.run(
            ["cp", "-a", f"{primary.data_dir}/.", str(self.data_dir)],
            cwd=self.base_dir,
            what="cold copy",
        )
        self._owner.run(
            ["touch", str(self.data_dir / "standby.signal")], cwd=self.base_dir, what="signal"
        )


def _cold_copy_of(primary: PostgresServer) -> PostgresServer:
    primary.stop("fast")  # writes the statistics file the copy takes along
    copy = _ColdCopy(binaries=primary.binaries, name="copy", _primary=primary)
    copy._initialize()  # made now, started at the failover
    primary.start()
    return copy


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_promoted_cold_copy_handing_out_our_xid_again_is_not_believed(driver):
    with (
        PostgresServer() as primary,
        ChaosProxy(primary.host, primary.port) as proxy,
    ):
        primary.execute(SLOW_COMMIT_SCHEMA)
        copy = _cold_copy_of(primary)
        lost = {}

        def fail_over_to_the_copy():
            lost["xid"] = committing_xid(primary)
            proxy.refuse()  # the resolver waits until the copy has handed the xid out again
            primary.stop("immediate")
            copy.start()
            copy.promote()
            # Each statement its own committed transaction, until ours is a newcomer's.
            behind = lost["xid"] - int(copy.execute("SELECT pg_current_xact_id()")[0][0])
            copy.execute("SELECT pg_current_xact_id();\n" * (behind + 2))
            proxy.upstream_port = copy.port
            proxy.heal()

        try:
            acknowledged, outcomes = acknowledged_when_struck_at_commit(
                primary, proxy.route(primary.url(driver)), driver, fail_over_to_the_copy
            )
            written = rows(copy, 1)
            status = copy.execute(f"SELECT pg_xact_status('{lost['xid']}'::xid8)")[0][0]
        finally:
            with contextlib.suppress(psycopg2.Error):
                copy.close()
    # The history really was the dangerous one: ours lost, its xid committed by another.
    assert (written, status) == (0, "committed")
    assert not acknowledged, "an acknowledged write does not exist"
    assert outcomes == ["unknown"]
