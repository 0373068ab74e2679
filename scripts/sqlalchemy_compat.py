"""Run SQLAlchemy's own tests plain and with every engine hardened; fail on unlisted differences.

dropsafe plugs into SQLAlchemy's engine and pool events, so it must not change what SQLAlchemy
promises. This script takes the source release of the SQLAlchemy version installed in
``--python`` (from the package index: it carries ``test/``), starts a throwaway PostgreSQL
(``dropsafe.testing.PostgresServer``), runs a subset of the suite once plain and once with
``scripts/sqlalchemy_compat_plugin.py`` hardening every engine, and compares the two test by
test (JUnit XML). Every difference must be listed, with its reason, in
``docs/sqlalchemy-compat.md``; the script exits 1 on any other. A difference is confirmed by
running the differing tests again in both modes, so that one timing hiccup is not a verdict.

Usage::

    .venv/bin/python scripts/sqlalchemy_compat.py                  # installed SQLAlchemy
    .venv/bin/python scripts/sqlalchemy_compat.py --python other-venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dropsafe.testing import PostgresServer, ServerError

REPO = Path(__file__).resolve().parent.parent
ALLOW_FILE = REPO / "docs" / "sqlalchemy-compat.md"
# One allow-list line in the docs: - `driver` `test id`: reason
_ALLOW_LINE = re.compile(r"^- `(?P<driver>\w+)` `(?P<test>[^`]+)`: (?P<reason>\S.*)$")
_SERVER_VERSION = re.compile(r"(_postgresql\+\w+?)(?:_\d+)+(?=::)")
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dropsafe-sqlalchemy-compat"
)

#: Which part of the suite each driver runs: the engine and pool, the PostgreSQL dialect, the
#: ORM's transactions and sessions (psycopg2); the engine, the ORM's transactions and the asyncio
#: extension (asyncpg). About 5 + 3 minutes on two cores.
SUBSETS: dict[str, list[str]] = {
    "psycopg2": [
        "test/engine",
        "test/dialect/postgresql",
        "test/orm/test_transaction.py",
        "test/orm/test_session.py",
    ],
    "asyncpg": ["test/engine", "test/orm/test_transaction.py", "test/ext/asyncio"],
}
RUN_TIMEOUT = 1500.0


@dataclass(frozen=True)
class Difference:
    """One test whose outcome changed when its engines were hardened."""

    driver: str
    test: str
    plain: str
    hardened: str


def main() -> int:
    """Parse arguments, run the comparison, print the verdict; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the venv to test")
    parser.add_argument(
        "--sqlalchemy",
        metavar="VERSION",
        help="test this SQLAlchemy version instead (2.0.58, or 2.0.* for the latest 2.0), "
        "in a venv made for it and kept in the cache",
    )
    parser.add_argument(
        "--driver", action="append", choices=sorted(SUBSETS), help="default: all of them"
    )
    parser.add_argument("--out", type=Path, help="keep the JUnit XML files here")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to narrow a run")
    args = parser.parse_args()
    started = time.monotonic()
    if args.sqlalchemy:
        args.python = _venv_with(args.sqlalchemy)
    version = _installed_version(args.python)
    print(f"SQLAlchemy {version} in {args.python}", flush=True)
    allowed = _allow_list()
    with tempfile.TemporaryDirectory(prefix="sa-compat-") as temp:
        source = _unpack(_sdist(args.python, version), Path(temp))
        out = args.out or Path(temp) / "junit"
        out.mkdir(parents=True, exist_ok=True)
        # One server per mode, not one database each: the two runs go at once, and names of
        # prepared transactions ('myid' in TwoPhaseCommitTest) are shared by a whole cluster.
        with (
            PostgresServer(settings={"max_prepared_transactions": "10"}) as plain_server,
            PostgresServer(settings={"max_prepared_transactions": "10"}) as hardened_server,
        ):
            servers = {"plain": plain_server, "hardened": hardened_server}
            for server in servers.values():
                _prepare(server)
            _write_db_config(servers, source)
            differences: list[Difference] = []
            for driver in args.driver or sorted(SUBSETS):
                differences += _compare(
                    driver=driver, source=source, out=out, args=args, version=version
                )
    unlisted = [d for d in differences if (d.driver, d.test) not in allowed]
    for d in differences:
        reason = allowed.get((d.driver, d.test), "NOT LISTED in docs/sqlalchemy-compat.md")
        print(f"  {d.driver} {d.test}: plain {d.plain}, hardened {d.hardened}: {reason}")
    seen = {(d.driver, d.test) for d in differences}
    for driver, test in sorted(set(allowed) - seen):
        print(f"  (listed but not seen: {driver} {test})")
    minutes = (time.monotonic() - started) / 60
    print(
        f"SQLAlchemy {version}: {len(differences)} difference(s), {len(unlisted)} unlisted, "
        f"{minutes:.1f} min",
        flush=True,
    )
    return 1 if unlisted else 0


def _venv_with(version: str) -> str:
    """Return the python of a venv with dropsafe (editable) and SQLAlchemy ``version``."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.]*(\.\*)?", version):
        raise SystemExit(f"--sqlalchemy takes a version such as 2.0.58 or 2.0.*, not {version!r}")
    # dropsafe is installed editable from this checkout: one venv per checkout and version.
    checkout = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    venv = CACHE / f"venv-{checkout}-sqlalchemy-{version.replace('*', 'latest')}"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making a venv with SQLAlchemy {version} in {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--editable",
                f"{REPO}[psycopg2,asyncpg,testing]",
                f"sqlalchemy[asyncio]=={version}",
            ],
            check=True,
        )
    return str(python)


def _installed_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import sqlalchemy; print(sqlalchemy.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def _sdist(python: str, version: str) -> Path:
    """Return SQLAlchemy's source release for ``version``, downloaded once into the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if found:
        return found[0]
    print(f"downloading the source release of SQLAlchemy {version}", flush=True)
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"sqlalchemy=={version}",
            "--dest",
            str(CACHE),
        ],
        check=True,
    )
    found = sorted(CACHE.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip downloaded no source release of SQLAlchemy {version}")
    return found[0]


def _unpack(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    (source,) = [p for p in into.iterdir() if p.is_dir() and (p / "test").is_dir()]
    return source


def _prepare(server: PostgresServer) -> None:
    """Create what the suite expects: user scott, a UTF8 database ``test``, two schemas."""
    # Not the suite's customary 'tiger': a superuser with a known password would be any
    # local account's while the suite runs.
    server.execute(f"CREATE ROLE scott LOGIN SUPERUSER PASSWORD '{_scott_password(server)}'")
    server.execute("CREATE DATABASE test OWNER scott ENCODING 'utf8' TEMPLATE template0")
    server.execute(
        "CREATE SCHEMA test_schema AUTHORIZATION scott; "
        "CREATE SCHEMA test_schema_2 AUTHORIZATION scott",
        database="test",
    )
    for extension in ("hstore", "citext"):
        try:
            server.execute(f"CREATE EXTENSION {extension}", database="test")
        except ServerError:  # two statements, once
            # A build without contrib: the suite skips or fails those tests in both modes.
            print(f"  (no {extension} extension in this PostgreSQL build)", flush=True)


def _scott_password(server: PostgresServer) -> str:
    # Derived from the server's own generated password: one per server, never written down.
    return hashlib.sha256(f"scott:{server.password}".encode()).hexdigest()[:32]


def _dburi(server: PostgresServer, driver: str, database: str) -> str:
    tls = "ssl=require" if driver == "asyncpg" else "sslmode=require"
    password = _scott_password(server)
    return f"postgresql+{driver}://scott:{password}@{server.host}:{server.port}/{database}?{tls}"


def _write_db_config(servers: dict[str, PostgresServer], source: Path) -> None:
    """Name every URL in the suite's test.cfg (0600), for ``--db``: never on a command line."""
    lines = ["[db]"] + [
        f"{_db_name(mode, driver)} = {_dburi(server, driver, 'test')}"
        for mode, server in servers.items()
        for driver in SUBSETS
    ]
    config = source / "test.cfg"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text("\n".join(lines) + "\n")


def _db_name(mode: str, driver: str) -> str:
    return f"dropsafe_{mode}_{driver}"


def _run(
    driver: str,
    source: Path,
    junit: Path,
    *,
    python: str,
    hardened: bool,
    tests: list[str],
    keyword: str | None,
    only: Path | None = None,
) -> dict[str, str]:
    """Run ``tests`` of the suite in one mode; return each test's outcome."""
    mode = "hardened" if hardened else "plain"
    env = dict(os.environ)
    env["DROPSAFE_COMPAT_HARDEN"] = "1" if hardened else "0"
    env["DROPSAFE_COMPAT_ONLY"] = str(only or "")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "scripts"), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [
        python,
        "-m",
        "pytest",
        # dropsafe's own pytest11 plugin would import SQLAlchemy before the suite's bootstrap.
        "-p",
        "no:dropsafe",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-p",
        "sqlalchemy_compat_plugin",
        "--db",
        _db_name(mode, driver),
        "--junitxml",
        str(junit),
        "--maxfail=100000",
        # Races timed with sleeps: on two loaded cores they fail plain as often as hardened.
        "-m",
        "not timing_intensive",
        "-q",
        "--tb=line",
        "-o",
        "addopts=",
        *(["-k", keyword] if keyword else []),
        *tests,
    ]
    log = junit.with_suffix(".log")
    started = time.monotonic()
    with log.open("w") as output:
        subprocess.run(
            command,
            cwd=source,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    summary = log.read_text().strip().splitlines()[-3:]
    took = time.monotonic() - started
    print(f"  {driver} {mode}: {took:.0f} s: {' | '.join(summary)}", flush=True)
    if not junit.exists():
        raise SystemExit(f"{driver} {mode} run wrote no JUnit XML; see {log}")
    return _outcomes(junit)


def _outcomes(junit: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 - our own run's file
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                break
        outcomes[test] = outcome
    return outcomes


def _compare(
    *,
    driver: str,
    source: Path,
    out: Path,
    args: argparse.Namespace,
    version: str,
) -> list[Difference]:
    """Run the driver's subset in both modes at once (a server each), then confirm differences."""

    def run(hardened: bool, tests: list[str], tag: str, only: Path | None = None) -> dict[str, str]:
        mode = "hardened" if hardened else "plain"
        junit = out / f"sqlalchemy-{version}-{driver}-{mode}{tag}.xml"
        return _run(
            driver,
            source,
            junit,
            python=args.python,
            hardened=hardened,
            tests=tests,
            keyword=args.keyword,
            only=only,
        )

    with ThreadPoolExecutor(2) as pool:
        plain_run = pool.submit(run, False, SUBSETS[driver], "")  # noqa: FBT003
        hardened_run = pool.submit(run, True, SUBSETS[driver], "")  # noqa: FBT003
        plain, hardened = plain_run.result(), hardened_run.result()
    differing = _differing(plain, hardened)
    print(f"  {driver}: {len(plain)} tests, {len(differing)} differ at first", flush=True)
    if differing:
        # Again, only those, in both modes: a difference must show twice to count.
        only = out / f"sqlalchemy-{version}-{driver}-again.txt"
        only.write_text("".join(f"{test}\n" for test in differing))
        modules = sorted({_module_path(test) for test in differing})
        with ThreadPoolExecutor(2) as pool:
            plain_run = pool.submit(run, False, modules, "-again", only)  # noqa: FBT003
            hardened_run = pool.submit(run, True, modules, "-again", only)  # noqa: FBT003
            plain_again, hardened_again = plain_run.result(), hardened_run.result()
        again = _differing(plain_again, hardened_again)
        differing = [test for test in differing if test in again]
    return [
        Difference(
            driver, _portable(test), plain.get(test, "missing"), hardened.get(test, "missing")
        )
        for test in differing
    ]


def _portable(test: str) -> str:
    """Drop the server version from per-backend class names (X_postgresql+psycopg2_15_4)."""
    return _SERVER_VERSION.sub(r"\1", test)


def _differing(plain: dict[str, str], hardened: dict[str, str]) -> list[str]:
    return sorted(
        test
        for test in plain.keys() | hardened.keys()
        if plain.get(test, "missing") != hardened.get(test, "missing")
    )


def _module_path(test: str) -> str:
    """Turn a JUnit ``classname::name`` into its module's path (test.engine.test_pool.X)."""
    parts = test.split("::", 1)[0].split(".")
    # Packages are test, engine, orm...; the module is the first part named test_*.
    module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
    return "/".join(parts[: module + 1]) + ".py"


def _allow_list() -> dict[tuple[str, str], str]:
    allowed: dict[tuple[str, str], str] = {}
    for line in ALLOW_FILE.read_text().splitlines():
        match = _ALLOW_LINE.match(line)
        if match:
            allowed[match["driver"], match["test"]] = match["reason"]
    return allowed


if __name__ == "__main__":
    sys.exit(main())
