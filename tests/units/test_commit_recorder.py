"""The decision after a failed COMMIT of a unit over several connections (no I/O).

SQLAlchemy commits a Session's connections one after another; at most one of them wrote (two
writers are refused before any COMMIT). Which report the failed COMMIT makes depends on whether
the writer's COMMIT had been sent, and whether it returned.
"""

from __future__ import annotations

import pytest

from dropsafe._commit_truth.pending_commit import PendingCommit
from dropsafe._commit_truth.server_life import ServerLife
from dropsafe._unit.core import CommitFailed, Committed
from dropsafe._unit.run_common import commit_failed
from dropsafe._unit.tracker import AttemptTracker

WRITER, READER = object(), object()  # stand-ins for two SQLAlchemy connections
PENDING = PendingCommit(xid=1234, backend_pid=42, server_life=ServerLife("7", "2026-01-01"))
LOST = ConnectionError("connection lost during COMMIT")


def _recorder(sent, writer=WRITER):
    recorder = AttemptTracker()
    recorder.marks = {WRITER: PENDING if writer is WRITER else None, READER: None}
    recorder.writer = writer
    recorder.pending = PENDING if writer is not None else None
    recorder.sent = list(sent)
    recorder.commits_sent = len(sent)
    return recorder


def test_a_lost_commit_after_the_writers_returned_is_acknowledged():
    # The reader's COMMIT has no effect; the writer's returned: running again writes twice.
    report = commit_failed("result", LOST, _recorder([WRITER, READER]))
    assert report == Committed("result", PENDING)


def test_a_lost_commit_of_the_writer_is_resolved():
    for sent in ([WRITER], [READER, WRITER]):
        report = commit_failed("result", LOST, _recorder(sent))
        assert report == CommitFailed("result", LOST, PENDING, 1)


def test_a_lost_commit_before_the_writer_s_was_sent_runs_again():
    # Nothing committed: the report says "wrote nothing", which the core runs again.
    report = commit_failed("result", LOST, _recorder([READER]))
    assert report == CommitFailed("result", LOST, None, 1)


def test_a_lost_commit_of_a_unit_that_wrote_nowhere_runs_again():
    report = commit_failed("result", LOST, _recorder([WRITER, READER], writer=None))
    assert report == CommitFailed("result", LOST, None, 1)


def test_an_error_before_any_commit_was_sent_is_raised_as_it_is():
    with pytest.raises(ConnectionError):
        commit_failed("result", LOST, _recorder([]))
