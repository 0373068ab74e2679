"""The quick benchmark's half-open section: how long a request on a blackholed link lasts.

A file of its own: loadfile then spreads the sections over the workers (see bench_sections).
"""

from bench_sections import quick_section_test

SECTION = "half-open"
test_quick_benchmark_writes_its_section = quick_section_test(SECTION)
