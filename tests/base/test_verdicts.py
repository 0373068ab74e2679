"""The bounded cache of verdicts by statement text (`dropsafe._verdicts`), as both its users
keep it: the session-state proof's (tests/engine/test_session_state.py) and the notification
check's, `pending_commit.may_notify`, which had a copy of its own before."""

from __future__ import annotations

from dropsafe._commit_truth import pending_commit
from dropsafe._verdicts import MAX_KEPT_LENGTH, MAX_VERDICTS, kept_by_text


def test_a_judge_runs_once_per_text_and_the_cache_is_bounded() -> None:
    verdicts: dict[str, bool] = {}
    judged: list[str] = []

    @kept_by_text(verdicts)
    def judge(statement: str) -> bool:
        """Says whether the text names x."""
        judged.append(statement)
        return "x" in statement

    assert judge.__doc__ == "Says whether the text names x."
    assert judge("SELECT x") is True
    assert judge("SELECT x") is True
    assert judge("SELECT 1") is False
    assert judged == ["SELECT x", "SELECT 1"]
    for n in range(MAX_VERDICTS + 10):
        judge(f"SELECT {n}")
    assert 0 < len(verdicts) <= MAX_VERDICTS
    long = "SELECT " + "1" * MAX_KEPT_LENGTH
    assert judge(long) is False
    assert long not in verdicts
    assert judge(long) is False
    assert judged.count(long) == 2


def test_may_notify_keeps_its_verdicts_bounded() -> None:
    kept = pending_commit._NOTIFY_VERDICTS
    kept.clear()
    assert pending_commit.may_notify("SELECT pg_notify('c', 'p')") is True
    assert pending_commit.may_notify("NOTIFY c") is True
    assert pending_commit.may_notify("INSERT INTO t VALUES (1)") is False
    assert kept == {
        "SELECT pg_notify('c', 'p')": True,
        "NOTIFY c": True,
        "INSERT INTO t VALUES (1)": False,
    }
    for n in range(MAX_VERDICTS + 10):
        pending_commit.may_notify(f"SELECT {n}")
    assert 0 < len(kept) <= MAX_VERDICTS
    bulk = "INSERT INTO t VALUES " + ", ".join(f"({n})" for n in range(3000))
    assert pending_commit.may_notify(bulk) is False
    assert bulk not in kept
