"""The quick benchmark's half-open section: how long a request on a blackholed link lasts.

A file of its own, so that pytest-xdist's loadfile spreads the quick benchmark's sections
over the workers (tests/tools/bench_sections.py says why).
"""

from __future__ import annotations

import pytest
from bench_sections import check_quick_section

SECTION = "half-open"


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(400)
def test_quick_benchmark_writes_its_section(tmp_path, capsys, kernel_blackhole) -> None:
    del kernel_blackhole  # a skip where the packet filter cannot be changed
    check_quick_section(SECTION, tmp_path, capsys)
