"""Events: one frozen dataclass per thing dropsafe did, handed to the hooks of the policy.

Hooks are plain callables taking one event; they are attached to a `Policy`
(``Policy(hooks=(my_hook,))``), so each engine reports to its own hooks and nothing is global.
The default policy has one: `LoggingHook`. A hook that raises is logged and ignored: observing
must never break the application. Every text an event carries has its passwords masked.

Example::

    def count_retries(event: dropsafe.events.Event) -> None:
        if isinstance(event, dropsafe.events.RetryScheduled):
            metrics.retries.inc()

    policy = dropsafe.Policy(hooks=(dropsafe.events.LoggingHook(), count_retries))
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

from dropsafe._event_types import (
    AcknowledgedCommitLost,
    CommitResolved,
    ConnectionInvalidated,
    ConnectWaited,
    DeadConnectionReplaced,
    Event,
    FirstStatementReplayed,
    HookFailedAfterCommit,
    HostRetried,
    HostSkipped,
    PingSucceeded,
    RetriesGaveUp,
    RetryScheduled,
    RollbackConnectionLost,
    TransactionReplayed,
    event_name,
)
from dropsafe._metrics import OpenTelemetryHook, PrometheusHook

__all__ = [
    "AcknowledgedCommitLost",
    "CommitResolved",
    "ConnectWaited",
    "ConnectionInvalidated",
    "DeadConnectionReplaced",
    "Event",
    "FirstStatementReplayed",
    "Hook",
    "HookFailedAfterCommit",
    "HostRetried",
    "HostSkipped",
    "LoggingHook",
    "OpenTelemetryHook",
    "PingSucceeded",
    "PrometheusHook",
    "RetriesGaveUp",
    "RetryScheduled",
    "RollbackConnectionLost",
    "TransactionReplayed",
    "format_event",
]

logger = logging.getLogger("dropsafe")


class Hook(Protocol):
    """Anything that takes an event."""

    def __call__(self, event: Event, /) -> None:
        """Observe one event; must not block for long."""


class LoggingHook:
    """Write one structured line per event to the ``dropsafe`` logger (logfmt-style).

    Levels: pings and ROLLBACKs that met a lost connection at DEBUG; replaced connections,
    replayed first statements, retries and resolved commits at INFO; a unit of work that gave
    up, a commit that could not be resolved and an acknowledged commit a failover lost at
    WARNING; a Session hook that raised after a unit's COMMIT at ERROR.

    Example output::

        dropsafe.retry_scheduled attempt=1 delay=0.031 kind=disconnect error="OperationalError: ..."
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("dropsafe")

    def __call__(self, event: Event, /) -> None:
        """Log ``event``."""
        level = _level_of(event)
        if self.logger.isEnabledFor(level):
            self.logger.log(level, format_event(event))

    def __repr__(self) -> str:
        return f"LoggingHook({self.logger.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoggingHook) and other.logger is self.logger

    def __hash__(self) -> int:
        return hash((LoggingHook, self.logger.name))


def format_event(event: Event) -> str:
    """Render ``event`` as ``dropsafe.<name> key=value ...``; strings are quoted."""
    fields = []
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if isinstance(value, float):
            text = f"{value:.4f}".rstrip("0").rstrip(".")
        elif isinstance(value, str) and field.name in ("error", "reason"):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
        else:
            text = str(getattr(value, "value", value))
        fields.append(f"{field.name}={text}")
    return " ".join([event_name(event), *fields])


def _level_of(event: Event) -> int:
    if isinstance(event, HookFailedAfterCommit):
        return logging.ERROR
    if isinstance(event, (PingSucceeded, RollbackConnectionLost)):
        return logging.DEBUG
    if (
        isinstance(event, (RetriesGaveUp, AcknowledgedCommitLost))
        or (isinstance(event, CommitResolved) and event.outcome == "unknown")
        or (isinstance(event, ConnectWaited) and event.outcome == "gave_up")
    ):
        return logging.WARNING
    return logging.INFO
