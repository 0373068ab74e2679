"""dropsafe: keep SQLAlchemy applications working when their PostgreSQL connections fail.

Example::

    engine = dropsafe.create_engine("postgresql+psycopg2://app@db.example/app")
    Session = sessionmaker(engine)
    post_id = dropsafe.run_transaction(Session, lambda s: create_post(s, "hello"))

Everything public is listed in ``__all__``; the modules with a leading underscore are not API.

The names are imported on first use, not with the package: pytest imports this package in every
run of every project that has dropsafe installed (to load the plugin,
``dropsafe.testing.pytest_plugin``), and a run whose tests never use dropsafe must not pay for
SQLAlchemy and the rest. The first name asked for imports them all.
"""

from __future__ import annotations

import importlib
import typing

#: The version of this package (also ``dropsafe --version`` and the wheel's metadata).
__version__ = "0.1.0"

# typing.TYPE_CHECKING, not a bare name: the package exports nothing but its __all__.
if typing.TYPE_CHECKING:
    from dropsafe._backoff import test_mode
    from dropsafe._classify import ErrorKind, classify
    from dropsafe._engine.guard import create_async_engine, create_engine, harden, policy_of
    from dropsafe._errors import CommitOutcomeUnknown, ConfigurationError, DropsafeError
    from dropsafe._policy import ConnectionPolicy, Policy, PoolPolicy, UnitPolicy
    from dropsafe._request_unit import request_unit
    from dropsafe._transaction import run_transaction, run_transaction_async, transactional

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "ConnectionPolicy",
    "DropsafeError",
    "ErrorKind",
    "Policy",
    "PoolPolicy",
    "UnitPolicy",
    "classify",
    "create_async_engine",
    "create_engine",
    "harden",
    "policy_of",
    "request_unit",
    "run_transaction",
    "run_transaction_async",
    "test_mode",
    "transactional",
]

# Names of the pre-release API (before 0.1.0) that are gone, and what to use instead: an error
# that says so beats an AttributeError, and beats keeping a name that no longer means what it did.
_GONE = {
    "RetriesExhausted": (
        "dropsafe no longer wraps the last error: when a unit of work runs out of attempts or "
        "time, that error itself is raised (your `except OperationalError:` catches it), with "
        "a note and a RetriesGaveUp event saying why. See CHANGELOG.md (0.1.0, Changed)."
    ),
    "Kind": "dropsafe.Kind is now dropsafe.ErrorKind.",
}


# Where each public name lives. The drivers' registry first: importing it hands each driver's
# error facts to the classifier (`dropsafe._classify` sits below the drivers and cannot ask).
_HOMES = {
    "dropsafe._drivers": (),
    "dropsafe._backoff": ("test_mode",),
    "dropsafe._classify": ("ErrorKind", "classify"),
    "dropsafe._engine.guard": ("create_async_engine", "create_engine", "harden", "policy_of"),
    "dropsafe._errors": ("CommitOutcomeUnknown", "ConfigurationError", "DropsafeError"),
    "dropsafe._policy": ("ConnectionPolicy", "Policy", "PoolPolicy", "UnitPolicy"),
    "dropsafe._request_unit": ("request_unit",),
    "dropsafe._transaction": ("run_transaction", "run_transaction_async", "transactional"),
}


def __getattr__(name: str) -> object:
    """Import every public name on the first use of one (see the module doc)."""
    if name in __all__:
        for module_name, names in _HOMES.items():
            module = importlib.import_module(module_name)
            globals().update({public: getattr(module, public) for public in names})
        # ``from dropsafe import test_mode`` in a test module must not be collected by pytest
        # as a test named test_mode (pytest skips what sets __test__ to False).
        globals()["test_mode"].__test__ = False
        return globals()[name]
    if name in _GONE:
        # ImportError, not AttributeError: ``from dropsafe import X`` would replace the message.
        raise ImportError(f"dropsafe.{name} is gone: {_GONE[name]}", name=name)
    raise AttributeError(f"module 'dropsafe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
