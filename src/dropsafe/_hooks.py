"""Deliver an event to the hooks of a policy: observing must never break the application."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dropsafe._log import SafeLogger, observer_failed

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dropsafe.events import Event, Hook

__all__ = ["emit"]

logger = SafeLogger()


def emit(hooks: Iterable[Hook], event: Event) -> None:
    """Hand ``event`` to every hook; a failing hook is reported, never raised.

    Events are emitted inside SQLAlchemy's events and in the middle of retries and commit
    resolutions: a hook's error must never take the place of a database error or a result.
    """
    for hook in hooks:
        try:
            hook(event)
        except Exception as exc:
            observer_failed(f"the hook {_name(hook)}", exc)
            logger.exception("dropsafe hook %r failed on %r", hook, event)


def _name(hook: object) -> str:
    # A LoggingHook fails when the logger's handler does: say so, not just the hook's name.
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__
