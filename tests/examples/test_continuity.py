"""benchmarks/continuity.py, short: both apps with unchanged handlers and the URL flag, while
every backend is terminated once a second; no acknowledged write lost, none stored twice.

The benchmark's own code runs (its apps, its fault loop, its counting by place), for a few
seconds instead of its runs of 15: what the must-show table is made of keeps working.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("flask_sqlalchemy")
pytest.importorskip("asyncpg")

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(120)
def test_apps_with_the_flag_lose_and_double_nothing_when_backends_are_killed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    continuity = importlib.import_module("continuity")
    rows, _ = continuity.measure(["flask", "fastapi"], ["kill"], ["flag"], runs=1, seconds=3)
    assert [(app, fault, variant) for app, fault, variant, _ in rows] == [
        ("flask", "kill", "flag"),
        ("fastapi", "kill", "flag"),
    ]
    for app, _, _, (outcome,) in rows:
        assert outcome.result.faults >= 1, app
        assert outcome.acknowledged > 0, (app, outcome.statuses)
        assert outcome.lost == 0, app
        assert outcome.doubled == 0, app
        # Every request is counted once: answered, or failed at one place.
        assert outcome.result.requests == sum(outcome.statuses.values()), app
    assert len(continuity.table(rows)) == 2 + len(rows)
