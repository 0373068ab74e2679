"""docs/architecture.md's "where to make a change" table names files that exist.

The table is how a newcomer finds the file to change; a row naming a file that a refactor moved
or removed sends them nowhere, and nothing else would notice. Every path in it is written from
the repository's root (``src/dropsafe/_unit/core.py``, ``tests/...``); a ``*`` in a path is a
glob that must match at least one file. The picture above it names every module of the base and
of the two wings, so that a module a split adds is drawn where it stands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
HEADING = "## Where to make a change"
PICTURE = "## The picture"
# The folders whose every module the picture names: the base and where the wings meet, the wings.
DRAWN = ("src/dropsafe", "src/dropsafe/_engine", "src/dropsafe/_unit")
# A path: from a known top-level folder, or a top-level file.
PATH = re.compile(r"`((?:src|tests|docs|benchmarks|scripts|examples)/[^`\s]+|README\.md)`")


def table_rows(text: str) -> list[list[str]]:
    """Return the cells of each body row of the first table under `HEADING`."""
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    body = rows[2:]  # the header and its rule first
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in body]


def missing_paths(rows: list[list[str]], root: Path) -> list[str]:
    """Return every path of ``rows`` that names nothing under ``root``."""
    missing = []
    for row in rows:
        for cell in row[1:]:
            for path in PATH.findall(cell):
                found = list(root.glob(path)) if "*" in path else [root / path]
                if not any(candidate.exists() for candidate in found):
                    missing.append(path)
    return missing


def undrawn_modules(text: str, root: Path) -> list[str]:
    """Return the modules of `DRAWN` under ``root`` that the picture in ``text`` does not name."""
    picture = text.split(PICTURE, 1)[1].split("\n## ", 1)[0]
    return [
        str(path.relative_to(root))
        for folder in DRAWN
        for path in sorted((root / folder).glob("*.py"))
        if path.name != "__init__.py"
        and not re.search(rf"(?<![\w.]){re.escape(path.name)}", picture)
    ]


def test_the_picture_names_every_module_of_the_base_and_the_wings():
    assert undrawn_modules(ARCHITECTURE.read_text(encoding="utf-8"), ROOT) == []


def test_a_module_missing_from_the_picture_is_caught():
    text = f"{PICTURE}\n\n _unit/ core.py, pending_commit.py, core.pyc\n\n## Next\n\nshapes.py\n"
    undrawn = undrawn_modules(text, ROOT)
    assert "src/dropsafe/_unit/shapes.py" in undrawn  # named only below the picture
    assert "src/dropsafe/_unit/core.py" not in undrawn
    assert "src/dropsafe/_commit_truth/pending_commit.py" not in undrawn
    assert "src/dropsafe/_unit/recording.py" in undrawn
    assert "src/dropsafe/_engine/__init__.py" not in undrawn


def test_every_row_names_a_file_to_change_and_a_test():
    rows = table_rows(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(rows) >= 10
    for row in rows:
        assert len(row) == 3, row
        assert PATH.search(row[1]), f"no file to change in {row[0]!r}"
        assert any(p.startswith("tests/") for p in PATH.findall(row[2])), f"no test in {row[0]!r}"


def test_every_path_in_the_table_exists():
    rows = table_rows(ARCHITECTURE.read_text(encoding="utf-8"))
    assert missing_paths(rows, ROOT) == []


@pytest.mark.parametrize(
    ("cell", "missing"),
    [
        ("`src/dropsafe/no_such_module.py`", ["src/dropsafe/no_such_module.py"]),
        ("`tests/no_such_folder/test_*.py`", ["tests/no_such_folder/test_*.py"]),
        ("`src/dropsafe/events.py` (a dataclass)", []),
    ],
)
def test_a_missing_path_is_caught(cell, missing):
    assert missing_paths([["you want", cell, "`tests/`"]], ROOT) == missing
