"""What the install tests share: a user's shell (nothing of this test run's Python or pytest),
and a venv made by uv from the built wheel, never an editable install."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
# What of this test run's environment a user's shell does not have.
THIS_RUN = ("PYTHON", "PYTEST", "VIRTUAL_ENV")


def clean_env(venv: Path | None = None, *, drop=THIS_RUN, **extra: str) -> dict[str, str]:
    """A user's shell, with ``venv`` activated and ``extra`` set; variables starting with one of
    ``drop`` left out."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop)}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def run(argv, *, cwd=None, venv=None, timeout=120, drop=THIS_RUN, **extra):
    """Run ``argv`` in a user's shell (``clean_env``), its output captured as text."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=clean_env(venv, drop=drop, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def python_in(venv: Path, code: str, **kwargs):
    """Run ``code`` (dedented) with the venv's Python, isolated from the user's site."""
    return run([str(venv / "bin" / "python"), "-I", "-c", textwrap.dedent(code)], **kwargs)


def wheel_venv(where: Path, *, drop=THIS_RUN) -> Path:
    """A venv in ``where`` with the built wheel's ``[psycopg2]``, SQLAlchemy 2.1 and pytest."""
    assert UV is not None
    built = run(
        [UV, "build", "--quiet", "--wheel", "--out-dir", str(where / "dist"), str(ROOT)], drop=drop
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (where / "dist").glob("dropsafe-*.whl")
    venv = where / "venv"
    made = run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], drop=drop)
    assert made.returncode == 0, made.stderr
    installed = run(
        [
            *(UV, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python")),
            f"{wheel}[psycopg2]",
            "sqlalchemy>=2.1,<2.2",
            "pytest",  # the user's own test runner, without pytest-timeout
        ],
        timeout=300,
        drop=drop,
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def install_matrix() -> ModuleType:
    """scripts/install_matrix.py (the full matrix of extras), for what these tests share with it."""
    if "install_matrix" not in sys.modules:  # its dataclasses look their module up there
        path = ROOT / "scripts" / "install_matrix.py"
        spec = importlib.util.spec_from_file_location("install_matrix", path)
        assert spec is not None
        assert spec.loader is not None
        sys.modules["install_matrix"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["install_matrix"]
