"""The decisions of commit resolution, status by status (the I/O is tested on real servers)."""

import pytest

from dropsafe import CommitOutcomeUnknown, Policy
from dropsafe.events import CommitResolved
from dropsafe.outcome import TransactionMark, _Resolution

MARK = TransactionMark(xid=725, incarnation="2026-11-25 12:00:00+00")
LATER = "2026-11-25 12:05:00+00"
ERROR = ConnectionResetError(104, "reset")


def _resolution(events):
    return _Resolution(MARK, Policy(hooks=(events.append,)), ERROR)


@pytest.mark.parametrize(
    ("status", "incarnation", "outcome"),
    [
        ("committed", MARK.incarnation, "committed"),
        ("aborted", MARK.incarnation, "aborted"),
        ("in progress", MARK.incarnation, None),  # the old backend is still finishing: ask again
        ("aborted", LATER, "aborted"),
        # After a restart or failover, a running or unassigned xid is not ours.
        ("in progress", LATER, "aborted"),
        ("future", LATER, "aborted"),
    ],
)
def test_settled_outcomes(status, incarnation, outcome):
    events = []
    assert _resolution(events).settle(status, incarnation) == outcome
    if outcome is not None:
        assert events == [CommitResolved(725, outcome, events[0].elapsed)]


@pytest.mark.parametrize(
    ("status", "incarnation", "reason"),
    [
        # Another transaction may have reused the xid after the crash: never a guess.
        ("committed", LATER, "may be a newer transaction that reused it"),
        (None, MARK.incarnation, "status None"),
        ("future", MARK.incarnation, "status 'future'"),
    ],
)
def test_unknowable_outcomes_raise(status, incarnation, reason):
    events = []
    with pytest.raises(CommitOutcomeUnknown, match=reason) as raised:
        _resolution(events).settle(status, incarnation)
    assert raised.value.xid == 725
    assert raised.value.__cause__ is ERROR
    assert [event.outcome for event in events] == ["unknown"]


def test_a_permanent_failure_to_ask_is_unknown_at_once():
    with pytest.raises(CommitOutcomeUnknown, match="asking the server failed"):
        _resolution([]).next_pause(ValueError("permission denied for function pg_xact_status"))


def test_asking_again_backs_off_then_gives_up():
    resolution = _Resolution(MARK, Policy(commit_status_timeout=0.1), ERROR)
    pauses = []
    with pytest.raises(CommitOutcomeUnknown, match="still in progress"):  # noqa: PT012
        for _ in range(100):
            pauses.append(resolution.next_pause())
            resolution.deadline -= pauses[-1]  # time passes without sleeping
    assert pauses == [0.02, 0.04]  # 0.06 s spent; the next 0.08 s would pass the bound
