"""Explore unit shapes under faults, one flight at a time, and check every history (issue 26).

    python benchmarks/explore.py                      # the whole matrix, into docs/guarantees.md
    python benchmarks/explore.py --sample 200 --seed 7
    python benchmarks/explore.py --shape two_engines --fault fin --driver psycopg2
    python benchmarks/explore.py --replay session_insert:psycopg2:fin:7
    python benchmarks/explore.py --replay session_insert:psycopg2:fin:7:flight
    python benchmarks/explore.py --sample 200 --read-xid-in-flight on

A verified unit's xid is read by the mark (``off``, the default policy) or in its first
write's flight (``on``: ``PoolPolicy(read_xid_in_flight=True)``); ``--read-xid-in-flight``
says which the matrix runs (``both`` unless told), and a ``flight`` history's id ends in
``:flight``.

Every violation is printed with the one command that replays it. The whole matrix (no
``--sample``, no filter) rewrites the table in docs/guarantees.md and
benchmarks/results/explore.json; ``--json PATH`` writes any run's every history (a part, which
``--merge`` reads back).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from dropsafe._bench._explore import FAULTS, READS, Explorer, Record, parse_history
from dropsafe._bench._explore_report import (
    matrix_lines,
    read_json,
    replay_command,
    write_docs,
    write_json,
)
from dropsafe._bench._shapes import CATALOG, DRIVERS

ROOT = Path(__file__).resolve().parent.parent


def _names(text: str | None, known: dict[str, object], what: str) -> list[str] | None:
    if not text:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


_READ_CHOICES = {"off": ("mark",), "on": ("flight",), "both": READS}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=None, help="seed of --sample")
    parser.add_argument("--sample", type=int, default=None, help="run N random histories")
    parser.add_argument("--shape", help="comma-separated shapes")
    parser.add_argument("--fault", help="comma-separated faults")
    parser.add_argument("--driver", help="comma-separated drivers")
    parser.add_argument(
        "--replay", help="run one history by its id (shape:driver:fault:step[:flight])"
    )
    parser.add_argument(
        "--read-xid-in-flight",
        choices=sorted(_READ_CHOICES),
        default="both",
        help="a verified unit's xid read by the mark (off), in its first write's flight (on), "
        "or both: the policy axis of the matrix (zero-code shapes run off only)",
    )
    parser.add_argument(
        "--skip-expected",
        action="store_true",
        help="leave out shapes marked expected_violation (known, not yet fixed)",
    )
    parser.add_argument(
        "--at-commit",
        action="store_true",
        help="only the steps whose flight carries a COMMIT (a targeted run)",
    )
    parser.add_argument("--budget", type=float, default=None, help="stop after this many s")
    parser.add_argument("--no-docs", action="store_true", help="never rewrite the docs table")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="write the docs table from JSONs of parts run in parallel (e.g. one per --fault)",
    )
    parser.add_argument("--list", action="store_true", help="list shapes, faults and drivers")
    return parser


def _list() -> int:
    """Print the catalog, the faults and the drivers."""
    for shape in CATALOG.values():
        note = f"  [expected violation: {shape.expected_violation}]"
        print(f"shape  {shape.name}: {shape.what}{note if shape.expected_violation else ''}")
    for fault in FAULTS.values():
        note = f"  [expected violation: {fault.expected_violation}]"
        print(f"fault  {fault.name}: {fault.what}{note if fault.expected_violation else ''}")
    print(f"driver {', '.join(DRIVERS)}")
    print(f"read   {', '.join(READS)} (--read-xid-in-flight off, on, both; ':flight' ends an id)")
    return 0


def _merge(paths: list[Path]) -> int:
    """Write the docs table from parts run in parallel; their longest run is the wall time."""
    # A history run again in a later part replaces the earlier run of the same id.
    latest = {record.history.id: record for path in paths for record in read_json(path)}
    merged = list(latest.values())
    wall = max(json.loads(path.read_text()).get("seconds", 0.0) for path in paths)
    # Name each part's JSON by its file name only: where a machine kept it is no one's business.
    commands = (json.loads(path.read_text())["command"] for path in paths)
    parts = " + ".join(re.sub(r"--json \S*/", "--json ", command) for command in commands)
    write_docs(ROOT / "docs/guarantees.md", matrix_lines(merged, command=parts, seconds=wall))
    target = ROOT / "benchmarks/results/explore.json"
    write_json(target, merged, command=parts, seed=0, seconds=wall, full=False)
    print(f"{len(merged)} histories from {len(paths)} parts written into docs/guarantees.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the explorer; return 1 if any history broke a promise."""
    args = _parser().parse_args(argv)
    if args.list:
        return _list()
    if args.merge:
        return _merge(args.merge)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    command = "python benchmarks/explore.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records: list[Record] = []
    started = time.monotonic()
    with Explorer() as explorer:
        if args.replay:
            histories = iter([parse_history(args.replay)])
        else:
            cells = explorer.cells(
                shapes=_names(args.shape, CATALOG, "shape"),  # type: ignore[arg-type]
                faults=_names(args.fault, FAULTS, "fault"),  # type: ignore[arg-type]
                drivers=_names(args.driver, DRIVERS, "driver"),  # type: ignore[arg-type]
                include_expected=not args.skip_expected,
                reads=_READ_CHOICES[args.read_xid_in_flight],
            )
            print(f"seed {seed}: {len(cells)} cells (shape x driver x fault)", flush=True)
            histories = explorer.histories(
                cells, sample=args.sample, seed=seed, at_commit=args.at_commit
            )
        for history in histories:
            if args.budget is not None and time.monotonic() - started > args.budget:
                print(f"budget of {args.budget:.0f} s spent: stopping", flush=True)
                break
            record = explorer.run(history)
            records.append(record)
            mark = "VIOLATION" if record.violation else ("unknown" if record.unknown else "ok")
            print(
                f"{mark:9} {history.id} {record.outcome.kind} {record.seconds:.2f}s"
                + (f" [{record.expected_violation}]" if record.expected_violation else ""),
                flush=True,
            )
            if record.violation:
                print(f"          {record.violation}\n          {record.outcome.detail}")
                print(f"          replay: {replay_command(history.id)}", flush=True)
    seconds = time.monotonic() - started
    violations = [r for r in records if r.violation]
    print(
        f"\n{len(records)} histories, {len(violations)} violations, "
        f"{sum(r.unknown for r in records)} unknowns, {seconds:.0f} s, seed {seed}"
    )
    for record in violations:
        print(f"  {replay_command(record.history.id)}  # {record.violation}")
    whole = not (args.sample or args.shape or args.fault or args.driver or args.replay)
    whole = whole and args.read_xid_in_flight == "both" and not args.at_commit
    if args.json is not None:  # a part, for --merge: every history
        write_json(args.json, records, command=command, seed=seed, seconds=seconds, full=True)
    if whole and not args.no_docs and args.budget is None:
        target = ROOT / "benchmarks/results/explore.json"
        write_json(target, records, command=command, seed=seed, seconds=seconds, full=False)
        lines = matrix_lines(records, command=command, seconds=seconds)
        write_docs(ROOT / "docs/guarantees.md", lines)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
