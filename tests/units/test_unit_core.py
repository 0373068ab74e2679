"""The decisions of a unit of work, driven step by step as the sync and async faces drive them."""

import psycopg2
import pytest

from dropsafe import CommitOutcomeUnknown, UnitPolicy
from dropsafe._commit_truth.pending_commit import PendingCommit
from dropsafe._commit_truth.server_life import ServerLife
from dropsafe._unit.core import CommitFailed, Committed, Failed, Resolve, Run, Sleep, unit_of_work

LOST = psycopg2.OperationalError("server closed the connection unexpectedly")
PENDING = PendingCommit(725, 4242, ServerLife("7712167652585548053", "2026-11-25 12:00:00+00"))
POLICY = UnitPolicy(backoff_initial=0, backoff_max=0)


def _started(policy=POLICY):
    core = unit_of_work(policy, ())
    step = next(core)
    assert isinstance(step, Run)
    assert step.verify_commits is policy.verify_commits
    return core


def _result_of(core, reply):
    with pytest.raises(StopIteration) as done:
        core.send(reply)
    return done.value.value


def test_a_committed_run_is_the_result():
    assert _result_of(_started(), Committed(42)) == 42


def test_an_error_that_is_not_the_databases_is_raised_unchanged_at_once():
    mine = TimeoutError("the payment API timed out")
    with pytest.raises(TimeoutError) as raised:
        _started().send(Failed(mine, reached_server=True))
    assert raised.value is mine


def test_a_disconnect_sleeps_then_runs_again():
    core = _started()
    assert isinstance(core.send(Failed(LOST, reached_server=True)), Sleep)
    assert isinstance(core.send(None), Run)


def test_a_lost_commit_reply_is_resolved_before_anything_else():
    core = _started()
    step = core.send(CommitFailed("id-7", LOST, PENDING, commits_sent=1))
    assert isinstance(step, Resolve)
    assert step.pending == PENDING
    assert step.error is LOST
    assert _result_of(core, "committed") == "id-7"


def test_an_aborted_commit_runs_the_unit_again():
    core = _started()
    core.send(CommitFailed("id-7", LOST, PENDING, commits_sent=1))
    assert isinstance(core.send("aborted"), Sleep)
    assert isinstance(core.send(None), Run)


def test_a_lost_reply_of_a_transaction_that_wrote_nothing_just_runs_again():
    core = _started()
    assert isinstance(core.send(CommitFailed(1, LOST, None, commits_sent=1)), Sleep)


def test_a_lost_commit_after_another_connection_committed_never_runs_again():
    # A unit over several engines: another connection committed first (a NOTIFY it queued was
    # delivered). The writer's xid committed: acknowledged; aborted, or no writer: unknown.
    core = _started()
    core.send(CommitFailed("id-7", LOST, PENDING, commits_sent=1, committed_before=True))
    assert _result_of(core, "committed") == "id-7"
    core = _started()
    core.send(CommitFailed("id-7", LOST, PENDING, commits_sent=1, committed_before=True))
    with pytest.raises(CommitOutcomeUnknown, match="another of them had committed"):
        core.send("aborted")
    core = _started()
    with pytest.raises(CommitOutcomeUnknown, match="another of them had committed"):
        core.send(CommitFailed(1, LOST, None, commits_sent=1, committed_before=True))


def test_a_promotion_makes_a_server_life_new_whatever_its_statistics():
    # A standby copied from a cleanly stopped primary keeps its stats_reset; its timeline moves.
    life = "2026-11-25 12:00:00+00|2026-11-25 11:00:00+00|27|{}"
    old = ServerLife.read("7712167652585548053", life.format(1))
    promoted_copy = ServerLife.read("7712167652585548053", life.format(2))
    assert old.same_history(ServerLife.read("7712167652585548053", life.format(1)))
    assert not old.same_history(promoted_copy)
    assert old.timeline == "1"


def test_an_apps_own_error_from_a_commit_listener_is_raised_not_resolved():
    mine = ValueError("audit row rejected")
    with pytest.raises(ValueError, match="audit row") as raised:
        _started().send(CommitFailed(1, mine, PENDING, commits_sent=1))
    assert raised.value is mine


def test_without_verification_a_lost_commit_reply_is_unknown():
    core = _started(UnitPolicy(verify_commits=False))
    with pytest.raises(CommitOutcomeUnknown, match="verify_commits is off"):
        core.send(CommitFailed(1, LOST, None, commits_sent=1))


def test_a_unit_that_committed_twice_cannot_be_retried_whole():
    with pytest.raises(CommitOutcomeUnknown, match="more than one connection"):
        _started().send(CommitFailed(1, LOST, PENDING, commits_sent=2))


def test_attempts_run_out_with_the_last_error_itself():
    core = _started(UnitPolicy(max_attempts=2, backoff_initial=0, backoff_max=0))
    core.send(Failed(LOST, reached_server=True))
    core.send(None)
    with pytest.raises(psycopg2.OperationalError) as raised:
        core.send(Failed(LOST, reached_server=True))
    assert raised.value is LOST


def test_failed_connects_use_time_not_attempts():
    core = _started(UnitPolicy(max_attempts=1, backoff_initial=0, backoff_max=0, deadline=60))
    for _ in range(50):
        assert isinstance(core.send(Failed(LOST, reached_server=False)), Sleep)
        assert isinstance(core.send(None), Run)
