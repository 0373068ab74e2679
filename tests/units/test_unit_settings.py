"""A unit's settings: the engine's policy with the call's overrides, made once, cache bounded.

And the one tracker's listeners: one set per engine, however many units install them.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe import ConfigurationError
from dropsafe._unit import settings
from dropsafe._unit.recording import watch_engine
from dropsafe._unit.settings import unit_settings


def test_an_override_is_made_once_and_the_cache_stays_bounded():
    engine_policy = dropsafe.Policy()
    first, hooks = unit_settings(engine_policy, None, 1, 2)
    assert unit_settings(engine_policy, None, 1, 2)[0] is first
    assert hooks == engine_policy.hooks
    for deadline in range(1, 400):
        unit_settings(engine_policy, None, deadline, 2)
    assert len(settings._OVERRIDDEN) <= settings._CACHE_SIZE


def test_no_override_is_the_engine_s_own_policy():
    engine_policy = dropsafe.Policy()
    assert unit_settings(engine_policy, None, None, None)[0] is engine_policy.unit
    mine = dropsafe.UnitPolicy(max_attempts=3)
    assert unit_settings(engine_policy, mine, None, None)[0] is mine


@pytest.mark.parametrize(
    ("policy", "deadline", "max_attempts", "message"),
    [
        (dropsafe.Policy(), None, None, "takes a UnitPolicy"),
        ("fast", None, None, "must be a dropsafe.UnitPolicy"),
        (None, [1], None, r"UnitPolicy\.deadline must be"),  # unhashable: never cached
        (None, None, True, r"UnitPolicy\.max_attempts must be"),  # True == 1, refused
    ],
)
def test_bad_settings_are_refused_naming_the_knob(policy, deadline, max_attempts, message):
    unit_settings(None, None, None, 1)  # 1 cached first: True must not be taken for it
    for _ in range(2):
        with pytest.raises(ConfigurationError, match=message):
            unit_settings(None, policy, deadline, max_attempts)


def test_an_engine_gets_one_set_of_hooks_however_many_units_watch_it():
    """Once on its dialect, and no SQLAlchemy Connection event: a listener would cost every
    request on the engine about a hundred Python calls (`dropsafe._unit.dialect_hooks`)."""
    engine = sa.create_engine("sqlite://")
    watch_engine(engine)
    hooked = {name: getattr(engine.dialect, name) for name in ("do_commit", "do_begin")}
    for _ in range(2):
        watch_engine(engine)
    assert {name: getattr(engine.dialect, name) for name in hooked} == hooked
    assert hooked["do_commit"] is not type(engine.dialect).do_commit
    assert not engine._has_events
