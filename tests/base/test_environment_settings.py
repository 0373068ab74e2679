"""``DROPSAFE_<KNOB>`` environment variables: every knob, below code and URL, refused when bad."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe import ConfigurationError, ConnectionPolicy, Policy, PoolPolicy, UnitPolicy
from dropsafe._policy import _LAYER_OF

URL = "postgresql+psycopg2://app:s3cret@127.0.0.1:1/app"
# A valid text per knob, different from its default.
TEXTS = {
    "connect_timeout": ("7", 7.0),
    "connect_wait": ("3", 3.0),
    "tcp_user_timeout": ("none", None),
    "keepalive_idle": ("60", 60.0),
    "keepalive_interval": ("2", 2.0),
    "keepalive_count": ("9", 9),
    "pooler": ("Transaction", "transaction"),
    "ping_after_idle": ("0", 0.0),
    "ping_timeout": ("1.5", 1.5),
    "max_lifetime": ("none", None),
    "replay_first_statement": ("off", False),
    "replay_transaction": ("on", True),
    "replay_max_statements": ("7", 7),
    "replay_max_rows": ("0", 0),
    "replay_max_bytes": ("4096", 4096),
    "defer_checkin_rollback": ("off", False),
    "begin_in_first_flight": ("off", False),
    "read_xid_in_flight": ("off", False),
    "max_attempts": ("11", 11),
    "backoff_initial": ("0.2", 0.2),
    "backoff_max": ("4", 4.0),
    "backoff_multiplier": ("3", 3.0),
    "deadline": ("12", 12.0),
    "verify_commits": ("false", False),
    "commit_status_timeout": ("2", 2.0),
}


def test_every_knob_has_a_case_here():
    assert set(TEXTS) == set(_LAYER_OF)


@pytest.mark.parametrize("knob", sorted(TEXTS))
def test_each_knob_is_set_by_its_variable(monkeypatch, knob):
    text, value = TEXTS[knob]
    monkeypatch.setenv(f"DROPSAFE_{knob.upper()}", text)
    policy = dropsafe.policy_of(dropsafe.create_engine(URL))
    assert policy is not None
    layer = _LAYER_OF[knob].split("=")[0]
    assert getattr(getattr(policy, layer), knob) == value
    assert getattr(getattr(Policy(), layer), knob) == value


def test_code_and_url_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("DROPSAFE_DEADLINE", "12")
    monkeypatch.setenv("DROPSAFE_MAX_ATTEMPTS", "11")
    assert UnitPolicy(deadline=3).deadline == 3
    assert UnitPolicy(deadline=3).max_attempts == 11
    assert UnitPolicy(3).max_attempts == 3  # positional counts as given
    engine = sa.create_engine(URL + "?plugin=dropsafe&dropsafe_deadline=7")
    policy = dropsafe.policy_of(engine)
    assert policy is not None
    assert (policy.unit.deadline, policy.unit.max_attempts) == (7, 11)


def test_without_variables_the_defaults_are_the_built_in_ones(monkeypatch):
    for knob in TEXTS:
        monkeypatch.delenv(f"DROPSAFE_{knob.upper()}", raising=False)
    assert UnitPolicy().deadline == 20
    assert ConnectionPolicy().tcp_user_timeout == 4
    assert PoolPolicy().max_lifetime == 3600


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("DROPSAFE_DEADLINE", "ten", "environment variable DROPSAFE_DEADLINE must be a number"),
        ("DROPSAFE_DEADLINE", "0", r"DROPSAFE_DEADLINE='0': UnitPolicy\.deadline must be within"),
        ("DROPSAFE_KEEPALIVE_COUNT", "2.5", "DROPSAFE_KEEPALIVE_COUNT must be an integer"),
        ("DROPSAFE_POOLER", "statement", "DROPSAFE_POOLER must be one of none, session, trans"),
        ("DROPSAFE_VERIFY_COMMITS", "maybe", "DROPSAFE_VERIFY_COMMITS must be true or false"),
        ("DROPSAFE_BACKOFF_INITIAL", "2", r"DROPSAFE_BACKOFF_INITIAL='2': UnitPolicy\.backoff_max"),
    ],
)
def test_a_malformed_variable_is_refused_naming_it(monkeypatch, variable, text, message):
    monkeypatch.setenv(variable, text)
    with pytest.raises(ConfigurationError, match=message) as raised:
        dropsafe.create_engine(URL)
    assert "s3cret" not in str(raised.value)


def test_a_bad_variable_does_not_hide_an_error_in_code(monkeypatch):
    monkeypatch.setenv("DROPSAFE_DEADLINE", "12")
    with pytest.raises(ConfigurationError, match=r"^UnitPolicy\.max_attempts must be within"):
        UnitPolicy(max_attempts=0)


def test_a_units_override_keeps_the_engines_knobs_not_the_environments(monkeypatch):
    # run_transaction(..., deadline=2) replaces one knob of the engine's UnitPolicy: the others
    # stay the engine's, even where a variable says otherwise.
    engine_unit = UnitPolicy(max_attempts=3)
    monkeypatch.setenv("DROPSAFE_MAX_ATTEMPTS", "11")
    overridden = dataclasses.replace(engine_unit, deadline=2)
    assert (overridden.deadline, overridden.max_attempts) == (2, 3)
