"""The explorer's output: the matrix as a Markdown table in docs/guarantees.md, and a JSON."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from dropsafe._bench._explore import FAULTS, Outcome, Record, parse_history
from dropsafe._bench._report import load_average, machine, table
from dropsafe._bench._shapes import CATALOG

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "BEGIN",
    "END",
    "matrix_lines",
    "read_json",
    "replay_command",
    "write_docs",
    "write_json",
]

BEGIN = "<!-- explorer matrix: begin (written by benchmarks/explore.py) -->"
END = "<!-- explorer matrix: end -->"


def replay_command(history_id: str) -> str:
    """Return the one command that runs a history again."""
    return f"python benchmarks/explore.py --replay {history_id}"


def matrix_lines(records: list[Record], *, command: str, seconds: float) -> list[str]:
    """Return the matrix: a row per shape and xid read, a cell per fault.

    Each cell: violations/unknowns/histories.
    """
    cells: dict[tuple[tuple[str, str], str], list[int]] = defaultdict(lambda: [0, 0, 0])
    shape_seconds: dict[tuple[str, str], float] = defaultdict(float)
    drivers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for record in records:
        key = (record.history.shape, record.history.read)
        cell = cells[(key, record.history.fault)]
        cell[0] += record.violation is not None
        cell[1] += record.unknown
        cell[2] += 1
        shape_seconds[key] += record.seconds
        drivers[key].add(record.history.driver)
    faults = [name for name in FAULTS if any(key[1] == name for key in cells)]
    rows = []
    for shape, read in sorted(shape_seconds):
        catalog = CATALOG.get(shape)
        known = None if catalog is None else catalog.expected_violation
        if catalog is not None and read == "mark":
            known = known or catalog.mark_violation
        name = f"{shape} (known: {known.removeprefix('issue ')})" if known else shape
        row: list[object] = [name, read, " ".join(sorted(drivers[(shape, read)]))]
        for fault in faults:
            v, u, n = cells.get(((shape, read), fault), [0, 0, 0])
            row.append(f"{'**' if v else ''}{v}/{u}/{n}{'**' if v else ''}" if n else "")
        row.append(f"{shape_seconds[(shape, read)]:.0f}")
        rows.append(row)
    total = len(records)
    violations = sum(r.violation is not None for r in records)
    unknowns = sum(r.unknown for r in records)
    head = [
        BEGIN,
        "",
        (
            f"{total} histories, {violations} violations, {unknowns} unknowns, "
            f"{seconds:.0f} s ({60 * total / max(seconds, 1e-9):.0f} histories per minute) on "
            f"{machine()}, load {load_average()}. Made by `{command}`. "
            "Each cell: violations / unknowns (`CommitOutcomeUnknown`, or a zero-code request "
            "that raised after its COMMIT was sent) / histories, over every step and driver. "
            "xid read: how a verified unit reads its xid, `mark` (a statement of its own before "
            "COMMIT, the default) or `flight` (`read_xid_in_flight=True`, issue 28; zero-code "
            "shapes run no unit, `mark` only). "
            "Shapes marked known, and the stats_reset fault (issue 26 item 3), break on the "
            "code this ran on; every other cell must read 0 violations."
        ),
        "",
    ]
    header = ["shape", "xid read", "drivers", *faults, "s"]
    return [*head, *table(header, rows, text_columns=3), "", END]


def write_docs(path: Path, lines: list[str]) -> None:
    """Put the matrix between the markers in ``path`` (appended the first time)."""
    text = path.read_text()
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n## The explorer's matrix\n\n" + block + "\n"
    path.write_text(text)


def write_json(
    path: Path,
    records: list[Record],
    *,
    command: str,
    seed: int,
    seconds: float = 0.0,
    full: bool = True,
) -> None:
    """Write the run's results, with the machine and the command that made them.

    ``full`` keeps every history (what ``--merge`` reads back); otherwise the histories that
    broke a promise or ended unknown are kept whole, and the rest is counted per cell.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    cells: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for r in records:
        tail = "" if r.history.read == "mark" else f":{r.history.read}"
        cell = cells[f"{r.history.shape}:{r.history.driver}:{r.history.fault}{tail}"]
        cell[0] += 1
        cell[1] += r.violation is not None
        cell[2] += r.unknown
        cell[3] = round(cell[3] + r.seconds, 2)
    payload = {
        "machine": machine(),
        "load": load_average(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "seed": seed,
        "seconds": round(seconds, 1),
        "histories_total": len(records),
        "violations_total": sum(r.violation is not None for r in records),
        "unknowns_total": sum(r.unknown for r in records),
        "cells [histories, violations, unknowns, seconds]": cells,
        "histories": [
            {
                "id": r.history.id,
                "outcome": r.outcome.kind,
                "detail": r.outcome.detail,
                "violation": r.violation,
                "unknown": r.unknown,
                "seconds": round(r.seconds, 3),
                "fired": r.fired,
                "expected_violation": r.expected_violation,
            }
            for r in records
            if full or r.violation or r.unknown
        ],
    }
    path.write_text(json.dumps(payload, indent=None if not full else 0) + "\n")


def read_json(path: Path) -> list[Record]:
    """Read back the histories of a JSON written by `write_json` (to merge parallel parts)."""
    payload = json.loads(path.read_text())
    return [
        Record(
            parse_history(item["id"]),
            Outcome(item["outcome"], item["detail"]),
            item["violation"],
            item["unknown"],
            item["seconds"],
            fired=item["fired"],
            expected_violation=item["expected_violation"],
        )
        for item in payload["histories"]
    ]
