"""Keep passwords out of every message: URLs and connection strings are shown masked."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL

__all__ = ["describe_error", "redact_text", "redact_url"]

_MASK = "***"
# In free text: scheme://user:password@ (the user may hold an @; the password runs to the last @).
_USERINFO_PASSWORD = re.compile(r"(?P<head>://[^:/\s]*:)[^\s/]*(?=@)")
# key=value forms: libpq DSNs, URL query strings, connect_args rendered as text.
_PASSWORD_PARAM = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd)['\"]?\s*[=:]\s*['\"]?)('[^']*'|\"[^\"]*\"|[^\s&'\",}]+)",
    re.IGNORECASE,
)


def redact_url(url: str | URL) -> str:
    """Return ``url`` as text with any password replaced by ``***``.

    Works on text that is not a valid URL too, so that a malformed URL can be named in an
    error message: everything between the user's name and the last ``@`` is masked.
    """
    if isinstance(url, URL):
        return _mask_params(url.render_as_string(hide_password=True))
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
    """Mask passwords in free text that may quote URLs or connection strings."""
    return _mask_params(_USERINFO_PASSWORD.sub(lambda m: m.group("head") + _MASK, text))


def describe_error(error: BaseException) -> str:
    """Name an error in one masked string (``Type: message``), for events and messages."""
    return redact_text(f"{type(error).__name__}: {error}")


def _mask_params(text: str) -> str:
    return _PASSWORD_PARAM.sub(lambda m: m.group("head") + _MASK, text)
