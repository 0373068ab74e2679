"""The ledger harness for the tests: dropsafe.testing._ledger, plus the audit's assertions."""

from __future__ import annotations

from collections import Counter

from dropsafe.testing._ledger import (
    CHAOS_UNIT,
    INSERT,
    WORKERS,
    failover_faults,
    prepare,
    run_async,
    run_sync,
    server_faults,
)

__all__ = [
    "CHAOS_UNIT",
    "INSERT",
    "WORKERS",
    "assert_safe",
    "failover_faults",
    "prepare",
    "run_async",
    "run_sync",
    "server_faults",
    "summary",
]


def summary(ledger, lost, duplicated):
    return ledger.summary(lost, duplicated)


# Faults after which the server itself cannot tell whether a COMMIT in flight took effect: a
# crash loses WAL and hands its xids out again, a failover moves to another history.
UNKNOWABLE = ("crash", "restart-immediate", "failover")


def assert_safe(ledger, server):
    lost, duplicated = ledger.audit(server)
    print(summary(ledger, lost, duplicated))  # shown with -s, and in the log of a failure
    assert sum(ledger.faults.values()) >= 10, ledger.faults
    assert lost == [], f"acknowledged ops missing: {lost[:10]}"
    assert duplicated == [], f"ops written twice: {duplicated[:10]}"
    # Unknown only where the server truly cannot tell: at most the COMMITs in flight (one per
    # writer) at each fault that loses or moves the WAL history.
    unknowable = sum(ledger.faults[name] for name in UNKNOWABLE)
    assert len(ledger.unknown) <= WORKERS * unknowable, (ledger.unknown, ledger.faults)
    settled = len(ledger.attempted) - len(ledger.unknown)
    assert len(ledger.acknowledged) >= 0.99 * settled, (
        f"{len(ledger.acknowledged)} of {settled} acknowledged; failed: {ledger.failed[:5]}"
    )
    outcomes = Counter(event.outcome for event in ledger.resolved)
    assert outcomes["committed"] > 0, f"no ambiguous COMMIT met and resolved: {outcomes}"
