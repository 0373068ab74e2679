"""The failover audit's decisions and its ring (pure logic; the real failover is in
tests/units/test_lost_acknowledged_commits.py)."""

from __future__ import annotations

import pytest

from dropsafe._commit_truth.pending_commit import PendingCommit, lsn_number
from dropsafe._commit_truth.server_life import ServerLife
from dropsafe._unit.failover_audit import AcknowledgedCommits, SuccessorState, _Commit, judge

OLD = ServerLife("7712167652585548053", "2026-11-25 12:00:00+00")
NEW = ServerLife("7712167652585548053", "2026-11-25 12:05:00+00")  # the promoted standby
OTHER_CLUSTER = ServerLife("1111111111111111111", "2026-11-25 12:05:00+00")
FORK = lsn_number("0/3001218")


def commit(xid, lsn="0/3001000", life=OLD):
    return _Commit(life, xid, lsn_number(lsn), "app.place_order", 1_795_000_000.0)


def answer(*statuses, life=NEW, fork=FORK, in_recovery=False):
    return SuccessorState(life, in_recovery, fork, list(statuses))


def test_lsn_numbers_order_as_postgresql_orders_them():
    assert lsn_number("0/3001218") == 0x3001218
    assert lsn_number("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn_number("1/0") > lsn_number("0/FFFFFFFF")
    assert lsn_number(None) == 0


def test_a_commit_replayed_before_the_fork_and_committed_is_not_reported():
    assert judge([commit(726, "0/3001120")], answer("committed")) == [None]


def test_a_commit_past_the_fork_is_lost_even_when_its_xid_reads_committed():
    # The new timeline hands the lost xid out again: "committed" is a newer transaction's.
    verdicts = judge([commit(729, "0/3001258")], answer("committed"))
    assert verdicts is not None
    outcome, reason = verdicts[0]
    assert outcome == "lost"
    assert "0/3001258" in reason
    assert "0/3001218" in reason


def test_a_commit_at_the_fork_point_is_lost():
    verdicts = judge([commit(729, "0/3001218")], answer("committed"))
    assert verdicts is not None
    assert verdicts[0] is not None
    assert verdicts[0][0] == "lost"


@pytest.mark.parametrize("status", ["aborted", "in progress", "future", "too old"])
def test_a_commit_before_the_fork_that_is_not_committed_there_is_lost(status):
    verdicts = judge([commit(727)], answer(status))
    assert verdicts is not None
    assert verdicts[0] is not None
    assert verdicts[0][0] == "lost"
    assert repr(status) in verdicts[0][1]


def test_a_standby_or_the_same_life_answering_judges_nothing_yet():
    assert judge([commit(727)], answer("committed", in_recovery=True)) is None
    assert judge([commit(727)], answer("committed", life=OLD)) is None


@pytest.mark.parametrize(
    ("commits", "reply", "why"),
    [
        ([commit(727)], answer("committed", life=OTHER_CLUSTER), "another database cluster"),
        ([commit(727)], answer("committed", fork=None), "has not recovered"),
        ([commit(727, lsn=None)], answer("committed"), "WAL position"),
    ],
)
def test_what_cannot_be_proven_is_unknown_never_silent(commits, reply, why):
    verdicts = judge(commits, reply)
    assert verdicts is not None
    assert verdicts[0] is not None
    outcome, reason = verdicts[0]
    assert outcome == "unknown"
    assert why in reason


def test_commits_of_a_life_before_the_last_one_are_unknown():
    between = ServerLife(OLD.system_identifier, "2026-11-25 12:02:00+00")
    verdicts = judge(
        [commit(700, life=OLD), commit(727, life=between)], answer("committed", "committed")
    )
    assert verdicts is not None
    assert verdicts[0] is not None
    assert verdicts[0][0] == "unknown"
    assert "more than once" in verdicts[0][1]
    assert verdicts[1] is None


def pending(xid, life=OLD):
    return PendingCommit(xid, 4242, life, 0x3001000 + xid)


def test_the_ring_asks_for_a_check_once_when_the_life_changes():
    ring = AcknowledgedCommits(size=8)
    assert not any(ring.add(pending(xid), "unit", 1.0) for xid in range(700, 705))
    assert ring.add(pending(800, NEW), "unit", 2.0)  # the first commit on the new server
    taken, newest = ring.take_older()
    assert newest == NEW
    assert [c.xid for c in taken] == list(range(700, 705))
    assert [c.wal_lsn for c in taken] == [0x3001000 + xid for xid in range(700, 705)]
    assert ring.take_older()[0] == []  # taken once: never reported twice
    assert not ring.add(pending(802, NEW), "unit", 3.0)


def test_the_ring_keeps_the_newest_and_never_grows():
    ring = AcknowledgedCommits(size=4)
    sizes = (len(ring._xids), len(ring._units), len(ring._lives))
    for xid in range(100, 120):
        ring.add(pending(xid), "unit", 1.0)
    assert (len(ring._xids), len(ring._units), len(ring._lives)) == sizes
    ring.add(pending(900, NEW), "unit", 1.0)
    taken, _ = ring.take_older()
    assert [c.xid for c in taken] == [117, 118, 119]  # the 4 newest, less the new life's one


def test_commits_put_back_are_asked_about_again():
    ring = AcknowledgedCommits(size=8)
    ring.add(pending(700), "unit", 1.0)
    assert ring.add(pending(800, NEW), "unit", 1.0)
    taken, _ = ring.take_older()
    assert ring.failed_try() == 1
    ring.put_back(taken)
    assert ring.add(pending(801, NEW), "unit", 1.0)  # due again at the next commit
    again, _ = ring.take_older()
    assert [c.xid for c in again] == [700]
    assert ring.failed_try() == 2


class FakeEngine:
    """Only a key for the per-engine ring: `_ask` is replaced below."""


def test_each_lost_commit_is_reported_once_through_the_hooks(monkeypatch):
    from dropsafe._unit import failover_audit as _failover_audit

    engine, events = FakeEngine(), []
    monkeypatch.setattr(
        _failover_audit, "_ask", lambda _, commits: answer(*["committed"] * len(commits))
    )
    _failover_audit.remember_commit(engine, pending(0x200), "app.replicated")
    _failover_audit.remember_commit(engine, pending(0x300), "app.lost")  # wal_lsn past FORK
    assert _failover_audit.remember_commit(engine, pending(0x400, NEW), "app.after")
    _failover_audit.audit_after_failover(engine, (events.append,))
    _failover_audit.audit_after_failover(engine, (events.append,))  # nothing left to report
    assert [(e.xid, e.unit, e.outcome) for e in events] == [(0x300, "app.lost", "lost")]


def test_a_server_that_cannot_be_asked_makes_the_commits_unknown_after_three_tries(monkeypatch):
    from dropsafe._unit import failover_audit as _failover_audit

    engine, events = FakeEngine(), []

    def refuse(_engine, _commits):
        raise ConnectionError("could not reach postgresql://app:hunter2@db.example/app")

    monkeypatch.setattr(_failover_audit, "_ask", refuse)
    _failover_audit.remember_commit(engine, pending(700), "app.unit")
    due = _failover_audit.remember_commit(engine, pending(800, NEW), "app.unit")
    for xid in range(801, 806):
        if due:
            _failover_audit.audit_after_failover(engine, (events.append,))
        due = _failover_audit.remember_commit(engine, pending(xid, NEW), "app.unit")
    assert [(e.xid, e.outcome) for e in events] == [(700, "unknown")]
    assert "could not be asked" in events[0].reason
    assert "hunter2" not in events[0].reason


def test_the_unit_is_named_by_its_function_never_by_a_repr_that_shows_its_arguments():
    import functools

    from dropsafe._unit.run_common import unit_name

    def place_order(session, card_number):
        del session, card_number

    class Handler:
        def __call__(self, session):
            del session

    assert unit_name(place_order).endswith("place_order")
    assert unit_name(functools.partial(place_order, card_number="4111 1111")).endswith(
        "place_order"
    )
    assert unit_name(Handler()).endswith("<locals>.Handler")


def test_an_audit_cancelled_midway_leaves_its_commits_for_the_next(monkeypatch):
    from dropsafe._unit import failover_audit as _failover_audit

    engine, events = FakeEngine(), []

    def cancelled(_engine, _commits):
        raise KeyboardInterrupt

    monkeypatch.setattr(_failover_audit, "_ask", cancelled)
    _failover_audit.remember_commit(engine, pending(0x300), "app.lost")
    assert _failover_audit.remember_commit(engine, pending(0x400, NEW), "app.after")
    with pytest.raises(KeyboardInterrupt):
        _failover_audit.audit_after_failover(engine, (events.append,))
    monkeypatch.setattr(
        _failover_audit, "_ask", lambda _, commits: answer(*["committed"] * len(commits))
    )
    assert _failover_audit.remember_commit(engine, pending(0x401, NEW), "app.after")
    _failover_audit.audit_after_failover(engine, (events.append,))
    assert [(e.xid, e.outcome) for e in events] == [(0x300, "lost")]
