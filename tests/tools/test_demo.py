"""`dropsafe demo`, shortened: both blogs, the same faults, and the difference in the report."""

import json

import pytest

from dropsafe._cli import main

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(300)]


def test_demo_shows_errors_on_the_plain_side_only(tmp_path, capsys):
    assert main(["demo", "--duration", "20", "--seed", "3", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]
    assert {fault for _, fault in results["faults"]} >= {
        "cut-fin",
        "cut-rst",
        "terminate",
        "commit-cut",
        "blackhole",
        "restart",
    }
    assert summary["dropsafe"]["requests failed"] == 0
    assert summary["dropsafe"]["posts lost"] == 0
    assert summary["dropsafe"]["posts duplicated"] == 0
    assert summary["plain"]["requests failed"] > 0
    assert summary["dropsafe"]["requests ok"] > 100
    assert (tmp_path / "timeline.png").stat().st_size > 20_000
    out = capsys.readouterr().out
    assert "side by side" in out
    # Not a terminal: one table, the final one, whose totals are the summary's.
    assert out.count("requests ok") == 1, out
    assert "fault: " in out


def test_demo_refuses_a_silly_duration(capsys):
    assert main(["demo", "--duration", "1"]) == 2
    assert "--duration must be within" in capsys.readouterr().err
