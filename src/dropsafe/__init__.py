"""dropsafe: keep SQLAlchemy applications working when their PostgreSQL connections fail.

Example::

    engine = dropsafe.create_engine("postgresql+psycopg2://app@db.example/app")
    Session = sessionmaker(engine)
    post_id = dropsafe.run_transaction(Session, lambda s: create_post(s, "hello"))
"""

from __future__ import annotations

from dropsafe._backoff import test_mode
from dropsafe._classify import Kind, classify
from dropsafe._engine import create_async_engine, create_engine, harden
from dropsafe._errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    DropsafeError,
    RetriesExhausted,
)
from dropsafe._policy import Policy
from dropsafe._transaction import run_transaction, run_transaction_async, transactional

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
    "run_transaction",
    "run_transaction_async",
    "test_mode",
    "transactional",
]
