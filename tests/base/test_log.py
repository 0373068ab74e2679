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


@pytest.mark.parametrize("exc_info", [True, "error", "tuple"])
def test_a_traceback_is_logged_with_its_passwords_masked(caplog, exc_info):
    # A server's error quotes a dblink connection string in its CONTEXT line; a handler given
    # the raw exc_info would format it whole.
    logger = SafeLogger("dropsafe.test_log")
    caplog.set_level(logging.DEBUG, logger="dropsafe.test_log")
    try:
        raise RuntimeError("CONTEXT: SQL statement dblink_exec('host=db password=Hunter2Secret')")
    except RuntimeError as error:
        given = {True: True, "error": error, "tuple": (type(error), error, None)}[exc_info]
        logger.debug("a 100%% sure %s failed", "replay", exc_info=given)
    assert "Hunter2Secret" not in caplog.text
    assert "a 100% sure replay failed" in caplog.text
    assert "dblink_exec" in caplog.text  # the traceback is there, masked
    assert all(record.exc_info is None for record in caplog.records)


def test_a_traceback_after_a_message_without_arguments_keeps_its_percent_signs(caplog):
    logger = SafeLogger("dropsafe.test_log")
    caplog.set_level(logging.DEBUG, logger="dropsafe.test_log")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.debug("100% of it failed", exc_info=True)
    assert "100% of it failed" in caplog.text
    assert "ValueError: boom" in caplog.text
