"""``dropsafe bench``: the side-by-side benchmarks, written as RESULTS.md and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dropsafe._cli._arguments import EXIT_OK, output_folder, require_extra
from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    import argparse

__all__ = ["register", "run"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` command."""
    parser = commands.add_parser(
        "bench",
        help="compare plain pool, pool_pre_ping, psycopg_pool and dropsafe side by side",
        description="Run the benchmarks on throwaway servers and write RESULTS.md and plots.",
    )
    parser.add_argument("--quick", action="store_true", help="about two minutes (for CI)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="where to write the report"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SECTION", help="healthy, recovery, half-open, ledger"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks; print where the report is."""
    require_extra("all,bench", "matplotlib", "psycopg_pool")
    from dropsafe._bench import SECTIONS
    from dropsafe._bench import run as run_benchmarks

    sections = tuple(args.only or SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigurationError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    report = run_benchmarks(output_folder(args.out), quick=args.quick, sections=sections)
    print(f"report written to {report}")
    return EXIT_OK
