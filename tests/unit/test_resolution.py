"""The decisions of commit resolution, answer by answer (the I/O is tested on real servers)."""

import time

import pytest

from dropsafe import CommitOutcomeUnknown
from dropsafe._classify import server_refused_commit
from dropsafe._recording import PendingCommit
from dropsafe._resolution import _Answer, _Resolution
from dropsafe._server_life import ServerLife
from dropsafe.events import CommitResolved

HISTORY = ServerLife("7712167652585548053", "2026-11-25 12:00:00+00")
AFTER_CRASH = ServerLife("7712167652585548053", "2026-11-25 12:05:00+00")
OTHER_CLUSTER = ServerLife("1111111111111111111", "2026-11-25 12:00:00+00")
UNREADABLE = ServerLife(None, None)
MARK = PendingCommit(xid=725, backend_pid=4242, server_life=HISTORY)
ERROR = ConnectionResetError(104, "reset")


def _resolution(events, mark=MARK, budget=10.0):
    return _Resolution(mark, (events.append,), ERROR, time.monotonic() + budget)


def _primary(status, server_life=HISTORY):
    return _Answer(status, server_life, in_recovery=False)


@pytest.mark.parametrize(
    ("answer", "decision"),
    [
        (_primary("committed"), "committed"),
        (_primary("aborted"), "aborted"),
        # Still held by the old backend: fence it (once), then ask again.
        (_primary("in progress"), "fence"),
        # After a crash or failover an aborted, running or unassigned xid is not ours: a
        # committed xid is never handed out again.
        (_primary("aborted", AFTER_CRASH), "aborted"),
        (_primary("in progress", AFTER_CRASH), "aborted"),
        (_primary("future", AFTER_CRASH), "aborted"),
        # A standby may lag: only a primary can vouch.
        (_Answer("committed", HISTORY, in_recovery=True), "again"),
    ],
)
def test_settled_answers(answer, decision):
    events = []
    assert _resolution(events).settle(answer) == decision
    if decision in ("committed", "aborted"):
        assert events == [CommitResolved(725, decision, events[0].elapsed)]
    else:
        assert events == []


@pytest.mark.parametrize(
    ("mark", "answer", "reason"),
    [
        # Another transaction may have reused the xid after the crash: never a guess.
        (MARK, _primary("committed", AFTER_CRASH), "may be a newer transaction that reused it"),
        (MARK, _primary("committed", OTHER_CLUSTER), "another database cluster"),
        (MARK, _primary(None), "status None"),
        (MARK, _primary("future"), "status 'future'"),
        # Where the history could not be read at connect, 'committed' proves nothing.
        (
            PendingCommit(725, 4242, UNREADABLE),
            _primary("committed"),
            "history could not be read",
        ),
    ],
)
def test_unknowable_answers_raise(mark, answer, reason):
    events = []
    with pytest.raises(CommitOutcomeUnknown, match=reason) as raised:
        _resolution(events, mark).settle(answer)
    assert raised.value.xid == 725
    assert raised.value.__cause__ is ERROR
    assert [event.outcome for event in events] == ["unknown"]


def test_an_unreadable_history_still_fences_a_running_transaction():
    resolution = _resolution([], PendingCommit(725, 4242, UNREADABLE))
    assert resolution.settle(_primary("in progress", HISTORY)) == "fence"


def test_a_committing_backend_is_fenced_only_when_time_runs_short():
    resolution = _resolution([], budget=10.0)
    assert resolution.settle(_primary("in progress")) == "fence"  # idle backends only
    resolution.fenced_idle = True
    assert resolution.settle(_primary("in progress")) == "again"  # a running COMMIT: wait
    resolution.deadline = time.monotonic() + 4  # less than half the time is left
    assert resolution.settle(_primary("in progress")) == "fence"
    resolution.fenced_any = True
    assert resolution.settle(_primary("in progress")) == "again"  # one that did not exit


def test_refused_fencing_means_waiting():
    resolution = _resolution([])
    resolution.fencing_refused = True
    assert resolution.settle(_primary("in progress")) == "again"


def test_a_permanent_failure_to_ask_is_unknown_at_once():
    with pytest.raises(CommitOutcomeUnknown, match="asking the server failed"):
        _resolution([]).next_pause(ValueError("permission denied for function pg_xact_status"))


def test_asking_again_backs_off_then_gives_up():
    resolution = _resolution([], budget=0.1)
    pauses = []
    with pytest.raises(CommitOutcomeUnknown, match="still in progress"):  # noqa: PT012
        for _ in range(100):
            pauses.append(resolution.next_pause())
            resolution.deadline -= pauses[-1]  # time passes without sleeping
    assert pauses == [0.02, 0.04]  # 0.06 s spent; the next 0.08 s would pass the bound


def test_only_standbys_answering_is_said_so():
    resolution = _resolution([], budget=0.01)
    assert resolution.settle(_Answer(None, HISTORY, in_recovery=True)) == "again"
    with pytest.raises(CommitOutcomeUnknown, match="only a standby answered"):
        resolution.next_pause()


class _DriverError(Exception):
    """Shaped like psycopg's errors: a SQLSTATE and diagnostics."""

    def __init__(self, sqlstate, severity):
        super().__init__("error")
        self.sqlstate = sqlstate
        self.diag = type("Diag", (), {"severity_nonlocalized": severity})()


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (_DriverError("23505", "ERROR"), True),  # a deferred unique constraint
        (_DriverError("40001", "ERROR"), True),  # serialization failure at COMMIT
        (_DriverError("08P01", "FATAL"), False),  # a pooler's own error
        (_DriverError("57P01", "FATAL"), False),  # terminated while committing
        (_DriverError("23505", "FATAL"), False),  # not an ERROR: the session ended
        (_DriverError("53100", "ERROR"), False),  # disk full: about the server
        (_DriverError("XX000", "ERROR"), False),
        (_DriverError("23505", None), False),  # severity unknown: not proven
        (ConnectionResetError(104, "reset"), False),
        (Exception({"C": "40001", "V": "ERROR"}), True),  # pg8000's shape
    ],
)
def test_only_postgresql_s_own_error_refuses_a_commit(error, refused):
    assert server_refused_commit(error) is refused
