"""``dropsafe demo``: the user's blog, plain and with dropsafe, through the same faults."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropsafe._cli._arguments import EXIT_OK, output_folder, require_extra
from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    import argparse

    from rich.table import Table

    from dropsafe._demo.scenario import Run

__all__ = ["register", "run"]

_ROWS = ("requests ok", "requests failed", "p50 ms", "p99 ms", "posts lost", "posts duplicated")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    parser = commands.add_parser(
        "demo",
        help="run the blog twice (plain and with dropsafe) through the same faults",
        description=(
            "Start a throwaway PostgreSQL, a proxy with about 10 ms RTT, and the blog twice; "
            "drive simulated users while connections are cut, backends terminated, COMMITs "
            "cut, the network blackholed and the server restarted; then compare."
        ),
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="the fault schedule's seed")
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="results folder")
    parser.set_defaults(run=run)


_SHORTEST, _LONGEST = 5, 3600  # seconds a demo may run


def run(args: argparse.Namespace) -> int:
    """Run the demo with live progress; print the side-by-side table."""
    require_extra("demo", "flask", "matplotlib", "rich", "waitress")
    if not _SHORTEST <= args.duration <= _LONGEST:
        raise ConfigurationError(
            f"--duration must be within {_SHORTEST}..{_LONGEST} seconds: {args.duration}"
        )
    output_folder(args.out)
    from rich.console import Console
    from rich.live import Live

    from dropsafe._demo.scenario import run_demo

    console = Console()
    console.print(
        f"[bold]dropsafe demo[/]: the blog twice, {args.duration:g} s of simulated users, "
        "the same faults on both sides"
    )
    if console.is_terminal:
        # Transient: the live counts vanish when the run ends, and only the final table, with
        # every request counted, stays on the screen.
        with Live(console=console, refresh_per_second=4, transient=True) as live:

            def show(state: Run, elapsed: float, status: dict[str, Any]) -> None:
                live.update(_progress(state, elapsed, args.duration, status))

            summary = run_demo(duration=args.duration, seed=args.seed, out=args.out, show=show)
    else:
        # A log or a pipe gets one line per fault, not a table of counts taken mid-run.
        said: list[str] = []

        def say_faults(state: Run, elapsed: float, status: dict[str, Any]) -> None:
            del state
            fault = str(status["last fault"])
            if not said or said[-1] != fault:
                said.append(fault)
                console.print(f"{elapsed:4.0f} s  fault: {fault}")

        summary = run_demo(duration=args.duration, seed=args.seed, out=args.out, show=say_faults)
    console.print()
    console.print(_final_table(summary))
    console.print(
        f"timeline: {args.out / 'timeline.png'}   raw results: {args.out / 'results.json'}"
    )
    return EXIT_OK


def _progress(state: Run, elapsed: float, duration: float, status: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title=f"{elapsed:4.0f}/{duration:g} s   last fault: {status['last fault']}")
    table.add_column("")
    table.add_column("plain (pool_pre_ping)", justify="right")
    table.add_column("dropsafe", justify="right")
    with state.lock:
        outcomes = list(state.outcomes)
    for label, ok in (("requests ok", True), ("requests failed", False)):
        counts = [
            sum(1 for o in outcomes if o.side == side and o.ok is ok)
            for side in ("plain", "dropsafe")
        ]
        style = "red" if not ok else ""
        table.add_row(label, *(f"[{style}]{c}[/]" if style and c else str(c) for c in counts))
    return table


def _final_table(summary: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title="side by side")
    table.add_column("")
    table.add_column("plain (pool_pre_ping)", justify="right")
    table.add_column("dropsafe", justify="right")
    for row in _ROWS:
        table.add_row(row, str(summary["plain"][row]), str(summary["dropsafe"][row]))
    return table
