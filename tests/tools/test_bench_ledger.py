"""The quick benchmark's chaos ledger: acknowledged, lost and duplicated writes.

A file of its own: loadfile then spreads the sections over the workers (see bench_sections).
"""

from bench_sections import quick_section_test

SECTION = "ledger"
test_quick_benchmark_writes_its_section = quick_section_test(SECTION)
