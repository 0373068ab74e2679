"""The drivers' registry is the one place that names drivers, and it is complete.

Each driver's file says everything about it (tests/drivers/test_drivers.py checks what they do);
here: the classifier learns every driver's error facts before the first public call, the names
the bench's typed signatures accept are the registry's, each driver's extra exists, and the
library (base, wings, the face) names no driver outside ``dropsafe._drivers``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import tomllib

from dropsafe._drivers import (
    DRIVERS,
    SUPPORTED_DRIVERS,
    DriverName,
    driver_names,
    face_of,
    faces,
)

ROOT = Path(__file__).parents[2]
LIBRARY = ROOT / "src" / "dropsafe"
# Tools above the library may name the drivers they drive (the bench, the demo, the CLI).
TOOLS = ("_drivers", "testing", "_bench", "_demo", "_cli")
NAMES = {name for driver in DRIVERS for name in (driver.name, *driver.dialect_drivers)}


def test_the_classifier_knows_every_driver_before_the_first_public_call():
    # A fresh interpreter, no engine made: the public name alone must bring the registry's
    # facts along. Without them pg8000's SQLSTATE (inside args[0]) goes unread: PERMANENT.
    script = (
        "import dropsafe, pg8000.exceptions, psycopg2.errors\n"
        "error = pg8000.exceptions.DatabaseError({'C': '40001', 'M': 'x', 'V': 'ERROR'})\n"
        "print(dropsafe.classify(error).value)\n"
        "from dropsafe._classify import sqlstate_of, server_refused_commit\n"
        "print(sqlstate_of(error), server_refused_commit(error))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["transient", "40001", "True"]


def test_the_drivers_type_names_exactly_the_registrys_drivers():
    assert typing.get_args(DriverName) == SUPPORTED_DRIVERS


def test_every_driver_has_its_extra_and_its_facts():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for driver in DRIVERS:
        assert driver.extra in extras, driver.name
        assert driver.errors.package == driver.name
        assert driver.sync or driver.asyncio
        assert driver.tls.url_parameters or driver.tls.needs_ssl_context


def test_faces_and_filters_read_the_registry():
    assert {face_of(face) for face in faces()} == {
        *((name, False) for name in driver_names(sync=True)),
        *((name, True) for name in driver_names(asyncio=True)),
    }
    assert set(driver_names(replays=False)) == {
        driver.name for driver in DRIVERS if not driver.capabilities.replays_first_statement
    }


def _driver_names_in_code(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and (node.value in NAMES or any(f"+{name}" in node.value for name in NAMES))
    ]


def test_the_library_names_no_driver_outside_the_registry():
    found = {
        str(path.relative_to(LIBRARY)): hits
        for path in sorted(LIBRARY.rglob("*.py"))
        if path.relative_to(LIBRARY).parts[0] not in TOOLS and (hits := _driver_names_in_code(path))
    }
    assert not found, f"ask dropsafe._drivers instead: {found}"
