"""Deliver an event to the hooks of a policy: observing must never break the application."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dropsafe.events import Event, Hook

__all__ = ["emit"]

logger = logging.getLogger("dropsafe")


def emit(hooks: Iterable[Hook], event: Event) -> None:
    """Hand ``event`` to every hook; a failing hook is logged, never raised."""
    for hook in hooks:
        try:
            hook(event)
        except Exception:  # noqa: PERF203 - one failing hook must not silence the others
            logger.exception("dropsafe hook %r failed on %r", hook, event)
