"""What the commands share about their arguments: database URLs and output folders."""

from __future__ import annotations

import argparse
import tempfile
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dropsafe._errors import ConfigurationError
from dropsafe._redaction import redact_url

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["database_url", "output_folder"]


def database_url(text: str) -> str:
    """Take a database URL from the command line; refuse it at once when its password is split.

    An ``@`` (or a ``/`` in the user's name) left unencoded makes every parser, SQLAlchemy's
    and libpq's, read part of the password as the host or the database: the command would then
    look up a piece of the password in DNS and name it in its errors. It is refused before any
    connection, naming the URL masked and the fix. The type of every URL argument, so that the
    tests find every command that takes one.
    """
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        return text  # malformed: the command says so, in its own words
    if "@" in (url.host or "") or "@" in (url.database or ""):
        message = (
            f"the user or password in {redact_url(text)} holds an unencoded '@' or '/': "
            "percent-encode them ('@' as %40, '/' as %2F, ':' as %3A, '%' as %25)"
        )
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
