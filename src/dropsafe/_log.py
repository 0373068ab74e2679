"""dropsafe's own log lines, written so that a log handler that raises changes no outcome.

A handler's ``emit`` that raises (a log shipper that is down) propagates out of
``Logger.log``; dropsafe logs inside SQLAlchemy's events and in the middle of a retry or a
commit resolution, so such an error would replace the database's error or the unit's result.
Every failure of an observer (a hook, a handler) is counted and reported once per kind on
stderr, the one channel left that does not go through the broken observer, then swallowed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping
    from logging import _ExcInfoType

    _Adapter = logging.LoggerAdapter[logging.Logger]  # generic in typeshed, not before 3.11
else:
    _Adapter = logging.LoggerAdapter

__all__ = ["SafeLogger", "observer_failed", "observer_failures"]

_reported: set[tuple[str, str]] = set()
_failures = [0]


def observer_failures() -> int:
    """How many times a hook or a log handler raised in this process (for tests, benchmarks)."""
    return _failures[0]


def observer_failed(what: str, error: BaseException) -> None:
    """Count a hook's or a handler's failure; the first of each kind goes to stderr.

    Only the type of the error is written: its text could hold anything the observer saw.
    """
    _failures[0] += 1
    key = (what, f"{type(error).__module__}.{type(error).__qualname__}")
    if key in _reported:
        return
    _reported.add(key)
    with contextlib.suppress(Exception):  # a closed or broken stderr: nothing left to tell
        sys.stderr.write(
            f"dropsafe: {what} raised {key[1]}; ignored, and not reported again "
            "(no outcome of dropsafe depends on its observers)\n"
        )


def _with_traceback(
    msg: object, args: tuple[object, ...], exc_info: _ExcInfoType
) -> tuple[str, tuple[object, ...]]:
    """Return ``msg`` and ``args`` extended with the traceback of ``exc_info``, passwords masked."""
    from dropsafe._redaction import redact_text

    if isinstance(exc_info, BaseException):
        error: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        error = exc_info[1]
    else:
        error = sys.exc_info()[1]
    text = "" if error is None else "".join(traceback.format_exception(error))
    if not args:  # the message is not a format then: its own % signs stay as they are
        msg = str(msg).replace("%", "%%")
    return f"{msg}\n%s", (*args, redact_text(text.rstrip("\n")))


class SafeLogger(_Adapter):
    """The ``dropsafe`` logger; whatever a handler raises is reported, never propagated."""

    def __init__(self, name: str = "dropsafe") -> None:
        super().__init__(logging.getLogger(name), None)

    def log(
        self,
        level: int,
        msg: object,
        *args: object,
        exc_info: _ExcInfoType | None = None,
        stack_info: bool = False,
        stacklevel: int = 2,  # the caller of debug() or warning(), not this method
        extra: Mapping[str, object] | None = None,
        **kwargs: object,
    ) -> None:
        """Log as ``Logger.log`` does, unless a handler raises: then report it and go on."""
        del kwargs  # none other reaches Logger.log
        if not self.logger.isEnabledFor(level):
            return
        if exc_info:
            # A traceback quotes the server's errors whole (a CONTEXT line may hold a dblink
            # connection string): written here, masked, never handed to handlers raw.
            msg, args = _with_traceback(msg, args, exc_info)
            exc_info = None
        try:
            self.logger.log(
                level,
                msg,
                *args,
                exc_info=exc_info,
                stack_info=stack_info,
                stacklevel=stacklevel,
                extra=extra,
            )
        except Exception as exc:  # noqa: BLE001 - any handler's error, by design
            observer_failed(f"a handler of the {self.logger.name!r} logger", exc)
