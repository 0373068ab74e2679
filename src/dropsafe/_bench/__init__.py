"""Side-by-side benchmarks: plain pool, pool_pre_ping, psycopg_pool and dropsafe, in one run.

``dropsafe bench`` (or ``python benchmarks/run.py``) writes RESULTS.md and PNG plots:
the healthy path (throughput, p50/p99, 0 and 10 ms RTT, 1 and 8 clients, reads and writes, the
commit guard on and off), recovery after a restart and a promotion, half-open connections,
and the chaos ledger. Needs ``pip install 'dropsafe[all,bench]'``; the half-open part needs
root and nft or iptables (it says so otherwise).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dropsafe._bench._report import load_average, machine

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["SECTIONS", "run"]

SECTIONS = ("healthy", "recovery", "half-open", "ledger")


def run(
    out: Path,
    *,
    quick: bool = False,
    sections: tuple[str, ...] = SECTIONS,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the chosen sections and write ``out/RESULTS.md``; return its path.

    ``quick`` finishes in about two minutes (one short round, fewer drivers in the ledger,
    half-open capped at 15 s); the full run takes about a quarter of an hour.
    """
    from dropsafe._bench._faults import run_half_open, run_ledger, run_recovery
    from dropsafe._bench._healthy import run_healthy

    out.mkdir(parents=True, exist_ok=True)
    load_at_start = load_average()
    started = time.monotonic()
    body: list[str] = []
    if "healthy" in sections:
        # Many short rounds rather than a few long ones: load from elsewhere drifts, and the
        # median of interleaved rounds follows it less than a long window does.
        body += run_healthy(out, rounds=1 if quick else 5, seconds=0.3 if quick else 1.2, log=log)
    if "recovery" in sections:
        body += ["", *run_recovery(out, log=log)]
    if "half-open" in sections:
        body += ["", *run_half_open(out, cap=15.0 if quick else 60.0, log=log)]
    if "ledger" in sections:
        drivers = ("psycopg2",) if quick else ("psycopg2", "psycopg")
        body += ["", *run_ledger(out, drivers=drivers, seconds=4.0 if quick else 10.0, log=log)]
    mode = "--quick" if quick else "full"
    head = [
        "# dropsafe benchmarks",
        "",
        (
            f"Machine: {machine()}; load average {load_at_start} at the start, "
            f"{load_average()} at the end (a shared machine: absolute numbers move with its "
            "load, so read the ratios, which compare variants measured side by side, "
            f"interleaved, in this one run). Mode: {mode}, {time.monotonic() - started:.0f} s. "
            f"Produced by `dropsafe bench{' --quick' if quick else ''}` "
            "(or `python benchmarks/run.py`). Every number is compared with the plain pool "
            "measured in the same run. Each section says, next to its table, how the "
            "comparison was made fair."
        ),
        "",
    ]
    report = out / "RESULTS.md"
    report.write_text("\n".join(head + body).lstrip() + "\n")
    return report
