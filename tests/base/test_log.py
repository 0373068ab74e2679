"""dropsafe's logger and hooks: a handler or hook that raises is reported once, never raised."""

from __future__ import annotations

import logging

import pytest

from dropsafe import _log
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger, observer_failures


class _Down(Exception):
    pass


class _Raising(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:  # noqa: ARG002 - fails whatever it gets
        raise _Down("secret text the observer saw")


@pytest.fixture
def raising_handler(monkeypatch):
    monkeypatch.setattr(_log, "_reported", set())
    logger = logging.getLogger("dropsafe.test_log")
    handler = _Raising()
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)


def test_a_raising_handler_is_reported_once_and_swallowed(raising_handler, capsys):
    before = observer_failures()
    logger = SafeLogger("dropsafe.test_log")
    for _ in range(3):
        logger.warning("something happened")
    err = capsys.readouterr().err
    assert err.count("_Down") == 1
    assert "secret text" not in err  # only the type: the text could hold anything
    assert observer_failures() == before + 3


def test_a_raising_hook_does_not_stop_the_others(monkeypatch, capsys):
    monkeypatch.setattr(_log, "_reported", set())
    seen = []

    def broken(event):
        raise _Down(event)

    emit((broken, seen.append), "an event")
    emit((broken, seen.append), "another")
    assert seen == ["an event", "another"]
    assert capsys.readouterr().err.count("_Down") == 1
