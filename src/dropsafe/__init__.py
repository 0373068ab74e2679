"""dropsafe: keep SQLAlchemy applications working when their PostgreSQL connections fail."""

from __future__ import annotations

from dropsafe.errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    DropsafeError,
    RetriesExhausted,
)

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "DropsafeError",
    "RetriesExhausted",
]
