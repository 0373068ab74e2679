"""What each section of `dropsafe bench --quick` must write, and the check one section's test runs.

Each section has a test file of its own (tests/tools/test_bench_<section>.py): CI runs pytest
with ``--dist loadfile``, which keeps a file on one worker, so sections in one file ran one
after the other at the suite's tail; in four files the workers share them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from dropsafe._cli import main

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

# Each section's heading, rows that show the fair comparisons, and its pictures.
SECTIONS = {
    "healthy": (
        "## Healthy path",
        ("| psycopg | psycopg_pool check |",),
        ("healthy_query.png", "healthy_write.png"),
    ),
    "recovery": ("## Recovery", (), ("recovery.png",)),
    "half-open": (
        "## Half-open",
        # With libpq's defaults, a half-open request outlasts the cap.
        ("| psycopg2 | pre_ping + TCP settings |", "> 15 (capped)"),
        ("half_open.png",),
    ),
    "ledger": ("## Chaos ledger", (), ()),
}


def file_running(section: str) -> str:
    """Return the name of the test file that runs ``section``."""
    return f"test_bench_{section.replace('-', '_')}.py"


def check_quick_section(section: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run one section of the quick benchmark into ``out`` and check what it wrote."""
    heading, rows, pictures = SECTIONS[section]
    assert main(["bench", "--quick", "--only", section, "--out", str(out)]) == 0
    report = (out / "RESULTS.md").read_text()
    assert heading in report
    for row in rows:
        assert row in report
    assert report.count("Fairness:") == 1  # one per section
    assert "load average" in report
    for picture in pictures:
        assert (out / picture).stat().st_size > 10_000
    assert str(out / "RESULTS.md") in capsys.readouterr().out


def quick_section_test(section: str) -> Callable[..., None]:
    """Return the test that runs ``section``, for its file to hold as a ``test_`` name."""
    if section == "half-open":

        def test(tmp_path: Path, capsys: pytest.CaptureFixture[str], kernel_blackhole) -> None:
            del kernel_blackhole  # a skip where the packet filter cannot be changed
            check_quick_section(section, tmp_path, capsys)

    else:

        def test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
            check_quick_section(section, tmp_path, capsys)

    return pytest.mark.slow(pytest.mark.fault(pytest.mark.timeout(400)(test)))
