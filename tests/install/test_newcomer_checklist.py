"""A newcomer's first hour (issue 30), from the wheel installed with one extra, as a user has it.

One venv for the module, made by uv from the built wheel with ``[psycopg2]`` only, SQLAlchemy
2.1 (whose default driver for ``postgresql://`` is psycopg 3, not installed here) and pytest.
Each test is one item of the issue's checklist, checked the way the newcomer met it.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import pytest
from wheel_venv import THIS_RUN, UV, python_in, run, wheel_venv

if TYPE_CHECKING:
    from pathlib import Path

SECRET = "Newcomer-Needle-9"  # noqa: S105 - the needle the tests search for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UV is None, reason="uv is not installed (pip install -e '.[dev]')"),
]


# A newcomer's shell has no dropsafe settings of this test run either.
USER_SHELL = (*THIS_RUN, "DROPSAFE_")


def _run(argv, **kwargs):
    return run(argv, drop=USER_SHELL, **kwargs)


def _python(venv: Path, code: str, **extra: str):
    return python_in(venv, code, drop=USER_SHELL, **extra)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    venv = wheel_venv(tmp_path_factory.mktemp("newcomer"), drop=USER_SHELL)
    # The conditions of the issue: only psycopg2, on a SQLAlchemy that defaults to psycopg 3.
    assert _python(venv, "import psycopg").returncode != 0
    return venv


def test_postgres_and_bare_urls_use_the_driver_installed_and_say_so_once(venv):
    result = _python(
        venv,
        f"""
        import logging, sqlalchemy
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        import dropsafe
        for url in ("postgres://app:{SECRET}@127.0.0.1:1/app",
                    "postgres://app:{SECRET}@127.0.0.1:1/app",
                    "postgresql://app:{SECRET}@127.0.0.1:1/app",
                    "postgres://app:{SECRET}@127.0.0.1:1/app?plugin=dropsafe"):
            make = sqlalchemy.create_engine if "plugin" in url else dropsafe.create_engine
            engine = make(url)
            print(engine.dialect.driver, dropsafe.policy_of(engine) is not None)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["psycopg2 True"] * 4
    log = result.stderr
    assert log.count("reads postgres:// as postgresql+psycopg2://") == 1
    assert log.count("reads postgresql:// as postgresql+psycopg2://") == 1
    assert log.count("hardened the engine for postgresql+psycopg2://app:***@") == 4
    assert SECRET not in result.stdout + log


def test_one_version_and_the_project_urls(venv):
    result = _python(
        venv,
        """
        import importlib.metadata as metadata, dropsafe
        print(dropsafe.__version__ == metadata.version("dropsafe"))
        urls = metadata.metadata("dropsafe").get_all("Project-URL")
        print(sorted(url.split(",")[0] for url in urls))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "True",
        "['Changelog', 'Documentation', 'Issues', 'Source']",
    ]
    version = _run([str(venv / "bin" / "dropsafe"), "--version"])
    assert version.returncode == 0
    assert version.stdout.startswith("dropsafe ")


@pytest.mark.parametrize(
    ("url", "code"),
    [
        (f"postgres://app:{SECRET}@127.0.0.1:1/app", 1),
        (f"postgresql://app:{SECRET}@127.0.0.1:1/app?sslmode=bogus", 2),
        (f"postgresql+psycopg2://app:p@{SECRET}:w/rd@127.0.0.1/app", 2),
    ],
)
def test_doctor_says_one_line(venv, url, code):
    # A short connect_wait: "cannot reach" is the same line after 0.5 s as after the default 10.
    result = _run([str(venv / "bin" / "dropsafe"), "doctor", url], DROPSAFE_CONNECT_WAIT="0.5")
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_a_users_suite_keeps_its_markers_and_its_test_mode_import(venv, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = ["--strict-markers", "-p", "no:cacheprovider"]\n'
        'filterwarnings = ["error"]\nmarkers = ["fault: the user\'s own"]\n'
    )
    (tmp_path / "test_app.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from dropsafe import test_mode

            @pytest.mark.fault
            def test_mine(request):
                assert request.node.get_closest_marker("timeout") is None
                with test_mode():
                    pass
            """
        )
    )
    result = _run([str(venv / "bin" / "python"), "-m", "pytest", "-q"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_settings_from_the_environment(venv):
    code = """
        import dropsafe
        print(dropsafe.policy_of(dropsafe.create_engine("postgres://a@127.0.0.1:1/d")).unit.deadline)
        """
    assert _python(venv, code, DROPSAFE_DEADLINE="9").stdout.strip() == "9.0"
    refused = _python(venv, code, DROPSAFE_DEADLINE="ten")
    assert refused.returncode == 1
    assert "environment variable DROPSAFE_DEADLINE must be a number" in refused.stderr
