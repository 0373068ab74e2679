"""pytest plugin for SQLAlchemy's own test suite: harden every PostgreSQL engine it creates.

Loaded by ``scripts/sqlalchemy_compat.py`` with ``-p sqlalchemy_compat_plugin`` when pytest runs
inside SQLAlchemy's unpacked source release. It imports nothing at load time: SQLAlchemy's test
bootstrap must import SQLAlchemy itself first (from the release's ``lib/``), so the hook waits
until the suite's own ``pytest_sessionstart`` has configured its engines.

With ``DROPSAFE_COMPAT_HARDEN=1`` every engine made by ``create_engine`` from then on (and the
suite's configured engines made before) is passed to ``dropsafe.harden``; with ``0`` nothing is
changed, so that the plain run goes through exactly the same plugin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

HARDEN = os.environ.get("DROPSAFE_COMPAT_HARDEN") == "1"
_hardened = 0


def _harden(engine: Any) -> None:  # noqa: ANN401 - a SQLAlchemy Engine of the suite's own lib
    global _hardened  # noqa: PLW0603 - one counter for the session's summary line
    import dropsafe  # only after SQLAlchemy's bootstrap
    from dropsafe._drivers import is_supported

    dialect = engine.dialect
    if dialect.name == "postgresql" and is_supported(str(dialect.driver)):
        dropsafe.harden(engine)
        _hardened += 1


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Harden every engine from now on, once SQLAlchemy's plugin has set up its own."""
    del session
    if not HARDEN:
        return
    from sqlalchemy.engine.default import DefaultDialect
    from sqlalchemy.testing import config

    original = DefaultDialect.engine_created.__func__  # type: ignore[attr-defined]

    def engine_created(cls: type[DefaultDialect], engine: Any) -> None:  # noqa: ANN401
        original(cls, engine)
        _harden(engine)

    # create_engine calls dialect_cls.engine_created(engine) for every engine it makes.
    DefaultDialect.engine_created = classmethod(engine_created)  # type: ignore[method-assign,assignment]
    for cfg in config.Config.all_configs():  # type: ignore[no-untyped-call]
        _harden(cfg.db)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``DROPSAFE_COMPAT_ONLY`` (a file of JUnit ids), keep only those tests.

    Runs last: SQLAlchemy's plugin expands ``__backend__`` classes per database during
    collection, so their ids exist only now and cannot be named on the command line.
    """
    only_file = os.environ.get("DROPSAFE_COMPAT_ONLY")
    if not only_file:
        return
    wanted = set(Path(only_file).read_text().split("\n")) - {""}
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (keep if _junit_id(item.nodeid) in wanted else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


def _junit_id(nodeid: str) -> str:
    """``test/engine/test_pool.py::Cls::test_x`` as JUnit XML names it: classname::name."""
    names = nodeid.split("::")
    names[0] = names[0].removesuffix(".py").replace("/", ".")
    return ".".join(names[:-1]) + "::" + names[-1]


def pytest_terminal_summary(terminalreporter: Any) -> None:  # noqa: ANN401
    """Say how many engines were hardened: a hardened run that hardened nothing proves nothing."""
    mode = "hardened" if HARDEN else "plain"
    terminalreporter.write_line(f"dropsafe compat: {mode} run, {_hardened} engine(s) hardened")
