"""dropsafe installed as a sync user installs it: the wheel, psycopg2, SQLAlchemy 2.1, no greenlet.

The two failures of that install, as regression tests: ``import dropsafe`` raised ImportError
(SQLAlchemy's asyncio module needs greenlet, which SQLAlchemy 2.1 no longer installs), and every
pytest run of the user's own project failed at start-up, since pytest loads dropsafe's plugin.
One venv for the module, made by uv from the built wheel (never an editable install); the whole
matrix of extras is scripts/install_matrix.py.
"""

from __future__ import annotations

import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
from wheel_venv import UV, install_matrix, python_in, run, wheel_venv

if TYPE_CHECKING:
    from pathlib import Path

    from dropsafe.testing import PostgresServer


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UV is None, reason="uv is not installed (pip install -e '.[dev]')"),
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel, psycopg2, SQLAlchemy 2.1 and pytest, and no greenlet."""
    venv = wheel_venv(tmp_path_factory.mktemp("no-greenlet"))
    # The conditions of the bug, or this module proves nothing.
    probe = run(
        [str(venv / "bin" / "python"), "-c", "import sqlalchemy; print(sqlalchemy.__version__)"]
    )
    assert probe.stdout.startswith("2.1."), probe
    for absent in ("greenlet", "pytest_timeout"):
        assert run([str(venv / "bin" / "python"), "-c", f"import {absent}"]).returncode != 0
    return venv


def test_import_dropsafe_without_greenlet(venv):
    result = python_in(
        venv,
        """
        import sys
        import dropsafe
        assert "sqlalchemy.ext.asyncio" not in sys.modules
        print(dropsafe.__file__)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(venv)), "dropsafe came from the source tree, not the wheel"


def test_a_sync_unit_of_work_runs_without_greenlet(venv, shared_server: PostgresServer):
    result = python_in(
        venv,
        f"""
        import sqlalchemy as sa
        from sqlalchemy.orm import sessionmaker
        import dropsafe

        engine = dropsafe.create_engine({shared_server.url("psycopg2")!r})
        Session = sessionmaker(engine)
        with engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE IF EXISTS no_greenlet"))
            connection.execute(sa.text("CREATE TABLE no_greenlet (id serial PRIMARY KEY)"))
        new_id = dropsafe.run_transaction(
            Session,
            lambda s: s.execute(
                sa.text("INSERT INTO no_greenlet DEFAULT VALUES RETURNING id")
            ).scalar_one(),
        )
        print(dropsafe.run_transaction(
            Session, lambda s: s.execute(sa.text("SELECT count(*) FROM no_greenlet")).scalar_one()
        ), new_id)
        engine.dispose()
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]


@pytest.mark.parametrize(
    "call",
    [
        "dropsafe.create_async_engine('postgresql+asyncpg://app@db.example/app')",
        "asyncio.run(dropsafe.run_transaction_async(object(), lambda session: None))",
    ],
)
def test_async_entry_points_say_what_to_install(venv, call):
    result = python_in(
        venv,
        f"""
        import asyncio
        import dropsafe
        try:
            {call}
        except dropsafe.ConfigurationError as exc:
            print(exc)
        else:
            raise SystemExit("no ConfigurationError")
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pip install 'dropsafe[asyncpg]'" in result.stdout


def test_async_entry_points_refuse_every_time_not_just_the_first(venv):
    result = python_in(
        venv,
        """
        import asyncio
        import dropsafe
        for call in range(2):
            try:
                dropsafe.create_async_engine("postgresql+asyncpg://app@db.example/app")
            except dropsafe.ConfigurationError as exc:
                assert "pip install" in str(exc), exc
            else:
                raise SystemExit(f"call {call + 1}: no ConfigurationError")
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr


USER_TESTS = """\
import pytest


def test_the_app_works():
    assert sum([1, 2]) == 3


def test_dropsafe_plugin_was_loaded(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("dropsafe")


@pytest.mark.dropsafe_fault
def test_marked_fault_without_pytest_timeout(request):
    # The plugin must not add pytest-timeout's marker when pytest-timeout is not there.
    assert request.node.get_closest_marker("timeout") is None
"""


def test_a_users_pytest_run_is_not_broken_by_the_plugin(venv, tmp_path):
    # The matrix's user project: strict pytest options, warnings are errors.
    (tmp_path / "pyproject.toml").write_text(install_matrix().USER_PYPROJECT)
    (tmp_path / "test_app.py").write_text(USER_TESTS)
    result = run([str(venv / "bin" / "python"), "-m", "pytest", "-q"], cwd=tmp_path, venv=venv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_loading_the_plugin_imports_no_server_proxy_or_asyncio():
    # In this project's venv, where everything (greenlet too) is installed: what the plugin's
    # load adds to what `import dropsafe` already costs.
    code = """
        import sys
        import pytest
        import dropsafe
        before = set(sys.modules)
        import dropsafe.testing.pytest_plugin
        added = sorted(set(sys.modules) - before)
        assert added == ["dropsafe.testing", "dropsafe.testing.pytest_plugin"], added
        assert "sqlalchemy.ext.asyncio" not in sys.modules
    """
    result = run([sys.executable, "-c", textwrap.dedent(code)])
    assert result.returncode == 0, result.stderr
