"""The decisions of commit resolution, answer by answer (the I/O is tested on real servers)."""

import time

import psycopg2
import pytest

from dropsafe import CommitOutcomeUnknown
from dropsafe._classify import server_refused_commit
from dropsafe._commit_truth.pending_commit import PendingCommit
from dropsafe._commit_truth.resolution import _Resolution, _XidStatus
from dropsafe._commit_truth.server_life import ServerLife
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
    return _XidStatus(status, server_life, in_recovery=False)


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
        (_XidStatus("committed", HISTORY, in_recovery=True), "again"),
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


def test_a_server_that_cannot_be_asked_is_waited_for_past_the_asking_time():
    refused = psycopg2.OperationalError(
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused'
    )
    resolution = _Resolution(
        MARK, (), ERROR, time.monotonic() + 0.5, reach_until=time.monotonic() + 10
    )
    resolution.deadline -= 1  # the asking time has passed (without sleeping)
    assert resolution.next_pause(refused) == 0.02  # the server is still waited for
    resolution.answered()  # the server is back: the asking time starts now
    assert resolution.deadline > time.monotonic() + 0.4
    assert resolution.next_pause() > 0  # "in progress": asked again within the asking time
    resolution.reach_until = resolution.deadline = time.monotonic()
    with pytest.raises(CommitOutcomeUnknown, match="could not be asked in time"):
        resolution.next_pause(refused)


@pytest.mark.parametrize(
    "answer",
    [
        _XidStatus("aborted", AFTER_CRASH, in_recovery=False, server_code_may_notify=True),
        _XidStatus("future", AFTER_CRASH, in_recovery=False, server_code_may_notify=True),
    ],
)
def test_aborted_by_a_crash_where_the_database_s_code_may_notify_is_unknown(answer):
    with pytest.raises(CommitOutcomeUnknown, match="functions or rules that notify"):
        _resolution([]).settle(answer)
    # Without a crash the commit record was never lost: aborted is aborted.
    same = _XidStatus("aborted", HISTORY, in_recovery=False, server_code_may_notify=True)
    assert _resolution([]).settle(same) == "aborted"


def test_only_standbys_answering_is_said_so():
    resolution = _resolution([], budget=0.01)
    assert resolution.settle(_XidStatus(None, HISTORY, in_recovery=True)) == "again"
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


# -- the server's life: a crash moves it, routine commands do not --------------------------------

CHECKPOINTER = ServerLife(
    "7712167652585548053", "2026-11-25 12:00:00+00", "2026-11-25 11:59:59+00", "4711"
)
STATS_RESET = ServerLife(  # pg_stat_reset_shared('bgwriter'): the same checkpointer
    "7712167652585548053", "2026-11-25 12:30:00+00", "2026-11-25 11:59:59+00", "4711"
)
CLEAN_RESTART = ServerLife(  # stats kept, a new postmaster (perhaps the same pids again)
    "7712167652585548053", "2026-11-25 12:00:00+00", "2026-11-25 13:00:00+00", "4711"
)
CRASH_RESTART = ServerLife(  # the same postmaster, new children, stats reset at recovery's end
    "7712167652585548053", "2026-11-25 14:00:00+00", "2026-11-25 11:59:59+00", "4790"
)
PROMOTED_STANDBY = ServerLife(  # its own postmaster and stats; its pids may equal (containers)
    "7712167652585548053", "2026-11-25 12:00:01+00", "2026-11-25 12:00:01+00", "4711"
)


@pytest.mark.parametrize(
    ("later", "same"),
    [
        (STATS_RESET, True),
        (CLEAN_RESTART, True),
        (CRASH_RESTART, False),
        (PROMOTED_STANDBY, False),
        (ServerLife("1111111111111111111", *list(vars(CHECKPOINTER).values())[1:]), False),
        (ServerLife(CHECKPOINTER.system_identifier, None), False),
        (None, False),
    ],
)
def test_same_history(later, same):
    assert CHECKPOINTER.same_history(later) is same
    if later is not None:
        assert later.same_history(CHECKPOINTER) is same


def test_a_life_read_from_the_server_s_two_columns():
    life = ServerLife.read(
        7712167652585548053, "2026-11-25 12:00:00+00|2026-11-25 11:59:59+00|4711"
    )
    assert life == CHECKPOINTER
    hidden = ServerLife.read("7712167652585548053", "|2026-11-25 11:59:59+00|4711")
    assert hidden.stats_reset is None
    assert hidden.provable
    assert not ServerLife.read("7712167652585548053", "||").provable
    assert not ServerLife.read(None, None).provable


def test_a_stats_reset_during_a_slow_commit_is_the_same_history():
    mark = PendingCommit(725, 4242, CHECKPOINTER)
    assert _resolution([], mark).settle(_primary("in progress", STATS_RESET)) == "fence"
    assert _resolution([], mark).settle(_primary("committed", STATS_RESET)) == "committed"


# -- an xid the mark assigned without a flush (the unit wrote nothing) -----------------------

ASYNCHRONOUS = PendingCommit(725, 4242, HISTORY, asynchronous=True)


@pytest.mark.parametrize("status", ["committed", "aborted", "in progress", "future"])
def test_an_asynchronous_xid_after_a_crash_is_unknown(status):
    # Listeners may have heard its NOTIFY before its commit record was flushed: neither
    # "aborted" (run again: heard twice) nor "committed" (perhaps a reuse) is proven.
    events = []
    with pytest.raises(CommitOutcomeUnknown, match="without waiting for its WAL"):
        _resolution(events, ASYNCHRONOUS).settle(_primary(status, AFTER_CRASH))
    assert [event.outcome for event in events] == ["unknown"]


@pytest.mark.parametrize(
    ("status", "decision"), [("committed", "committed"), ("aborted", "aborted")]
)
def test_an_asynchronous_xid_on_its_own_history_is_answered(status, decision):
    assert _resolution([], ASYNCHRONOUS).settle(_primary(status)) == decision


# -- a backend that waits for a synchronous standby ----------------------------------------------


def _waiting(status, server_life=HISTORY):
    return _XidStatus(status, server_life, in_recovery=False, sync_waiting=True)


@pytest.mark.parametrize("status", ["committed", "in progress"])
def test_a_commit_still_waiting_for_its_synchronous_standby_is_not_known_yet(status):
    # pg_xact_status says "committed" once the commit record is flushed locally, before the
    # standby confirms; and such a backend is never fenced.
    events = []
    resolution = _resolution(events)
    assert resolution.settle(_waiting(status)) == "again"
    assert events == []
    resolution.deadline = time.monotonic()  # the time is up
    with pytest.raises(CommitOutcomeUnknown, match="synchronous standby"):
        resolution.next_pause()
    assert [event.outcome for event in events] == ["unknown"]


def test_a_commit_confirmed_by_its_synchronous_standby_is_committed():
    resolution = _resolution([])
    assert resolution.settle(_waiting("committed")) == "again"
    assert resolution.settle(_primary("committed")) == "committed"


def test_a_transaction_never_fenced_is_unknown_while_in_progress():
    # An earlier transaction the app ended: its backend went on to send the COMMIT after it.
    events = []
    resolution = _Resolution(MARK, (events.append,), ERROR, time.monotonic() + 10, fences=False)
    with pytest.raises(CommitOutcomeUnknown, match="xid 725 is still in progress") as raised:
        resolution.settle(_primary("in progress"))
    assert raised.value.__cause__ is ERROR
    assert [event.outcome for event in events] == ["unknown"]
