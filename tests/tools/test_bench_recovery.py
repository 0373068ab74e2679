"""The quick benchmark's recovery: how long requests fail after a restart and a promotion.

A file of its own: loadfile then spreads the sections over the workers (see bench_sections).
"""

from bench_sections import quick_section_test

SECTION = "recovery"
test_quick_benchmark_writes_its_section = quick_section_test(SECTION)
