"""`dropsafe bench --quick`, as CI runs it: every section, a report and its plots."""

import pytest

from dropsafe._cli import main

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(400)]


def test_quick_benchmark_writes_every_section(tmp_path, capsys, kernel_blackhole):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "RESULTS.md").read_text()
    for section in ("## Healthy path", "## Recovery", "## Half-open", "## Chaos ledger"):
        assert section in report
    assert "| psycopg | psycopg_pool check |" in report
    assert "> 15 (capped)" in report  # without dropsafe, a half-open request outlasts the cap
    for picture in ("healthy_query.png", "healthy_write.png", "recovery.png", "half_open.png"):
        assert (tmp_path / picture).stat().st_size > 10_000
    assert str(tmp_path / "RESULTS.md") in capsys.readouterr().out


def test_unknown_section_is_refused(capsys):
    assert main(["bench", "--only", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
