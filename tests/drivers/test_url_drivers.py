"""``postgres://`` and URLs without a driver: read as the driver that is installed, said once.

Heroku's and many clouds' ``DATABASE_URL`` start with ``postgres://``, an alias SQLAlchemy
dropped; a bare ``postgresql://`` gets SQLAlchemy's default driver (psycopg 3 since 2.1) even
when only psycopg2 is installed. A missing driver is simulated as Python does it
(``sys.modules[name] = None``) in a fresh interpreter.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import dropsafe
import dropsafe._engine.guard
from dropsafe import ConfigurationError
from dropsafe._cli import main
from dropsafe._engine.guard import guard_of, resolve_driver

SECRET = "Heroku-Needle-7"  # noqa: S105 - the needle the tests search for
HEROKU = f"postgres://app:{SECRET}@127.0.0.1:1/app"


def _only(*modules: str):
    return lambda module: module in modules


@pytest.mark.parametrize(
    ("url", "is_async", "installed", "expected"),
    [
        ("postgres://a@h/d", False, ("psycopg2",), "postgresql+psycopg2"),
        ("postgres://a@h/d", False, ("pg8000",), "postgresql+pg8000"),
        ("postgres+psycopg://a@h/d", False, ("psycopg2",), "postgresql+psycopg"),
        ("postgresql://a@h/d", False, ("psycopg2",), "postgresql+psycopg2"),
        ("postgresql://a@h/d", False, ("psycopg2", "pg8000"), "postgresql+psycopg2"),
        ("postgres://a@h/d", True, ("asyncpg", "psycopg2"), "postgresql+asyncpg"),
        ("postgresql://a@h/d", True, ("asyncpg",), "postgresql+asyncpg"),
        ("postgresql+pg8000://a@h/d", False, ("psycopg2",), "postgresql+pg8000"),
        ("mysql://a@h/d", False, (), "mysql"),
    ],
)
def test_the_driver_read_is_the_one_installed(url, is_async, installed, expected):
    read = resolve_driver(make_url(url), is_async=is_async, installed=_only(*installed))
    assert read.drivername == expected


def test_sqlalchemys_own_default_is_left_to_it_when_installed():
    url = make_url("postgresql://a@h/d")
    default = url.get_dialect().driver
    assert resolve_driver(url, is_async=False, installed=_only(default)) is url


@pytest.mark.parametrize("is_async", [False, True])
def test_no_driver_installed_says_in_one_line_what_to_do(is_async):
    with pytest.raises(ConfigurationError, match=r"pip install one of .*write postgresql\+"):
        resolve_driver(make_url(HEROKU), is_async=is_async, installed=_only())
    with pytest.raises(ConfigurationError) as raised:
        resolve_driver(make_url(HEROKU), is_async=is_async, installed=_only())
    assert SECRET not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_create_engine_takes_a_heroku_url_and_says_so_once(caplog):
    getattr(dropsafe._engine.guard, "_SAID", set()).clear()
    with caplog.at_level(logging.INFO, logger="dropsafe"):
        engines = [dropsafe.create_engine(HEROKU) for _ in range(3)]
    assert all(guard_of(engine) is not None for engine in engines)
    assert engines[0].url.get_backend_name() == "postgresql"
    said = [r.getMessage() for r in caplog.records if "reads postgres://" in r.getMessage()]
    assert len(said) == 1
    assert f"as {engines[0].url.drivername}://" in said[0]
    assert SECRET not in caplog.text


def test_create_async_engine_takes_a_heroku_url():
    engine = dropsafe.create_async_engine(HEROKU)
    assert engine.dialect.is_async
    assert guard_of(engine) is not None


@pytest.mark.parametrize("make", ["sync", "async"])
def test_the_url_plugin_takes_a_heroku_url(make):
    url = HEROKU + "?plugin=dropsafe&dropsafe_deadline=5"
    if make == "sync":
        engine = sa.create_engine(url)
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
    guard = guard_of(engine)
    assert guard is not None
    assert guard.policy.unit.deadline == 5
    assert engine.url.get_backend_name() == "postgresql"


def _without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in modules)
    return subprocess.run(
        [sys.executable, "-c", f"import sys\n{hide}{code}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "make",
    [
        "dropsafe.create_engine('postgresql://a:pw@127.0.0.1:1/d')",
        "sqlalchemy.create_engine('postgresql://a:pw@127.0.0.1:1/d?plugin=dropsafe')",
        "dropsafe.create_engine('postgres://a:pw@127.0.0.1:1/d')",
    ],
)
def test_a_bare_url_with_only_psycopg2_installed_uses_psycopg2(make):
    done = _without(
        ("psycopg",),
        f"import sqlalchemy, dropsafe\nengine = {make}\nprint(engine.dialect.driver)\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "psycopg2"


def test_the_cli_takes_a_heroku_url_and_fails_in_one_line(capsys):
    # Nothing listens on port 1: the doctor must say so in one line, not a traceback.
    code = main(["doctor", HEROKU])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "Traceback" not in captured.err
    assert captured.err.strip().startswith("dropsafe doctor: cannot reach 127.0.0.1:1")
    assert len(captured.err.strip().splitlines()) == 1
    assert SECRET not in captured.out + captured.err


def test_a_url_that_names_its_driver_is_read_silently(caplog):
    with caplog.at_level(logging.INFO, logger="dropsafe"):
        engine = dropsafe.create_engine("postgresql+pg8000://a:pw@127.0.0.1:1/d")
    assert engine.dialect.driver == "pg8000"
    assert "reads" not in caplog.text


@pytest.mark.parametrize(
    "make",
    [
        dropsafe.create_engine,
        lambda url: dropsafe.harden(sa.create_engine(url)),
        lambda url: sa.create_engine(url + "?plugin=dropsafe&dropsafe_deadline=7"),
        lambda url: dropsafe.create_async_engine(url.replace("psycopg2", "asyncpg")),
    ],
    ids=["create_engine", "harden", "url_plugin", "create_async_engine"],
)
def test_a_hardened_engine_says_so_once_and_can_be_asked(caplog, make):
    url = f"postgresql+psycopg2://app:{SECRET}@127.0.0.1:1/app"
    with caplog.at_level(logging.INFO, logger="dropsafe"):
        engine = make(url)
        dropsafe.harden(engine)  # idempotent: not said twice
    said = [r for r in caplog.records if "hardened the engine" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.INFO
    line = said[0].getMessage()
    assert SECRET not in caplog.text
    assert "app:***@127.0.0.1:1/app" in line
    assert f"(driver {engine.dialect.driver})" in line
    assert "tcp_user_timeout=4" in line
    policy = dropsafe.policy_of(engine)
    assert policy is not None
    assert f"deadline={policy.unit.deadline:g}" in line


def test_an_engine_dropsafe_does_not_guard_has_no_policy():
    assert dropsafe.policy_of(sa.create_engine("postgresql+psycopg2://a@127.0.0.1:1/d")) is None
