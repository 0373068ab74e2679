"""benchmarks/unit_throughput.py runs: a short run prints its table for every variant asked.

The script times one-INSERT units side by side (issue 28's throughput table); a change to
dropsafe's unit path that breaks it (a variant that no longer runs, a unit that fails) shows
here, not weeks later when somebody reruns it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "unit_throughput.py"


def test_a_short_run_times_every_variant_it_is_asked_for():
    run = subprocess.run(
        [
            sys.executable,
            str(_SCRIPT),
            "--rtt-ms",
            "0",
            "--drivers",
            "psycopg2,asyncpg",
            "--variants",
            "plain,unverified,verified",
            "--clients",
            "1",
            "--rounds",
            "1",
            "--seconds",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [
        line for line in run.stdout.splitlines() if line.startswith(("| psycopg2", "| asyncpg"))
    ]
    assert rows, run.stdout[-3000:]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # driver, clients, then one rate per variant: each a number over plain's
        assert len(cells) == 5, row
        assert all(cell.endswith("x)") for cell in cells[2:]), row
