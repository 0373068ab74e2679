"""_dbapi.ask: a question to a connection that may be lost fails as "unknown", in the log only."""

from __future__ import annotations

import logging

import pytest

from dropsafe._dbapi import ask


class _ClosedHandle:
    """What a driver's connection looks like after its socket is gone: every read fails."""

    @property
    def status(self) -> int:
        raise AttributeError("'NoneType' object has no attribute 'status'")


def test_an_answer_is_returned_as_it_is():
    assert ask(lambda: False, unknown=None, what="a flag") is False


@pytest.mark.parametrize(
    "failure",
    [OSError(9, "Bad file descriptor"), AttributeError("closed"), RuntimeError("driver bug")],
)
def test_any_failure_of_the_question_is_the_unknown_answer(failure, caplog):
    def question() -> bool:
        raise failure

    with caplog.at_level(logging.DEBUG, logger="dropsafe"):
        assert ask(question, unknown=None, what="a connection's status") is None
    (record,) = [r for r in caplog.records if "could not tell" in r.getMessage()]
    assert record.levelno == logging.DEBUG
    assert "a connection's status" in record.getMessage()
    # The traceback is in the line, as text (masked: tests/base/test_log.py), with the failure.
    assert f"{type(failure).__name__}: {failure}" in record.getMessage()


def test_a_closed_handle_is_no_answer():
    handle = _ClosedHandle()
    assert ask(lambda: handle.status == 0, unknown=False, what="an idle transaction") is False


def test_an_interrupt_is_never_taken_for_an_answer():
    def question() -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ask(question, unknown=None, what="anything")
