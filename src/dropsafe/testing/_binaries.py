"""Find PostgreSQL server binaries: on PATH, via pg_config, in Debian's folders, or in pgserver."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dropsafe._errors import ConfigurationError

__all__ = ["PostgresBinaries", "find_postgres_binaries"]

_REQUIRED = ("postgres", "initdb", "psql", "pg_basebackup")
_INSTALL_HINT = (
    "install PostgreSQL's server binaries: on Debian/Ubuntu `apt-get install postgresql`, "
    "or the embedded build with `pip install 'dropsafe[embedded]'` (no TLS); "
    "or point DROPSAFE_PG_BINDIR at a folder holding postgres and initdb"
)


@dataclass(frozen=True)
class PostgresBinaries:
    """One PostgreSQL installation: its bin folder, major version, and whether it speaks TLS."""

    bin_dir: Path
    major_version: int
    tls: bool
    source: str

    def tool(self, name: str) -> str:
        """Return the full path of one of the installation's programs."""
        return str(self.bin_dir / name)


def find_postgres_binaries() -> PostgresBinaries:
    """Return the first complete installation found; raise `ConfigurationError` naming the fix.

    Order: ``DROPSAFE_PG_BINDIR``, PATH, ``pg_config --bindir``, /usr/lib/postgresql/*/bin
    (newest first), then the ``pgserver`` wheel. ``DROPSAFE_PG_BINDIR`` is a demand, not a
    hint: a folder that is missing or lacks a program is an error, never silently passed over
    for another installation (whose version or TLS support the user did not choose).
    """
    if env_dir := os.environ.get("DROPSAFE_PG_BINDIR"):
        _check_chosen_dir(Path(env_dir))
    for source, bin_dir in _candidates():
        if bin_dir is not None and all((bin_dir / tool).is_file() for tool in _REQUIRED):
            return PostgresBinaries(
                bin_dir=bin_dir,
                major_version=_major_version(bin_dir),
                tls=_built_with_openssl(bin_dir),
                source=source,
            )
    raise ConfigurationError(f"no PostgreSQL server binaries found; {_INSTALL_HINT}")


def _candidates() -> list[tuple[str, Path | None]]:
    found: list[tuple[str, Path | None]] = []
    if env_dir := os.environ.get("DROPSAFE_PG_BINDIR"):
        found.append(("DROPSAFE_PG_BINDIR", Path(env_dir)))
    if on_path := shutil.which("postgres"):
        found.append(("PATH", Path(on_path).resolve().parent))
    found.append(("pg_config", _pg_config_bindir()))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    found.extend(("/usr/lib/postgresql", path) for path in debian)
    found.append(("pgserver wheel", _pgserver_bindir()))
    return found


def _check_chosen_dir(bin_dir: Path) -> None:
    if not bin_dir.is_dir():
        raise ConfigurationError(
            f"DROPSAFE_PG_BINDIR is {str(bin_dir)!r}, which is not a folder; "
            "point it at the bin folder of a PostgreSQL installation, or unset it"
        )
    missing = [
        tool
        for tool in _REQUIRED
        if not ((bin_dir / tool).is_file() and os.access(bin_dir / tool, os.X_OK))
    ]
    if missing:
        raise ConfigurationError(
            f"DROPSAFE_PG_BINDIR is {str(bin_dir)!r}, which lacks the programs "
            f"{', '.join(missing)} (needed: {', '.join(_REQUIRED)})"
        )


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _pgserver_bindir() -> Path | None:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _major_version(bin_dir: Path) -> int:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if match is None:
        raise ConfigurationError(f"cannot read the version of {bin_dir / 'postgres'}: {out!r}")
    return int(match.group(1))


def _built_with_openssl(bin_dir: Path) -> bool:
    pg_config = bin_dir / "pg_config"
    if not pg_config.is_file():
        # Distribution builds without pg_config beside the server are built with OpenSSL.
        return True
    try:
        configure = subprocess.run(
            [str(pg_config), "--configure"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return "openssl" in configure
