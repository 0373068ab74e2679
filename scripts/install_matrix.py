"""Install matrix: dropsafe as users install it, from the built wheel, one extra at a time.

Why: the project's own venv installs ``.[dev]``, which pulls in everything, so it never sees
what a user with one extra gets. A user with ``dropsafe[psycopg2]`` and SQLAlchemy 2.1 (which
no longer installs greenlet) could not ``import dropsafe``, and every pytest run of their own
project broke, since pytest loads dropsafe's plugin into it.

What it does (``scripts/test.sh`` runs it before pytest, so CI does):

1. Builds the sdist and, from it, the wheel once (``python -m build``), runs ``twine check``
   and checks what each archive holds: the wheel exactly ``src/dropsafe``, the sdist no caches,
   venvs or benchmark results.
2. Starts one throwaway PostgreSQL server (from this dev venv) for every cell.
3. Runs the cells, two at a time. Each is a fresh venv (made by uv) with the wheel, not an
   editable install, where ``install_cell.py`` imports dropsafe, runs a unit of work through
   every driver present, checks what the cell's extra is for, and a user's trivial pytest
   suite must pass with dropsafe's plugin loaded. Cells:
   - the base install and each extra alone, with the newest SQLAlchemy 2.0.x and 2.1.x;
   - ``dropsafe[psycopg2]`` with SQLAlchemy 2.1 installed by pip, as the typical user does;
   - the lower bounds: every ``>=`` of the wheel's requirements pinned with ``==``;
   - every other Python version the classifiers claim that this machine has, with ``all``.

It exits non-zero, naming each failed cell and showing the output of its failed step.
Usage: ``.venv/bin/python scripts/install_matrix.py [--only TEXT] [--jobs N] [--keep]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.requirements import Requirement

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dropsafe.testing import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
CELL_SCRIPT = Path(__file__).resolve().parent / "install_cell.py"
# uv from this dev venv (the dev extra installs it), else from PATH.
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv") or "uv"

# The oldest and the newest SQLAlchemy series we support: each resolves to its newest release.
SQLALCHEMY_SERIES = {"sa2.0": "sqlalchemy>=2.0,<2.1", "sa2.1": "sqlalchemy>=2.1,<2.2"}
# The extras a user picks from (dev and embedded are for this project's own machines).
USER_EXTRAS = ("psycopg2", "psycopg", "asyncpg", "pg8000", "testing", "prometheus", "demo", "bench")
# What each extra must bring: drivers that get a unit of work, parts of dropsafe that must work.
ALL_DRIVERS = ("psycopg2", "psycopg", "asyncpg", "pg8000")
EXTRA_DRIVERS: dict[str, tuple[str, ...]] = {
    "psycopg2": ("psycopg2",),
    "psycopg": ("psycopg",),
    "asyncpg": ("asyncpg",),
    "pg8000": ("pg8000",),
    "demo": ("psycopg2",),
    "all": ALL_DRIVERS,
    "bench": ALL_DRIVERS,
}
EXTRA_FEATURES: dict[str, tuple[str, ...]] = {
    "testing": ("testing",),
    "prometheus": ("prometheus",),
    "demo": ("demo",),
    "all": ("testing",),
    "bench": ("bench", "testing"),
}

# Bounds, in seconds, of each step: a cold cache downloads matplotlib and numpy.
INSTALL_TIMEOUT = 600
CHECK_TIMEOUT = 300

USER_PYPROJECT = """\
[project]
name = "user-app"
version = "0"

[tool.pytest.ini_options]
addopts = ["--strict-markers", "--strict-config", "-p", "no:cacheprovider"]
filterwarnings = ["error"]
"""
USER_TESTS = """\
def test_the_app_works():
    assert sum([1, 2]) == 3


def test_dropsafe_plugin_was_loaded(pytestconfig):
    # The matrix's probe: the suite proves something only if dropsafe's plugin was in the run.
    assert pytestconfig.pluginmanager.hasplugin("dropsafe")
"""
USER_FIXTURE_TEST = """\
import pytest


@pytest.mark.dropsafe_fault
def test_a_throwaway_server(request, postgres_server):
    assert request.node.get_closest_marker("timeout").args == (120,)
    assert postgres_server.execute("SELECT 1") == [("1",)]
"""

_print_lock = threading.Lock()


class StepFailedError(Exception):
    """A step of a cell failed; its output is in the cell's log."""


@dataclass
class Cell:
    """One fresh venv: what goes into it and what it must do."""

    name: str
    python: str
    requirements: list[str]
    extras: tuple[str, ...] = ()
    constraints: list[str] = field(default_factory=list)
    # uv makes the matrix fast; one cell uses pip and venv, as the typical user does.
    installer: str = "uv"

    @property
    def drivers(self) -> list[str]:
        """The drivers this cell's extras must bring."""
        return sorted({d for extra in self.extras for d in EXTRA_DRIVERS.get(extra, ())})

    @property
    def features(self) -> list[str]:
        """The parts of dropsafe this cell's extras are for."""
        return sorted({f for extra in self.extras for f in EXTRA_FEATURES.get(extra, ())})


@dataclass
class Outcome:
    """How a cell went."""

    cell: Cell
    ok: bool
    seconds: float
    versions: str = ""
    failure: str = ""


def main(argv: Sequence[str] | None = None) -> int:
    """Build, check the archives, run the cells; return 0 only if every cell passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only the cells whose name contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="cells at a time (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the venvs (path printed)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dropsafe-install-matrix-"))
    try:
        dist = work / "dist"
        wheel, sdist = build(dist)
        metadata = check_wheel(wheel)
        check_sdist(sdist, metadata["Version"])
        say(f"built and checked {wheel.name} and {sdist.name} ({time.monotonic() - started:.0f}s)")
        cells, skipped = plan(wheel, metadata)
        if args.only:
            cells = [cell for cell in cells if args.only in cell.name]
        # The heaviest cells first, so that two at a time end close together.
        cells.sort(key=lambda cell: len(cell.drivers) + len(cell.features), reverse=True)
        outcomes = run_cells(cells, work, args.jobs)
    finally:
        if args.keep:
            say(f"venvs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [outcome for outcome in outcomes if not outcome.ok]
    for note in skipped:
        say(f"skipped: {note}")
    say(
        f"install matrix: {len(outcomes) - len(failed)} cells ok, {len(failed)} failed "
        f"in {time.monotonic() - started:.0f}s"
    )
    for outcome in failed:
        say(f"FAILED cell {outcome.cell.name}: {outcome.failure}")
    return 1 if failed or not outcomes else 0


# -- the archives ---------------------------------------------------------------------------


def build(dist: Path) -> tuple[Path, Path]:
    """Build the sdist, then the wheel from it (``python -m build``'s default); twine check both."""
    run([sys.executable, "-m", "build", "--installer", "uv", "--outdir", str(dist), str(ROOT)])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        fail(f"expected one wheel and one sdist in the build output, got {wheels + sdists}")
    run([sys.executable, "-m", "twine", "check", "--strict", str(wheels[0]), str(sdists[0])])
    return wheels[0], sdists[0]


def check_wheel(wheel: Path) -> dict[str, str | list[str]]:
    """Check that the wheel holds exactly src/dropsafe and its metadata; return the metadata."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata_text = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    shipped = {name for name in names if not name.startswith(f"{dist_info}/")}
    source = {
        path.relative_to(ROOT / "src").as_posix()
        for path in (ROOT / "src" / "dropsafe").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    if shipped != source:
        fail(
            f"the wheel does not hold exactly src/dropsafe: extra {sorted(shipped - source)}, "
            f"missing {sorted(source - shipped)}"
        )
    for needed in (
        "[pytest11]\ndropsafe = dropsafe.testing.pytest_plugin",
        "dropsafe = dropsafe._cli:main",
        "[sqlalchemy.plugins]\ndropsafe = dropsafe._engine.url_plugin:DropsafePlugin",
    ):
        if needed not in entry_points:
            fail(f"the wheel's entry points lack {needed!r}:\n{entry_points}")
    message = email.parser.Parser().parsestr(metadata_text)
    metadata: dict[str, str | list[str]] = {
        "Version": str(message["Version"]),
        "Requires-Python": str(message["Requires-Python"]),
        "Requires-Dist": message.get_all("Requires-Dist") or [],
        "Classifier": message.get_all("Classifier") or [],
    }
    return metadata


# What an sdist must hold, and what it must not (caches, venvs, build output, results).
SDIST_NEEDS = ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "src/dropsafe/__init__.py")
SDIST_REFUSES = re.compile(
    r"(^|/)(\.venv|\.git|__pycache__|\.mypy_cache|\.ruff_cache|\.pytest_cache|\.hypothesis"
    r"|dist|build|demo-out)(/|$)|\.pyc$|^benchmarks/results/"
)
SDIST_MAX_BYTES = 1_000_000


def check_sdist(sdist: Path, version: object) -> None:
    """Check that the sdist holds the source, tests and docs, and nothing generated."""
    if sdist.stat().st_size > SDIST_MAX_BYTES:
        fail(f"{sdist.name} is {sdist.stat().st_size} bytes; something big got in")
    top = f"dropsafe-{version}/"
    with tarfile.open(sdist) as archive:
        names = [member.name for member in archive.getmembers() if member.isfile()]
    stray = [name for name in names if not name.startswith(top)]
    inside = [name.removeprefix(top) for name in names if name.startswith(top)]
    refused = [name for name in inside if SDIST_REFUSES.search(name)]
    missing = [name for name in SDIST_NEEDS if name not in inside]
    if stray or refused or missing:
        fail(
            f"{sdist.name}: outside {top}: {stray}; not for an sdist: {refused}; missing: {missing}"
        )


# -- the cells --------------------------------------------------------------------------------


def plan(wheel: Path, metadata: dict[str, str | list[str]]) -> tuple[list[Cell], list[str]]:
    """Return the cells to run, and the notes about what this machine cannot run."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    cells = []
    for series, spec in SQLALCHEMY_SERIES.items():
        for extra in ("", *USER_EXTRAS):
            extras = (extra,) if extra else ()
            cells.append(
                Cell(
                    name=f"py{here}-{series}-{extra or 'base'}",
                    python=sys.executable,
                    requirements=[wheel_requirement(wheel, extras), spec],
                    extras=extras,
                )
            )
    # The user, exactly: pip install 'dropsafe[psycopg2]' with SQLAlchemy 2.1.
    cells.append(
        Cell(
            name=f"py{here}-sa2.1-psycopg2-by-pip",
            python=sys.executable,
            requirements=[wheel_requirement(wheel, ("psycopg2",)), SQLALCHEMY_SERIES["sa2.1"]],
            extras=("psycopg2",),
            installer="pip",
        )
    )
    skipped = []
    claimed = [
        c.rsplit(" :: ", 1)[1]
        for c in metadata["Classifier"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    pythons = {here: sys.executable}
    for version in claimed:
        python = sys.executable if version == here else find_python(version)
        if python is None:
            skipped.append(f"Python {version} (claimed by the classifiers) is not on this machine")
        else:
            pythons[version] = python
    # The lower bounds where we run and on the oldest Python claimed (floors can differ).
    cells.extend(
        Cell(
            name=f"py{version}-lower-bounds",
            python=pythons[version],
            requirements=[wheel_requirement(wheel, USER_EXTRAS)],
            extras=USER_EXTRAS,
            constraints=lower_bounds(metadata["Requires-Dist"], USER_EXTRAS, version),
        )
        for version in sorted({here, min(pythons, key=_version_key)}, key=_version_key)
    )
    for version, python in pythons.items():
        if version == here:
            continue
        # The newest SQLAlchemy that this Python takes (2.1 needs 3.11; 3.10 gets 2.0.x).
        cells.append(
            Cell(
                name=f"py{version}-newest-all",
                python=python,
                requirements=[wheel_requirement(wheel, ("all", "prometheus"))],
                extras=("all", "prometheus"),
            )
        )
    return cells, skipped


def wheel_requirement(wheel: Path, extras: Sequence[str]) -> str:
    """``/path/dropsafe.whl[extra,...]``: the built wheel, never the source tree."""
    return f"{wheel}[{','.join(extras)}]" if extras else str(wheel)


def lower_bounds(requires: object, extras: Sequence[str], python: str) -> list[str]:
    """``name==X`` for every ``name>=X`` the base install and ``extras`` require on ``python``."""
    pins: dict[str, str] = {}
    for text in requires if isinstance(requires, list) else []:
        requirement = Requirement(text)
        if requirement.marker and not any(
            requirement.marker.evaluate(
                {"extra": extra, "python_version": python, "python_full_version": f"{python}.0"}
            )
            for extra in ("", *extras)
        ):
            continue
        for spec in requirement.specifier:
            if spec.operator == ">=":
                name = requirement.name.lower()
                # The highest bound wins where two extras bound the same package.
                if name not in pins or _version_key(spec.version) > _version_key(pins[name]):
                    pins[name] = spec.version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_python(version: str) -> str | None:
    """Find an interpreter for ``version`` on PATH, or in pyenv's versions behind its shims."""
    candidates: list[str] = []
    found = shutil.which(f"python{version}")
    if found:
        candidates.append(found)
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)
        versions = Path(root.stdout.strip()) / "versions"
        candidates += [str(p) for p in sorted(versions.glob(f"{version}.*/bin/python{version}"))]
    for candidate in candidates:
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] >= (3, 0), sys.executable)"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if probe.returncode == 0 and probe.stdout.startswith("True "):
            return probe.stdout.split(" ", 1)[1].strip()
    return None


def run_cells(cells: list[Cell], work: Path, jobs: int) -> list[Outcome]:
    """Run the cells ``jobs`` at a time against one throwaway server; report each as it ends."""
    # Imported here: the archive checks above need nothing of dropsafe.
    from dropsafe.testing import PostgresServer

    with PostgresServer() as server, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_cell, cell, work / cell.name, server) for cell in cells]
        return [future.result() for future in futures]


def run_cell(cell: Cell, where: Path, server: PostgresServer) -> Outcome:
    """Make the cell's venv, install, run its checks and its user's pytest suite."""
    started = time.monotonic()
    # A database per cell: cells run side by side and the demo's blog creates its tables.
    database = "matrix_" + re.sub(r"\W", "_", cell.name)
    server.execute(f"CREATE DATABASE {database}")
    where.mkdir(parents=True)
    log = where / "log.txt"
    venv = where / "venv"
    python = str(venv / "bin" / "python")
    step = "venv"
    versions = ""
    try:
        if cell.installer == "pip":
            cell_run(log, [cell.python, "-m", "venv", str(venv)], INSTALL_TIMEOUT)
            install = [python, "-m", "pip", "install", "--quiet", *cell.requirements]
        else:
            make = [UV, "venv", "--quiet", "--python", cell.python, str(venv)]
            cell_run(log, make, INSTALL_TIMEOUT)
            install = [UV, "pip", "install", "--quiet", "--python", python, *cell.requirements]
        step = "install"
        if "testing" not in cell.features:
            install.append("pytest")  # the user's own test runner; without pytest-timeout
        if cell.constraints:
            constraints = where / "constraints.txt"
            constraints.write_text("\n".join(cell.constraints) + "\n")
            install += ["--constraint", str(constraints)]
        cell_run(log, install, INSTALL_TIMEOUT)
        versions = installed_versions(python)
        step = "checks (install_cell.py)"
        config = {
            "drivers": cell.drivers,
            "features": cell.features,
            "urls": {
                "psycopg2": server.url("psycopg2", database=database),
                "psycopg": server.url("psycopg", database=database),
                "asyncpg": server.url("asyncpg", database=database),
                "pg8000": server.url("pg8000", database=database),
            },
            "ca_file": str(server.ca_file),
        }
        # Through stdin: the URLs carry the server's password, and a command line is
        # readable by every local account (and written to the cell's log).
        command = [python, "-I", str(CELL_SCRIPT)]
        cell_run(log, command, CHECK_TIMEOUT, cwd=where, stdin=json.dumps(config))
        step = "the user's pytest suite"
        run_user_suite(log, python, where / "user-app", with_fixtures="testing" in cell.features)
    except StepFailedError as exc:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        say(f"FAIL  {cell.name}: {step}: {exc}\n{tail}\n")
        return Outcome(cell, ok=False, seconds=time.monotonic() - started, failure=f"{step}: {exc}")
    seconds = time.monotonic() - started
    say(f"ok    {cell.name:<30} {seconds:5.1f}s  {versions}")
    return Outcome(cell, ok=True, seconds=seconds, versions=versions)


def run_user_suite(log: Path, python: str, project: Path, *, with_fixtures: bool) -> None:
    """Run a user's project's pytest suite with dropsafe installed: it must pass, plugin loaded."""
    project.mkdir()
    (project / "pyproject.toml").write_text(USER_PYPROJECT)
    (project / "test_app.py").write_text(USER_TESTS)
    expected = 2
    if with_fixtures:
        (project / "test_with_a_server.py").write_text(USER_FIXTURE_TEST)
        expected += 1
    output = cell_run(log, [python, "-m", "pytest", "-q"], CHECK_TIMEOUT, cwd=project)
    if not re.search(rf"^{expected} passed in ", output, re.MULTILINE):
        raise StepFailedError(f"expected exactly '{expected} passed'")


INTERESTING = (
    "sqlalchemy",
    "greenlet",
    *ALL_DRIVERS,
    "psycopg2-binary",
    "pytest",
    "pytest-timeout",
)


def installed_versions(python: str) -> str:
    """Return the versions that matter for the report line: SQLAlchemy, greenlet, drivers."""
    result = subprocess.run(
        [UV, "pip", "list", "--python", python, "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    listed = {p["name"].lower(): p["version"] for p in json.loads(result.stdout or "[]")}
    return " ".join(f"{name} {listed[name]}" for name in INTERESTING if name in listed)


# -- helpers ----------------------------------------------------------------------------------


def clean_env(venv: Path | None = None) -> dict[str, str]:
    """Return a user's shell: no PYTHONPATH or pytest settings of ours; ``venv`` activated."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "PYTEST", "VIRTUAL_ENV"))
    }
    env["UV_PYTHON_DOWNLOADS"] = "never"  # only interpreters that are on this machine
    env["UV_NO_PROGRESS"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


def cell_run(
    log: Path, argv: list[str], timeout: float, cwd: Path | None = None, stdin: str | None = None
) -> str:
    """Run one step, appending its output to the cell's log; raise StepFailedError if it fails.

    A step run in the cell's folder (``cwd``) runs with the cell's venv activated; ``stdin`` is
    its input (secrets go there, not in ``argv``).
    """
    try:
        result = subprocess.run(
            argv,
            input=stdin,
            cwd=cwd,
            env=clean_env(log.parent / "venv" if cwd else None),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StepFailedError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from None
    output = result.stdout + result.stderr
    with log.open("a") as file:
        file.write(f"$ {' '.join(argv)}\n{output}\n")
    if result.returncode != 0:
        raise StepFailedError(f"exit {result.returncode}: {' '.join(argv[:4])} ...")
    return output


def run(argv: list[str]) -> None:
    """Run a build step; stop the matrix with its output if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=clean_env())
    if result.returncode != 0:
        fail(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")


def fail(message: str) -> None:
    """Stop the whole matrix: the archives themselves are wrong."""
    say(f"install matrix FAILED: {message}")
    raise SystemExit(1)


def say(message: str) -> None:
    """Print whole lines from parallel cells."""
    with _print_lock:
        print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
