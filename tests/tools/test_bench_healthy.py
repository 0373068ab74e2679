"""The quick benchmark's healthy path: every variant's throughput and latency, side by side.

A file of its own: loadfile then spreads the sections over the workers (see bench_sections).
"""

from bench_sections import quick_section_test

SECTION = "healthy"
test_quick_benchmark_writes_its_section = quick_section_test(SECTION)
