"""One cell of the install matrix, run by the matrix venv's own Python (see install_matrix.py).

It checks what a user of this install gets, with nothing from the source tree on the path:
``import dropsafe`` from site-packages, a unit of work through each driver the cell's extra
brings (async too, where SQLAlchemy's asyncio support is installed), the parts of dropsafe each
extra is for, and a clear ConfigurationError naming the extra for what is not installed.

Usage: python -I install_cell.py '{"drivers": [...], "features": [...], "urls": {...}, ...}'
Standard library and dropsafe's dependencies only: this runs in venvs with no extras at all.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import ssl
import subprocess
import sys
import sysconfig
import tempfile
from http import HTTPStatus
from pathlib import Path
from typing import Any

SYNC_DRIVERS = ("psycopg2", "psycopg", "pg8000")
ASYNC_DRIVERS = ("asyncpg", "psycopg")
# What each extra is for, and a check that it works (see check_feature).
FEATURES = ("testing", "prometheus", "demo", "bench")


def main() -> int:
    """Run every check of the cell; raise (so exit non-zero, with a traceback) at the first miss."""
    # On stdin, not argv: its URLs carry a password, and command lines are anyone's to read.
    cell: dict[str, Any] = json.loads(sys.stdin.read())
    check_installed_from_wheel()
    has_asyncio = importlib.util.find_spec("greenlet") is not None
    print(f"asyncio support (greenlet): {has_asyncio}")
    if not has_asyncio:
        check_async_refused()
    for driver in ("psycopg2", "psycopg", "asyncpg", "pg8000"):
        present = importlib.util.find_spec(driver) is not None
        if driver in cell["drivers"] and not present:
            raise AssertionError(f"the cell's extra should have installed {driver}")
        if not present:
            check_driver_refused(driver)
            continue
        url = cell["urls"][driver]
        table = f"smoke_{driver}"
        if driver in SYNC_DRIVERS:
            smoke_sync(url, driver, table, cell["ca_file"])
        if driver in ASYNC_DRIVERS and has_asyncio:
            asyncio.run(smoke_async(url, f"{table}_async"))
        elif driver == "asyncpg":
            raise AssertionError("dropsafe[asyncpg] must bring SQLAlchemy's asyncio support")
    for feature in FEATURES:
        check_feature(feature, present=feature in cell["features"], cell_urls=cell["urls"])
    check_cli()
    print("cell checks passed")
    return 0


def check_driver_refused(driver: str) -> None:
    """Check that a driver that is not installed is refused at the call, naming its extra."""
    import dropsafe  # imported by the checks that need it

    try:
        dropsafe.create_engine(f"postgresql+{driver}://app@db.example/app")
    except dropsafe.ConfigurationError as exc:
        if f"pip install 'dropsafe[{driver}]'" not in str(exc):
            raise AssertionError(f"{driver} missing: {exc}") from None
    else:
        raise AssertionError(f"{driver} is not installed, yet create_engine worked")
    print(f"{driver} not installed: ConfigurationError naming dropsafe[{driver}], ok")


def check_installed_from_wheel() -> None:
    """Check that dropsafe comes from this venv's site-packages, not a source tree or egg-link."""
    import dropsafe  # the import is the first check

    where = Path(dropsafe.__file__).resolve().parent
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    if where.parent != site_packages:
        raise AssertionError(f"dropsafe imported from {where}, not from {site_packages}")
    print(f"import dropsafe: ok ({where.relative_to(Path(sys.prefix).resolve())})")
    if "sqlalchemy.ext.asyncio" in sys.modules:
        raise AssertionError("import dropsafe imported sqlalchemy.ext.asyncio (needs greenlet)")


def check_async_refused() -> None:
    """Without greenlet, async entry points raise ConfigurationError saying what to install.

    Each in a fresh interpreter: SQLAlchemy's asyncio import fails only the first time it is
    tried in a process (tests/install covers the second time).
    """
    calls = {
        "create_async_engine": "dropsafe.create_async_engine('postgresql+asyncpg://')",
        "run_transaction_async": (
            "asyncio.run(dropsafe.run_transaction_async(object(), lambda s: None))"
        ),
    }
    for name, call in calls.items():
        code = (
            "import asyncio, dropsafe\n"
            f"try:\n    {call}\n"
            "except dropsafe.ConfigurationError as exc:\n    print(exc)\n"
            "else:\n    raise SystemExit('no ConfigurationError')\n"
        )
        result = subprocess.run(
            [sys.executable, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0 or "pip install" not in result.stdout:
            raise AssertionError(f"{name} without greenlet:\n{result.stdout}{result.stderr}")
        print(f"{name} without greenlet: ConfigurationError naming what to install, ok")


def smoke_sync(url: str, driver: str, table: str, ca_file: str) -> None:
    """Run a unit of work that writes a row, and one that reads it back, through ``driver``."""
    import sqlalchemy as sa
    from sqlalchemy.orm import sessionmaker

    import dropsafe

    connect_args: dict[str, object] = {}
    if driver == "pg8000":  # pg8000 takes TLS as an SSLContext, not in the URL
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = False
        connect_args["ssl_context"] = context
    engine = dropsafe.create_engine(url, connect_args=connect_args)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            connection.execute(sa.text(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)"))
        session_factory = sessionmaker(engine)
        new_id = dropsafe.run_transaction(
            session_factory,
            lambda s: s.execute(
                sa.text(f"INSERT INTO {table} (note) VALUES (:n) RETURNING id"), {"n": driver}
            ).scalar_one(),
        )
        note = dropsafe.run_transaction(
            session_factory,
            lambda s: s.execute(
                sa.text(f"SELECT note FROM {table} WHERE id = :i"), {"i": new_id}
            ).scalar_one(),
        )
        if note != driver:
            raise AssertionError(f"{driver}: read back {note!r}")
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE {table}"))
    finally:
        engine.dispose()
    print(f"sync unit of work through {driver}: ok")
    check_url_flag(url, connect_args)


def check_url_flag(url: str, connect_args: dict[str, object]) -> None:
    """``?plugin=dropsafe`` hardens a plain SQLAlchemy engine: the wheel's entry point works."""
    import sqlalchemy as sa

    from dropsafe._engine.guard import guard_of

    flagged = sa.engine.make_url(url).update_query_dict(
        {"plugin": "dropsafe", "dropsafe_deadline": "7"}
    )
    engine = sa.create_engine(flagged, connect_args=connect_args)
    try:
        guard = guard_of(engine)
        if guard is None or guard.policy.unit.deadline != 7.0:  # noqa: PLR2004
            raise AssertionError(f"?plugin=dropsafe did not harden the engine: {guard!r}")
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()
    print("?plugin=dropsafe: ok")


async def smoke_async(url: str, table: str) -> None:
    """Do the same through an async driver and run_transaction_async."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    import dropsafe

    engine = dropsafe.create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            await connection.execute(
                sa.text(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)")
            )
        session_factory = async_sessionmaker(engine)

        async def insert(session: AsyncSession) -> int:
            result = await session.execute(
                sa.text(f"INSERT INTO {table} (note) VALUES ('async') RETURNING id")
            )
            return int(result.scalar_one())

        new_id = await dropsafe.run_transaction_async(session_factory, insert)

        async def read(session: AsyncSession) -> str:
            result = await session.execute(
                sa.text(f"SELECT note FROM {table} WHERE id = :i"), {"i": new_id}
            )
            return str(result.scalar_one())

        note = await dropsafe.run_transaction_async(session_factory, read)
        if note != "async":
            raise AssertionError(f"{url.split(':', 1)[0]}: read back {note!r}")
        async with engine.begin() as connection:
            await connection.execute(sa.text(f"DROP TABLE {table}"))
    finally:
        await engine.dispose()
    print(f"async unit of work through {url.split(':', 1)[0]}: ok")


def check_feature(feature: str, *, present: bool, cell_urls: dict[str, str]) -> None:
    """Check that what an extra is for works with it, and names the extra without it."""
    if feature == "testing":
        check_testing(present=present)
    elif feature == "prometheus":
        check_prometheus(present=present)
    elif feature == "demo" and present:
        check_demo(cell_urls["psycopg2"])
    elif feature == "bench" and present:
        check_bench()


def check_testing(*, present: bool) -> None:
    """Import dropsafe.testing's public names (the cell's pytest suite runs its fixtures)."""
    import dropsafe.testing

    names = [getattr(dropsafe.testing, name) for name in dropsafe.testing.__all__]
    print(f"dropsafe.testing: {len(names)} public names, ok")
    if present and importlib.util.find_spec("pytest_timeout") is None:
        raise AssertionError("dropsafe[testing] must bring pytest-timeout")


def check_prometheus(*, present: bool) -> None:
    """Put PrometheusHook in a policy, or see it name its extra when prometheus is absent."""
    import dropsafe
    from dropsafe.events import PrometheusHook

    if present:
        from prometheus_client import CollectorRegistry

        dropsafe.Policy(hooks=(PrometheusHook(CollectorRegistry()),))
        print("PrometheusHook: ok")
        return
    if importlib.util.find_spec("prometheus_client") is not None:
        return  # another extra brought it
    try:
        PrometheusHook()
    except dropsafe.ConfigurationError as exc:
        if "dropsafe[prometheus]" not in str(exc):
            raise
        print("PrometheusHook without its extra: ConfigurationError, ok")
    else:
        raise AssertionError("PrometheusHook() without prometheus-client did not raise")


def check_bench() -> None:
    """Import the benchmark and psycopg_pool; draw a report plot; start ``dropsafe bench``."""
    import psycopg_pool  # noqa: F401 - the bench compares against it

    from dropsafe._bench._report import bar_plot

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plot.png"
        bar_plot(["a"], {"x": [1.0]}, title="t", ylabel="s", path=path)
        check_png(path)
    check_cli("bench")
    print("bench: modules import, a report plot is drawn, ok")


def check_demo(url: str) -> None:
    """Post to the blog (Flask) through dropsafe; serve it (waitress); draw (rich, matplotlib)."""
    import matplotlib as mpl
    from rich.console import Console
    from rich.table import Table

    from dropsafe._demo import scenario  # noqa: F401 - the demo's driver imports
    from dropsafe._demo.blog import create_app, serve

    client = create_app(url).test_client()
    created = client.post("/api/posts", json={"title": "installed", "text": "from the wheel"})
    if created.status_code != HTTPStatus.CREATED:
        raise AssertionError(f"the blog refused a post: {created.status_code} {created.text}")
    shown = client.get(f"/api/posts/{created.get_json()['id']}")
    if shown.status_code != HTTPStatus.OK or shown.get_json()["title"] != "installed":
        raise AssertionError(f"the blog lost its post: {shown.status_code} {shown.text}")
    serve(create_app(url), port=0).close()
    table = Table("requests ok")
    table.add_row("1")
    Console(file=io.StringIO()).print(table)
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plot.png"
        figure, axes = plt.subplots()
        axes.plot([0, 1], [0, 1])
        figure.savefig(path)
        plt.close(figure)
        check_png(path)
    check_cli("demo")
    print("demo: the blog answers, waitress, rich and matplotlib work, ok")


def check_png(path: Path) -> None:
    """Check that a PNG was written (matplotlib's compiled parts load with the installed numpy)."""
    if not path.read_bytes().startswith(b"\x89PNG"):
        raise AssertionError(f"{path.name} is not a PNG")


def check_cli(command: str | None = None) -> None:
    """Start the ``dropsafe`` console script the wheel installs (``--help`` only)."""
    script = Path(sys.prefix) / "bin" / "dropsafe"
    argv = [str(script), *([command] if command else []), "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0 or "usage:" not in result.stdout:
        raise AssertionError(f"{' '.join(argv[1:])} failed:\n{result.stdout}\n{result.stderr}")


if __name__ == "__main__":
    sys.exit(main())
