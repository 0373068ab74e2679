"""dropsafe: keep SQLAlchemy applications working when their PostgreSQL connections fail."""

from __future__ import annotations

from dropsafe.classify import Kind, classify
from dropsafe.engine import create_async_engine, create_engine, harden
from dropsafe.errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    DropsafeError,
    RetriesExhausted,
)
from dropsafe.policy import Policy

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "DropsafeError",
    "Kind",
    "Policy",
    "RetriesExhausted",
    "classify",
    "create_async_engine",
    "create_engine",
    "harden",
]
