"""The quick benchmark's chaos ledger: acknowledged, lost and duplicated writes.

A file of its own, so that pytest-xdist's loadfile spreads the quick benchmark's sections
over the workers (tests/tools/bench_sections.py says why).
"""

from __future__ import annotations

import pytest
from bench_sections import check_quick_section

SECTION = "ledger"


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(400)
def test_quick_benchmark_writes_its_section(tmp_path, capsys) -> None:
    check_quick_section(SECTION, tmp_path, capsys)
