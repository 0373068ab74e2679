"""Keep passwords out of every message: URLs are rendered with the password masked."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL

__all__ = ["redact_url"]

_MASK = "***"
# scheme://user:password@host — also in text that does not parse as a URL.
_USERINFO_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]*(?=@)")
_PASSWORD_PARAM = re.compile(r"(?P<head>\bpassword\s*=\s*)('[^']*'|[^\s&]+)", re.IGNORECASE)


def redact_url(url: str | URL) -> str:
    """Return ``url`` as text with any password replaced by ``***``.

    Works on text that is not a valid URL too, so that a malformed URL can be named in an
    error message without leaking what it carries.
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    text = _USERINFO_PASSWORD.sub(lambda m: m.group("head") + _MASK, url)
    return _PASSWORD_PARAM.sub(lambda m: m.group("head") + _MASK, text)


def redact_text(text: str) -> str:
    """Mask passwords in any text that may quote a URL or a connection string."""
    return redact_url(text)
