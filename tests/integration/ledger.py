"""The ledger harness for the tests: dropsafe.testing._ledger, plus the audit's assertions."""

from __future__ import annotations

from collections import Counter

from dropsafe.testing._ledger import (
    CHAOS_POLICY,
    INSERT,
    WORKERS,
    prepare,
    run_async,
    run_sync,
    server_faults,
)

__all__ = [
    "CHAOS_POLICY",
    "INSERT",
    "WORKERS",
    "assert_safe",
    "prepare",
    "run_async",
    "run_sync",
    "server_faults",
    "summary",
]


def summary(ledger, lost, duplicated):
    return ledger.summary(lost, duplicated)


def assert_safe(ledger, server):
    lost, duplicated = ledger.audit(server)
    print(summary(ledger, lost, duplicated))  # shown with -s, and in the log of a failure
    assert sum(ledger.faults.values()) >= 10, ledger.faults
    assert lost == [], f"acknowledged ops missing: {lost[:10]}"
    assert duplicated == [], f"ops written twice: {duplicated[:10]}"
    assert len(ledger.acknowledged) >= 0.99 * len(ledger.attempted), (
        f"{len(ledger.acknowledged)} of {len(ledger.attempted)} acknowledged; "
        f"failed: {ledger.failed[:5]}"
    )
    outcomes = Counter(event.outcome for event in ledger.resolved)
    assert outcomes["committed"] > 0, f"no ambiguous COMMIT met and resolved: {outcomes}"
