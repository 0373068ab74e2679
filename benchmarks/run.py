"""The benchmarks in one command: ``python benchmarks/run.py [--quick]`` (= ``dropsafe bench``).

Writes benchmarks/results/RESULTS.md and its PNG plots. The full run takes about a quarter of
an hour on 2 cores; ``--quick`` about two minutes.
"""

import sys

from dropsafe._cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
