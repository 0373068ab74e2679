"""benchmarks/continuity.py reads the replay's events from the ``dropsafe`` logger: the lines
``LoggingHook`` writes must keep parsing, and the ``flag`` variant must have the replay on
from the URL flag alone, ``flag_no_replay`` off (no database: what is parsed and the URL says).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dropsafe._engine.url_plugin import policy_from_query
from dropsafe.events import LoggingHook, TransactionReplayed

pytest.importorskip("fastapi")
pytest.importorskip("flask_sqlalchemy")

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def continuity(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("continuity")


def test_the_replay_log_reads_each_outcome_and_reason_by_request(continuity):
    example_app = importlib.import_module("example_app")
    hook = LoggingHook()  # the default: the ``dropsafe`` logger, which ReplayLog listens to
    events = [
        TransactionReplayed('OperationalError: "closed"', "replayed", 2, 1, 90),
        TransactionReplayed("OperationalError: closed", "refused", 1, 0, 40, reason='a "SET"'),
        TransactionReplayed("Error: x", "failed", 3, 2, 120, reason="the replay failed: y"),
    ]
    level = logging.getLogger("dropsafe").level
    with continuity.ReplayLog() as replays:
        token = example_app._REQUEST.set(7)
        for event in events:
            hook(event)
        example_app._REQUEST.reset(token)
        hook(events[0])  # outside a request: counted, not attributed
    assert replays not in logging.getLogger("dropsafe").handlers
    assert logging.getLogger("dropsafe").level == level
    assert replays.outcomes == {"replayed": 2, "refused": 1, "failed": 1}
    assert replays.by_request == {
        7: ["replayed", 'refused: a \\"SET\\"', "failed: the replay failed: y"]
    }


def test_the_flag_variant_has_the_replay_on_and_the_no_replay_variant_off(continuity):
    url = "postgresql+psycopg2://app:secret@127.0.0.1:5432/notes"
    assert continuity.engine_options("flag") == {}
    flagged = make_url(continuity.variant_url(url, "flag"))
    assert flagged.query == {"plugin": "dropsafe"}  # the flag alone
    assert policy_from_query(flagged.query).pool.replay_transaction is True
    no_replay = make_url(continuity.variant_url(url, "flag_no_replay"))
    assert no_replay.query["plugin"] == "dropsafe"
    assert policy_from_query(no_replay.query).pool.replay_transaction is False


def test_a_failed_request_is_counted_by_place_last_replay_event_and_error(continuity):
    example_app = importlib.import_module("example_app")
    recorder, result = example_app.WhereErrorsHappen(), example_app.RunResult()
    recorder.by_request[1].append(("mid-transaction", "OperationalError: closed"))
    recorder.by_request[2].append(("first statement", "OperationalError: reset"))
    with continuity.ReplayLog() as replays:
        replays.by_request.update({1: ["replayed", "refused: a SET"], 2: ["replayed"]})
        for number, status in ((1, 500), (2, 200)):
            failure = example_app.record_request(recorder, result, number, status, None)
            replays.count(number, failure)
    key = ("mid-transaction", "refused: a SET", "OperationalError: closed")
    assert replays.failed_why == {key: 1}
    assert replays.by_request == {}
    assert (result.requests, result.ok, result.failed) == (2, 1, {"mid-transaction": 1})
    assert result.absorbed == {"first statement": 1}
