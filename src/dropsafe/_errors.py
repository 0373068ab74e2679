"""The one exception tree of dropsafe.

::

    DropsafeError
      + ConfigurationError      (bad URL, bad policy value, unsupported driver, missing binaries,
                                 a unit of work of a refused shape: two-phase, AUTOCOMMIT)
      + CommitOutcomeUnknown    (the COMMIT may or may not have happened; or a unit's COMMIT
                                 did not, but its function had committed part of the work
                                 itself, through the DBAPI connection: ``reason`` says so)

Errors from the database that dropsafe does not handle are raised unchanged, and so is the
last error of a unit of work that ran out of attempts or time (see `dropsafe._unit.core`).
"""

from __future__ import annotations

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "DropsafeError",
]


class DropsafeError(Exception):
    """Base of every error that dropsafe raises itself."""

    __module__ = "dropsafe"


class ConfigurationError(DropsafeError, ValueError):
    """A value given to dropsafe cannot work: raised at the call, before anything runs."""

    __module__ = "dropsafe"


class CommitOutcomeUnknown(DropsafeError):
    """The connection failed during COMMIT and the server could not say what happened.

    Also raised, never run again nor acknowledged, for a unit of work whose function ended its
    transaction itself around SQLAlchemy (the DBAPI connection's own ``commit()``) when that
    transaction committed or may have, and the unit's COMMIT did not (or was never sent):
    part of the work is durable. ``reason`` is then "the app committed an earlier transaction
    of the work itself", or "an earlier transaction the app ended itself may have committed"
    (docs/guarantees.md, "A unit whose function commits around SQLAlchemy").
    """

    __module__ = "dropsafe"

    def __init__(self, message: str, *, xid: int | None, reason: str) -> None:
        super().__init__(message)
        self.xid = xid
        self.reason = reason
