"""Keep passwords out of every message: URLs and connection strings are shown masked.

Two layers. The rules (`redact_url`, `redact_text`) find a password by the shape of the text
around it, and serve every message the library writes. A `SecretMask` knows the secrets
themselves and hides any piece of them wherever it lands: a URL typed with an unencoded ``@`` in
its password is split by parsers elsewhere than its author meant (``u:Hunt@er2Secret@db`` has
the host ``er2Secret@db`` for SQLAlchemy and libpq), and the rest of the password then turns up
as a host name in errors that no rule can recognise. The command line masks all it prints,
and every log record, with the secrets of the URLs it was given (`masked_output`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
from typing import TYPE_CHECKING, TextIO, cast
from urllib.parse import quote, unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, StatementError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "SecretMask",
    "describe_error",
    "masked_output",
    "redact_text",
    "redact_url",
    "split_credentials",
    "url_password",
]

_MASK = "***"
# In free text: scheme://user:password@ (the user or the password may hold an @, a / or a :;
# the password runs to the last @ before the next whitespace). Found by hand, not by a regex:
# ``://[^:\s]*:\S*(?=@)`` backtracks over each word once per ``://`` in it, quadratic time
# (80 KB of ``://a:`` took 7 s), and the rule runs on every event's error text.
_WHITESPACE = re.compile(r"(\s+)")
# key=value forms: libpq DSNs, URL query strings, connect_args rendered as text.
_PASSWORD_PARAM = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd)['\"]?\s*[=:]\s*['\"]?)('[^']*'|\"[^\"]*\"|[^\s&'\",}]+)",
    re.IGNORECASE,
)
# SQL: CREATE/ALTER ROLE ... PASSWORD 'secret' (quotes doubled inside; E'' strings too), as
# psql's errors, a server's log and SQLAlchemy's messages quote it.
_SQL_PASSWORD = re.compile(r"(?P<head>\bPASSWORD\s+E?)'(?:[^']|'')*'?", re.IGNORECASE)
# What SQLAlchemy appends to a message, when it is all on one line: cut there, then the spaces
# before it stripped (a leading ``\s*`` in the pattern would make a search quadratic).
_SQLALCHEMY_TAIL = re.compile(r"\[(?:SQL|parameters|SQL parameters hidden)\b")
# The shortest piece of a secret that `SecretMask` hides; shorter ones are too common in
# ordinary text (a secret shorter than this is masked only where a rule finds it).
_MIN_PIECE = 4


def redact_url(url: str | URL) -> str:
    """Return ``url`` as text with any password replaced by ``***``.

    Works on text that is not a valid URL too, so that a malformed URL can be named in an
    error message: everything between the user's name and the last ``@`` is masked.
    """
    if isinstance(url, URL):
        misread = "@" in (url.host or "") or "@" in (url.database or "")
        url = url.render_as_string(hide_password=True)
        if misread:
            # An unencoded @ or / in the password put the rest of it in the host or the
            # database: as the author wrote it, the last-@ rule below masks all of it.
            url = unquote(url)
    head, separator, rest = url.partition("://")
    if not separator:
        head, rest = "", url
    at = rest.rfind("@")
    if at != -1:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:{_MASK}{rest[at:]}"
    return _mask_params(head + separator + rest)


def redact_text(text: str) -> str:
    """Mask passwords in free text that may quote URLs or connection strings.

    Linear in the length of ``text`` (1 MB of adversarial text in well under a second).
    """
    return _mask_params("".join(_mask_userinfo(word) for word in _WHITESPACE.split(text)))


def _mask_userinfo(word: str) -> str:
    """Mask ``word``'s password after its first ``://user:``, up to its last ``@``.

    A word holds at most one: the mask runs to the word's last ``@``, past any later ``://``.
    Any later ``://`` has its first ``:`` after the first one's, so if the first finds no
    ``@`` after its colon, none does.
    """
    start = word.find("://")
    if start == -1:
        return word
    colon = word.find(":", start + 3)
    at = word.rfind("@")
    if colon == -1 or at <= colon:
        return word
    return word[: colon + 1] + _MASK + word[at:]


def describe_error(error: BaseException) -> str:
    """Name an error in one masked string (``Type: message``), for events and messages.

    Only the primary message, as the driver gives it: SQLAlchemy's ``[SQL: ...]`` and
    ``[parameters: ...]``, and the server's DETAIL, HINT and CONTEXT, which quote the row
    values a constraint or a conflict was about, never reach an event or a log line, whatever
    ``hide_parameters`` says (plain SQLAlchemy logs parameters only with ``echo``)::

        OperationalError: (psycopg2.errors.SerializationFailure) could not serialize access
    """
    inner = error.orig if isinstance(error, StatementError) else None
    if isinstance(inner, BaseException):
        kind = type(inner)
        message = f"({kind.__module__}.{kind.__qualname__}) {_primary_message(inner)}"
    else:
        message = _primary_message(error)
    return redact_text(f"{type(error).__name__}: {message}")


def _primary_message(error: BaseException) -> str:
    # pg8000 gives the server's fields as a dict (M: the message; D: DETAIL, with row data).
    fields = error.args[0] if len(error.args) == 1 else None
    if isinstance(fields, dict) and isinstance(fields.get("M"), str):
        return str(fields["M"])
    # libpq, psycopg and SQLAlchemy put DETAIL, HINT, CONTEXT, SQL and parameters on the lines
    # after the first, the last two also after the first "[" at the end of the first line.
    first = str(error).split("\n", 1)[0]
    tail = _SQLALCHEMY_TAIL.search(first)
    return (first[: tail.start()] if tail else first).rstrip()


def url_password(text: str) -> str | None:
    """Return the password in a URL's text as its author wrote it, or None.

    The author's password runs from the ``:`` after the user's name to the last ``@``, the
    widest reading: the one that hides the most when it is used as a secret.
    """
    _, separator, rest = text.partition("://")
    at = rest.rfind("@")
    if not separator or at == -1:
        return None
    _, colon, password = rest[:at].partition(":")
    return password if colon and password else None


class SecretMask:
    """Hide known secrets, and every piece of 4 characters or more of them, in text.

    Example::

        mask = SecretMask()
        mask.add_url("postgresql://u:Hunt@er2Secret@db/app")
        mask('could not translate host name "er2Secret@db"')  # '... name "***@db"'
    """

    def __init__(self) -> None:
        self._pieces: set[str] = set()

    def add(self, secret: str) -> None:
        """Hide ``secret`` from now on, as written, percent-decoded and percent-encoded."""
        for form in {secret, unquote(secret), quote(unquote(secret), safe="")}:
            self._pieces.update(
                form[start : start + _MIN_PIECE] for start in range(len(form) - _MIN_PIECE + 1)
            )

    def add_url(self, text: str) -> None:
        """Hide the password of the URL ``text``, if it has one."""
        password = url_password(text)
        if password:
            self.add(password)

    def __call__(self, text: str) -> str:
        """Return ``text`` with every run of characters covered by a secret's piece masked."""
        if not self._pieces or len(text) < _MIN_PIECE:
            return text
        # A longer piece of a secret is a chain of overlapping 4-character pieces, so marking
        # every 4-character piece found marks every longer one whole.
        hidden = [False] * len(text)
        for start in range(len(text) - _MIN_PIECE + 1):
            if text[start : start + _MIN_PIECE] in self._pieces:
                hidden[start : start + _MIN_PIECE] = [True] * _MIN_PIECE
        if not any(hidden):
            return text
        parts, position = [], 0
        for is_hidden, run in itertools.groupby(hidden):
            length = len(list(run))
            parts.append(_MASK if is_hidden else text[position : position + length])
            position += length
        return "".join(parts)


class _MaskedStream:
    """A text stream that masks what is written to it; everything else is the wrapped one's."""

    def __init__(self, stream: TextIO, mask: SecretMask) -> None:
        self._stream = stream
        self._mask = mask

    def write(self, text: str) -> int:
        self._stream.write(self._mask(text))
        return len(text)

    def __getattr__(self, name: str) -> object:  # whatever the stream has
        return getattr(self._stream, name)


@contextlib.contextmanager
def masked_output(mask: SecretMask) -> Iterator[None]:
    """Mask stdout, stderr and every log record made while inside, with ``mask``.

    Each write is masked whole, so a secret split across two writes is not recognised (print
    writes its text in one). Not for use by several threads that want different masks.
    """
    stdout, stderr = sys.stdout, sys.stderr
    make_record = logging.getLogRecordFactory()

    def masked_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        with contextlib.suppress(Exception):  # a record that cannot format keeps its own fate
            record.msg, record.args = mask(record.getMessage()), None
        if record.exc_info:
            # Handlers format the traceback later, from exc_text when it is set: set it masked.
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return record

    sys.stdout = cast("TextIO", _MaskedStream(stdout, mask))
    sys.stderr = cast("TextIO", _MaskedStream(stderr, mask))
    logging.setLogRecordFactory(masked_record)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make_record)
        sys.stdout, sys.stderr = stdout, stderr


def _mask_params(text: str) -> str:
    text = _SQL_PASSWORD.sub(lambda m: m.group("head") + f"'{_MASK}'", text)
    return _PASSWORD_PARAM.sub(lambda m: m.group("head") + _MASK, text)


def split_credentials(url: str | URL) -> str | None:
    """Say why ``url``'s user or password is split across its host or database, if it is.

    An ``@`` (or a ``/`` in the user's name) left unencoded makes every parser, SQLAlchemy's
    and libpq's, read part of the password as the host or the database: a connect would look
    up a piece of the password in DNS and name it in its errors. The message names the URL
    masked and the fix; None when the URL is fine (or not a URL at all).
    """
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return None
    if "@" not in (parsed.host or "") and "@" not in (parsed.database or ""):
        return None
    return (
        f"the user or password in {redact_url(url)} holds an unencoded '@' or '/': "
        "percent-encode them ('@' as %40, '/' as %2F, ':' as %3A, '%' as %25)"
    )
