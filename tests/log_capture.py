"""What tests in several folders share about dropsafe's log: a handler on its logger, at DEBUG."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def dropsafe_logger_at_debug(handler):
    """Add ``handler`` to the ``dropsafe`` logger, at DEBUG, for the block; then put the logger
    back as it was."""
    logger = logging.getLogger("dropsafe")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


__all__ = ["dropsafe_logger_at_debug"]
