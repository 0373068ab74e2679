"""What the commands share: exit codes, missing extras, database URLs and output folders."""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from typing import TYPE_CHECKING

from dropsafe._errors import ConfigurationError, DropsafeError
from dropsafe._redaction import split_credentials

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "EXIT_FOUND_PROBLEM",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandFailed",
    "database_url",
    "output_folder",
    "require_extra",
]

EXIT_OK = 0
EXIT_FOUND_PROBLEM = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandFailed(DropsafeError):
    """The command ran and found a problem; the message is the one line to show (exit 1)."""


def require_extra(extra: str, *modules: str) -> None:
    """Raise `ConfigurationError` naming the pip command when a command's extra is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigurationError(
            f"this command needs the {extra!r} extra ({', '.join(missing)} missing): "
            f"pip install 'dropsafe[{extra}]'"
        )


def database_url(text: str) -> str:
    """Take a database URL from the command line; refuse it at once when its password is split.

    Refused before any connection (see `split_credentials`), as `create_engine` refuses it.
    The type of every URL argument, so that the tests find every command that takes one.
    """
    message = split_credentials(text)
    if message is not None:
        raise argparse.ArgumentTypeError(message)
    return text


def output_folder(path: Path, option: str = "--out") -> Path:
    """Make ``path`` a folder the command can write to, or raise `ConfigurationError` naming it.

    Checked before the work starts, so that a wrong ``--out`` costs a line, not a run.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"{option} {path}: cannot write there ({reason})") from None
    return path
