"""A unit's settings: its engine's `UnitPolicy`, or the call's, with the call's two overrides.

Checked at the call (and at decoration, for `transactional`), before anything runs. Making a
policy validates every knob, which costs more than a unit's own work, so the overridden policy
is kept in an explicit cache keyed by what made it. The knobs: docs/settings.md.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import TYPE_CHECKING, Any

from dropsafe._errors import ConfigurationError
from dropsafe._policy import Duration, Policy, UnitPolicy

if TYPE_CHECKING:
    from dropsafe.events import Hook

__all__ = ["unit_settings"]

#: What an overridden policy is made from: the policy, then each override with its type.
_Key = tuple[UnitPolicy, object, type, object, type]

_CACHE_SIZE = 128  # distinct (policy, deadline, max_attempts) of one process: a few, in practice
_OVERRIDDEN: dict[_Key, UnitPolicy] = {}
_CACHE_LOCK = threading.Lock()


def unit_settings(
    engine_policy: Policy | None,
    policy: object,
    deadline: Duration | None,
    max_attempts: int | None,
) -> tuple[UnitPolicy, tuple[Hook, ...]]:
    """Return the unit's policy and hooks: ``engine_policy``'s (None: the default's), overridden.

    ``policy`` replaces the engine's `UnitPolicy`; ``deadline`` and ``max_attempts`` replace
    those two knobs of it. A bad value raises `ConfigurationError` naming the knob.
    """
    if isinstance(policy, Policy):
        raise ConfigurationError(
            "a unit of work takes a UnitPolicy (policy=your_policy.unit): the connection and "
            "pool settings of a Policy belong to its engine, dropsafe.create_engine(url, "
            "policy=...)"
        )
    if policy is not None and not isinstance(policy, UnitPolicy):
        raise ConfigurationError(f"policy must be a dropsafe.UnitPolicy, not {policy!r}")
    if engine_policy is None:
        engine_policy = _default_policy()
    unit = policy or engine_policy.unit
    if deadline is not None or max_attempts is not None:
        unit = _overridden(unit, deadline, max_attempts)
    return unit, engine_policy.hooks


@functools.cache  # policies are frozen: the same settings give the same policy
def _default_policy() -> Policy:
    return Policy()


def _overridden(
    unit: UnitPolicy, deadline: Duration | None, max_attempts: int | None
) -> UnitPolicy:
    """Return ``unit`` with the overrides, made (and so validated) once per distinct value.

    The key holds each value's type: ``True == 1`` and hash alike, but True is refused where 1
    is taken. A value that cannot be a key (a list) is never cached: it is made, and refused.
    """
    key = (unit, deadline, type(deadline), max_attempts, type(max_attempts))
    try:
        made = _OVERRIDDEN.get(key)
    except TypeError:  # unhashable: not a valid value, and making it says which knob
        return _make(unit, deadline, max_attempts)
    if made is None:
        made = _make(unit, deadline, max_attempts)
        with _CACHE_LOCK:
            if len(_OVERRIDDEN) >= _CACHE_SIZE:
                _OVERRIDDEN.pop(next(iter(_OVERRIDDEN)))  # the oldest
            _OVERRIDDEN[key] = made
    return made


def _make(unit: UnitPolicy, deadline: Duration | None, max_attempts: int | None) -> UnitPolicy:
    overrides: dict[str, Any] = {}  # each validated by the policy, naming the knob
    if deadline is not None:
        overrides["deadline"] = deadline
    if max_attempts is not None:
        overrides["max_attempts"] = max_attempts
    return dataclasses.replace(unit, **overrides)
